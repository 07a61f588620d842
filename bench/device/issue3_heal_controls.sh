#!/bin/bash
# Issue 3 (session 19), second call: the controls of bench/device/issue3_heal.sh's result (healing the 0.75 vote on
# natural text alone: 76% -> 94.5% of dense retrieval; the healed rules stayed at 15-17%). Every arm heals on text
# only (400 calibration sequences, 400 steps, one pass, lr 5e-5, q/k/v/o of every layer), seed 0 unless noted:
#   vote075-text-s1/-s2  the same healing as issue3_heal.sh's vote075-text, seeds 1 and 2 (another sample order)
#   l0kl075       the L0 search on natural text only (KL, round 6 seed 0; 28% of dense before)
#   l0lm075       one L0 search with LM on retrieval samples (round 6; 62% before)
#   scalar075     scalar gates + L1 (the paper's ablation; round 6 seed 2)
#   attnmass075   the training-free attention-mass heuristic (1e)
#   random075-r0/-r1  seeded random kv-head masks (22/90, the vote's count)
#   vote050-text  the 0.5 vote of 1g.6 (the mixed healing of the first call left it at 92.5%)
#   cli-vote075   `consa heal` itself on the 0.75 vote, its defaults (the product path; flex attention)
# Then 288 prompts at 1024 / 2048 as 1g.15, and the 0.75 vote healed / unhealed / dense at 4096 tokens (144 prompts).
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
A=$REPO/docs/results/allocations
G=/root/keep/SMOLLM2.gguf
mkdir -p /tmp/heal && cd /tmp/heal
for r in 0 1; do
  $CONSA baseline --model $G --rule random --granularity kv-head --sparsity 0.75 --seed $r --output rule-random-r$r > /dev/null
done
H="python3 $REPO/bench/heal_prototype.py"
L="--model $G --device cuda --lr 5e-5 --steps 400 --text-sequences 400 --retrieval-fraction 0"
heal() {  # NAME MASK ARGS...
  name=$1; mask=$2; shift 2
  timeout 280 $H $mask $L "$@" --output $name > $name.log 2>&1
  cp $name/healed.safetensors $name-healed.safetensors && cp $name/unhealed.safetensors $name-unhealed.safetensors
}
V75=$REPO/.devcarry/b/masks/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors
heal vote075-text-s1 $V75 --seed 1 &
heal vote075-text-s2 $V75 --seed 2 &
heal l0kl075 $A/gpu-round6-l0-kv-head-seed0-s0.75.safetensors &
heal l0lm075 $A/gpu-round6-l0-kv-head-lm-rf0.5-s0.75.safetensors &
heal scalar075 $A/gpu-round6-scalar-l1-kv-head-seed2-s0.75.safetensors &
heal attnmass075 $A/attention-mass-rf0.95-kv-head-s0.75-cpu.safetensors &
heal random075-r0 rule-random-r0/allocation.safetensors &
heal random075-r1 rule-random-r1/allocation.safetensors &
heal vote050-text $REPO/.devcarry/b/masks/vote4-kl-lm-rf0.5-300steps-seeds10-13-s0.5.safetensors &
# The product path: `consa heal` with its defaults (flex attention on CUDA), beside the prototype's runs.
timeout 280 $CONSA heal $V75 --output cli-vote075 > cli-heal.log 2>&1 &
wait
tail -4 cli-heal.log
grep -h "rror" *.log | head
E="--device cuda --max-sequences 100 --seq-len 1024 --batch-size 8 --retrieval passkey,multikey
   --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 24 --retrieval-haystack noise"
timeout 250 $CONSA eval vote075-text-s1-healed.safetensors vote075-text-s2-healed.safetensors l0kl075-unhealed.safetensors \
  l0kl075-healed.safetensors $E --retrieval-lengths 1024,2048 --json heal-eval-controls-a.json > eval-a.log 2>&1 &
timeout 250 $CONSA eval scalar075-unhealed.safetensors scalar075-healed.safetensors attnmass075-unhealed.safetensors \
  attnmass075-healed.safetensors $E --retrieval-lengths 1024,2048 --no-dense --json heal-eval-controls-b.json > eval-b.log 2>&1 &
timeout 250 $CONSA eval random075-r0-unhealed.safetensors random075-r0-healed.safetensors random075-r1-unhealed.safetensors \
  random075-r1-healed.safetensors $E --retrieval-lengths 1024,2048 --no-dense --json heal-eval-controls-c.json > eval-c.log 2>&1 &
timeout 250 $CONSA eval l0lm075-unhealed.safetensors l0lm075-healed.safetensors vote050-text-healed.safetensors cli-vote075 \
  $E --retrieval-lengths 1024,2048 --no-dense --json heal-eval-controls-d.json > eval-d.log 2>&1 &
timeout 250 $CONSA eval $V75 vote075-text-s1-healed.safetensors $E --retrieval-lengths 4096 \
  --json heal-eval-4096.json > eval-4096.log 2>&1 &
wait
for f in eval-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v "Warn\|Loading\|it/s" | grep -i "overall\|error" | tail -12; done
tar czf $OUT/heal-controls.tgz *.log *.json */log.json cli-vote075/heal_log.json cli-vote075/config.json *-healed.safetensors *-unhealed.safetensors rule-*/allocation.safetensors
