#!/bin/bash
# Issue 3 (session 16): polish the held-out votes by greedy one-for-one head swaps judged on held-out calibration
# (bench/swap_refine.py: retrieval answers in the calibration formats + calibration text; never the evaluation's
# tasks), and evaluate every swap on 288 prompts. At 0.75 from the 77% vote of results.md 1g.5, two signals (the
# search's default formats; the four formats the dense model answers); at 0.5 from the 94% vote of 1g.6, the default.
# Run 1 of session 16 made swaps 1-2 (docs/results/allocations/refine-*-swap{1,2}); this run continues each by two
# swaps from there (the same samples: same seed) while it evaluates them, then evaluates the continuations.
# Needs the model carry (a first call leaves /root/keep/gguf.part1; this one carries .devcarry/b).
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
A=$REPO/docs/results/allocations
M="--model /root/keep/SMOLLM2.gguf"
R="$M --device cuda --calibration-samples 96 --text-sequences 16 --seq-len 1024 --seed 7 --swaps 2 --candidates 3"
E="--dense-model /root/keep/SMOLLM2.gguf --device cuda --max-sequences 100 --seq-len 1024 --batch-size 8 --retrieval passkey,multikey
   --retrieval-lengths 1024,2048 --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 24 --retrieval-haystack noise"
mkdir -p /tmp/sr && cd /tmp/sr
timeout 270 python3 $REPO/bench/swap_refine.py $A/refine-s075-default-swap2.safetensors $R \
  --output-prefix s075-default-c --json s075-default-c.json > s075-default-c.log 2>&1 &
timeout 270 python3 $REPO/bench/swap_refine.py $A/refine-s075-four-swap2.safetensors $R \
  --signal flight-gate,pet-name,meeting-day,phone-extension --output-prefix s075-four-c \
  --json s075-four-c.json > s075-four-c.log 2>&1 &
timeout 270 python3 $REPO/bench/swap_refine.py $A/refine-s050-default-swap2.safetensors $R \
  --output-prefix s050-default-c --json s050-default-c.json > s050-default-c.log 2>&1 &
timeout 270 $CONSA eval $A/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors $A/refine-s075-default-swap1.safetensors \
  $A/refine-s075-default-swap2.safetensors $A/refine-s075-four-swap2.safetensors $E \
  --json $OUT/swap-refine-s075-eval.json > eval1.log 2>&1 &
timeout 270 $CONSA eval $A/vote4-kl-lm-rf0.5-300steps-seeds10-13-s0.5.safetensors $A/refine-s050-default-swap1.safetensors \
  $A/refine-s050-default-swap2.safetensors $E --json $OUT/swap-refine-s050-eval.json > eval2.log 2>&1 &
wait
grep -h "base:\|swap \|rror" s075-default-c.log s075-four-c.log s050-default-c.log
timeout 200 $CONSA eval s075-*-c-swap*.safetensors s050-default-c-swap*.safetensors $E --no-dense \
  --json $OUT/swap-refine-continued-eval.json > eval3.log 2>&1
for f in eval1.log eval2.log eval3.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v "Warn\|Loading\|it/s" | tail -14; done
tar czf $OUT/swap-refine-run2.tgz *.safetensors *.log *.json
