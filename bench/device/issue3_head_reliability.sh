#!/bin/bash
# Issue 3 (session 12): how well do the evaluation's own one-head effects repeat on other prompts (the ceiling for
# any calibration signal's correlation with them), at the evaluation's lengths, with 6x the prompts of 1g.11; and
# four calibration signals at 2048 tokens with 48 samples each, against the same effects. Needs the model carry
# (a first call leaves /root/keep/gguf.part1; this one carries .devcarry/b).
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 540 python3 bench/head_effects.py docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors \
  --model /root/keep/SMOLLM2.gguf --device cuda --lengths 1024,2048 --samples 6 --extra-prompt-seeds 3000,4000 \
  --seq-len 2048 --calibration-samples 48 --toggles both \
  --signals "room-code,home-city;room-code,home-city@filler;flight-gate,pet-name,meeting-day,phone-extension;locker-number" \
  --json $OUT/head-effects-reliability-h200.json 2>&1 | grep -v "Warn\|Loading" | tail -12
