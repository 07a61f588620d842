#!/bin/bash
# Issue 3 (session 12), after issue3_head_reliability.sh: the evaluation's one-head add effects repeat across prompt
# seeds (r +0.92) and no calibration signal tried ranks them alike (r +0.08..+0.19). The evaluation's prompts open
# with an instruction that the calibration samples lack; do the heads the evaluation wants serve that instruction?
# (a) the evaluation's prompts without it (seed 3000, compare evaluation@3000 of the first run), (b) calibration
# signals whose samples open with an instruction of their own (calibration.CALIBRATION_INTRO). Same base, prompts
# and calibration settings as the first run. Needs the model carry.
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 500 python3 bench/head_effects.py docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors \
  --model /root/keep/SMOLLM2.gguf --device cuda --lengths 1024,2048 --samples 6 --no-intro-prompt-seeds 3000 \
  --seq-len 2048 --calibration-samples 48 --toggles both \
  --signals "room-code,home-city+intro;room-code,home-city@filler+intro;flight-gate,pet-name,meeting-day,phone-extension@filler+intro;locker-number@filler+intro" \
  --json $OUT/head-effects-intro-h200.json 2>&1 | grep -v "Warn\|Loading" | tail -8
