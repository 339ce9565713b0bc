#!/usr/bin/env bash
# Adds `--kv-offload partial-recompute` (alias of --kv-offloading-backend) to an installed vLLM
# (0.26 ... 0.33): `vllm serve MODEL --kv-offload partial-recompute [--kv-offloading-size GiB]`.
# Usage: bash patches/apply.sh [PYTHON]   (default: python3; use the venv's python)
set -euo pipefail
py=${1:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
site=$("$py" -c 'import os, vllm; print(os.path.dirname(os.path.dirname(vllm.__file__)))')
if grep -q '"partial-recompute"' "$site/vllm/config/cache.py"; then
  echo "vLLM in $site is already patched"
  exit 0
fi
patch -p1 --forward -d "$site" < "$here/vllm-kv-offload-partial-recompute.patch"
echo "patched vLLM in $site: --kv-offload partial-recompute is available"
