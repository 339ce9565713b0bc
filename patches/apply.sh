#!/usr/bin/env bash
# Adds `--kv-offload partial-recompute` (alias of --kv-offloading-backend) to an installed vLLM
# (0.26 ... 0.34): `vllm serve MODEL --kv-offload partial-recompute [--kv-offloading-size GiB]`.
# Usage: bash patches/apply.sh [PYTHON]   (default: python3; use the venv's python)
#
# vllm-X.Y.patch is made against vLLM X.Y's own files and applies there without fuzz or offset.
# For a version without its own file, the first one whose context matches exactly is used (0.27 to
# 0.31 take vllm-0.26.patch, at an offset: checked by dry runs against their wheels).
set -euo pipefail
py=${1:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
read -r site version < <("$py" -c 'import os, vllm; print(os.path.dirname(os.path.dirname(vllm.__file__)), vllm.__version__)')
if grep -q '"partial-recompute"' "$site/vllm/config/cache.py"; then
  echo "vLLM in $site is already patched"
  exit 0
fi
minor=$(echo "$version" | cut -d. -f1,2)
candidates=("$here/vllm-$minor.patch")
[ -f "${candidates[0]}" ] || candidates=($(ls -r "$here"/vllm-*.patch))
for p in "${candidates[@]}"; do
  if patch -p1 --forward --dry-run -F0 -s -d "$site" < "$p" >/dev/null; then
    patch -p1 --forward -F0 -s -d "$site" < "$p"
    echo "patched vLLM $version in $site with $(basename "$p"): --kv-offload partial-recompute is available"
    exit 0
  fi
done
echo "error: no patch in $here applies to vLLM $version without fuzz (made for 0.26, 0.32, 0.33, 0.34)" >&2
exit 1
