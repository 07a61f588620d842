#!/bin/bash
# Issue 3 (session 16): the evaluation of bench/device/issue3_swap_refine.sh's masks (its own evaluation step
# could not load them: their model field named a model of this machine). The masks travel in .devcarry/b/masks
# with their model set to /root/keep/SMOLLM2.gguf; 288 prompts (passkey + multikey, 1024 / 2048 tokens, depths
# 0.1 / 0.5 / 0.9, 24 per cell, noise haystack) and 100 held-out sequences, every mask on the same prompts.
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
M=.devcarry/b/masks
E="--device cuda --max-sequences 100 --seq-len 1024 --batch-size 8 --retrieval passkey,multikey
   --retrieval-lengths 1024,2048 --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 24 --retrieval-haystack noise"
timeout 400 $CONSA eval $M/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors $M/refine-s075-default-swap?.safetensors $E \
  --json $OUT/swap-refine-s075-default-eval.json > $OUT/eval-s075-default.log 2>&1 &
timeout 400 $CONSA eval $M/refine-s075-four-swap?.safetensors $E --no-dense \
  --json $OUT/swap-refine-s075-four-eval.json > $OUT/eval-s075-four.log 2>&1 &
timeout 400 $CONSA eval $M/vote4-kl-lm-rf0.5-300steps-seeds10-13-s0.5.safetensors $M/refine-s050-default-swap?.safetensors \
  $E --no-dense --json $OUT/swap-refine-s050-default-eval.json > $OUT/eval-s050-default.log 2>&1 &
wait
for f in $OUT/eval-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v "Warn\|Loading\|it/s" | grep -i "overall\|error\|refine\|vote\|dense" | tail -12; done
