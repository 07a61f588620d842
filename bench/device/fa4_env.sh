# Sourced on the GPU machine (repository root) after the fa4a call left its part in /root/keep: puts the CuTe DSL's
# CUDA 13 library wheel together, checks it, and installs flash-attn-4 and its wheels into /tmp/site.
name=$(cat .devcarry/fa4b/libs-cu13.name)
[ -f /tmp/fa4whl/$name ] || { mkdir -p /tmp/fa4whl && cat /root/keep/libs-cu13.part1 .devcarry/fa4b/libs-cu13.part2 > /tmp/fa4whl/$name; }
(cd /tmp/fa4whl && sha256sum -c --quiet $OLDPWD/.devcarry/fa4b/libs-cu13.sha256) || exit 1
[ -d /tmp/site/flash_attn ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site /tmp/fa4whl/$name .devcarry/fa4b/whl/*.whl || exit 1
# (--target installs skip the .pth file that puts the CuTe DSL's own packages, `cutlass` among them, on the path.)
export PYTHONPATH=$PWD/src:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages PYTHONUNBUFFERED=1
