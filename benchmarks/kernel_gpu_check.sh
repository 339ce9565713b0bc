#!/usr/bin/env bash
# One GPU call: the kernel tests compiled for real (gpu cases included, no interpreter), then the
# benchmark. Needs torch + triton + pytest, not vLLM. Results land in $OUT; the table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kernel_gpu_check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

start=$SECONDS
# Tests: tail only, full log in $OUT.
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -rfEs >"$OUT/pytest.log" 2>&1
tests_rc=$?
tail -n 25 "$OUT/pytest.log"
echo "tests: rc=$tests_rc in $((SECONDS - start)) s"

start=$SECONDS
"$PY" benchmarks/kernel.py --out "$OUT/kernel.json" 2>&1 | tee "$OUT/bench.log" | grep -vE '^(\||recompute =)' | tail -n 20
bench_rc=${PIPESTATUS[0]}
echo "benchmark: rc=$bench_rc in $((SECONDS - start)) s"
echo
grep -E '^(\||recompute =)' "$OUT/bench.log" || true
exit $((tests_rc || bench_rc))
