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
