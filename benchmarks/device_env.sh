# Source on the lent GPU machine after the vLLM bundle is installed in /tmp/site (see
# ../shared/gpu/README.md): makes this checkout importable and registers its vLLM plugin entry
# point without pip (the machine has no network).
set -e
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dist=/tmp/pkv/vllm_partial_kv-0.1.0.dist-info
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: vllm-partial-kv\nVersion: 0.1.0\n' > "$dist/METADATA"
printf '[vllm.general_plugins]\npartial_kv = vllm_partial_kv.plugin:register\n' > "$dist/entry_points.txt"
export PYTHONPATH="$here:/tmp/pkv:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
set +e
