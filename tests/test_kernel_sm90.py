"""Every tuning config of the recompute kernel compiled for Hopper (sm_90) without a GPU
(`benchmarks/kernel_sass.py`, in a child process: the tests' Triton interpreter cannot compile).
Catches, before any GPU time is spent, a config that fails to lower, spills registers, overflows
shared memory, misses the full-width wgmma or does not issue TMA copies. The lent GPUs run Triton
3.6, which `make test-vllm026` (torch 2.11) brings: CI compiles with both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from vllm_partial_kv.kernels import triton_recompute  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_sass.py"
VARIANTS = ("llama", "qwen3_gptj_bias")


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[int, str], dict]:
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel has no NVIDIA backend")
    out = subprocess.run([sys.executable, str(SCRIPT), "--json"], env=os.environ.copy(), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {(r["index"], r["variant"]): r for r in json.loads(out.stdout.splitlines()[-1])}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("index", range(len(triton_recompute.TUNE_CONFIGS)))
def test_tuning_config_compiles_for_hopper(index: int, variant: str, compiled: dict) -> None:
    config, usage = triton_recompute.TUNE_CONFIGS[index], compiled[(index, variant)]
    assert usage["stack"] == 0, f"{config}: spills to a {usage['stack']}-byte stack"
    assert usage["shared"] <= triton_recompute._SMEM_BUDGET, f"{config}: {usage['shared']} bytes of shared memory"
    # wgmma takes 64 rows per warpgroup: with enough rows every warpgroup spans the tile's full width.
    if config.kwargs["BLOCK_T"] >= 64 * max(1, config.num_warps // 4):
        assert usage["wgmma_n"] == [config.kwargs["HEADS"] * 128], f"{config}: wgmma N {usage['wgmma_n']}"
    assert usage["tma"] == config.kwargs["TMA"], f"{config}: TMA copies {usage['tma']}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_epilogue_after_cublas_compiles_for_hopper(variant: str, compiled: dict) -> None:
    usage = compiled[(None, variant)]
    assert usage["stack"] == 0, f"the epilogue spills to a {usage['stack']}-byte stack"
    assert not usage["wgmma_n"] and not usage["tma"], "the epilogue alone must not multiply or use TMA"
    assert usage["STG"] > 0
