# Sourced on the GPU machine (repository root) by the round scripts: puts the embedded model together at
# /root/keep/SMOLLM2.gguf (part 1 left there by the previous call), installs the carried gguf wheel, points
# CONSA_CACHE at the carried corpus, and defines CONSA (the CLI without installing the package).
mkdir -p /root/keep
[ -f /root/keep/SMOLLM2.gguf ] || cat /root/keep/gguf.part1 .devcarry/b/gguf.part2 > /root/keep/SMOLLM2.gguf
echo "$(cat .devcarry/b/gguf.sha256)  /root/keep/SMOLLM2.gguf" | sha256sum -c --quiet || exit 1
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .devcarry/b/*.whl || exit 1
export REPO=$PWD PYTHONPATH=$PWD/src:/tmp/site CONSA_CACHE=/root/keep/cache PYTHONUNBUFFERED=1
mkdir -p "$CONSA_CACHE/corpus" && cp -r .devcarry/b/cache/corpus/. "$CONSA_CACHE/corpus/"
CONSA="python3 $PWD/bench/device/consa.py"
# The vote of each arm's four seeds (its halves ARM-a and ARM-b of two seeds each), as vote4-ARM.safetensors.
vote4() {
  for arm in "$@"; do
    python3 $REPO/bench/vote_allocations.py $arm-a/seed-*/allocation.safetensors $arm-b/seed-*/allocation.safetensors \
        --output vote4-$arm.safetensors
  done
}
# The evaluation of results.md 1f-1g.9 (100 held-out sequences; passkey + multikey at 1024 / 2048 tokens, 3 depths,
# 8 prompts per cell: 96 prompts); add --retrieval-haystack noise|prose.
EVAL_ARGS="--device cuda --max-sequences 100 --seq-len 1024 --retrieval passkey,multikey --retrieval-lengths 1024,2048
   --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 8"
