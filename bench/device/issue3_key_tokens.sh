#!/bin/bash
# Issue 3 (session 14): do text signals rank the heads worth adding like the evaluation does? The calibration
# text itself, every token ("text": what the default KL-on-text search fits), and only its long-context tokens
# ("key-tokens:GAIN": the dense model predicts them GAIN nats better than the all-sliding model; after LongPPL), at
# three gains; same base, evaluation prompts (seed 2000, 1024 + 2048 tokens, 6 per cell) and sequence length (2048)
# as session 12's screen (docs/results.md 1g.12), add toggles only. Its first run (one
# row per forward and per signal) hit the call's limit; the text signals now share one batched pass. Needs the model carry (a first call leaves
# /root/keep/gguf.part1; this one carries .devcarry/b).
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 python3 bench/head_effects.py docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors \
  --model /root/keep/SMOLLM2.gguf --device cuda --lengths 1024,2048 --samples 6 \
  --seq-len 2048 --calibration-samples 48 --toggles add \
  --signals "text;key-tokens:0.5;key-tokens:1;key-tokens:2" \
  --json $OUT/head-effects-key-tokens-h200.json > $OUT/head-effects-key-tokens.log 2>&1
grep -v "Warn\|Loading\|Convert\|Writing" $OUT/head-effects-key-tokens.log | tail -10
