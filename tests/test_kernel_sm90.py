"""Every tuning config of the recompute kernel compiled for Hopper (sm_90) without a GPU: Triton's
NVIDIA backend and its cuobjdump come with the wheel. Catches, before any GPU time is spent, a
config that fails to lower, spills registers in its main loop (or many in its epilogue), overflows
shared memory, misses the full-width wgmma or does not issue TMA copies. The lent GPUs run Triton 3.6;
`PYTHONPATH=<unpacked triton-3.6 wheel> pytest tests/test_kernel_sm90.py` checks with that version.

The compile runs in a child process: the tests' Triton interpreter cannot compile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from vllm_partial_kv.kernels import triton_recompute  # noqa: E402  (interpreted here, compiled in the child)

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
MAX_STACK = 256  # bytes per thread of epilogue spills (the 2026-11-23 H100 run's pick had 16)
VARIANTS = {"llama": {"HAS_KNORM": False, "NEOX": True}, "qwen3_gptj_bias": {"HAS_KNORM": True, "NEOX": False}}


def compile_all() -> list[dict]:
    """Compile every (config, variant) for a head-128 bf16 layer specialized as a real launch is
    (16-byte aligned pointers, strides and hidden divisible by 16, unit last stride)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton_recompute._recompute_kv_kernel
    divisible = ("hidden", "stride_x", "stride_wk", "stride_wv", "stride_cs", "c_s0", "c_s1", "c_s2")
    results = []
    for index, config in enumerate(triton_recompute.TUNE_CONFIGS):
        for variant, flags in VARIANTS.items():
            constexprs = dict(HEAD=128, HEAD_PAD=128, ROT_DIM=128, HAS_BK=flags["HAS_KNORM"],
                              HAS_BV=flags["HAS_KNORM"], FP8_MAX=0.0, DOT_PRECISION="tf32", DOT_F32=False, c_s3=1,
                              **flags, **config.kwargs)
            signature, attrs = {}, {}
            for i, name in enumerate(kernel.arg_names):
                if name in constexprs:
                    signature[name] = "constexpr"
                elif name.endswith("_ptr"):
                    signature[name] = "*i64" if name in ("slot_ptr", "pos_ptr") else "*bf16"
                else:
                    signature[name] = "fp32" if name in ("k_scale", "v_scale", "eps") else "i32"
                if name.endswith("_ptr") or name in divisible:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage, sass = (subprocess.run([str(CUOBJDUMP), flag, cubin.name], capture_output=True, text=True,
                                              check=True).stdout for flag in ("--dump-resource-usage", "-sass"))
            ops = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
            mma = [i for i, op in enumerate(ops) if "MMA" in op]  # HGMMA (wgmma) or HMMA (mma.sync)
            ptx = compiled.asm["ptx"]
            results.append({
                "index": index, "variant": variant, "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
                "loop_spills": sum(("STL" in op or "LDL" in op) for op in ops[mma[0]:mma[-1] + 1]),
                "shared": compiled.metadata.shared,
                "wgmma_n": sorted({int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", ptx)}),
                "tma": "cp.async.bulk.tensor" in ptx,
            })
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[int, str], dict]:
    if not CUOBJDUMP.exists():
        pytest.skip("this Triton wheel has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {(r["index"], r["variant"]): r for r in json.loads(out.stdout.splitlines()[-1])}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("index", range(len(triton_recompute.TUNE_CONFIGS)))
def test_tuning_config_compiles_for_hopper(index: int, variant: str, compiled: dict) -> None:
    config, usage = triton_recompute.TUNE_CONFIGS[index], compiled[(index, variant)]
    # The register tile fills the register file: a few epilogue values may spill, the main loop none.
    assert usage["loop_spills"] == 0, f"{config}: {usage['loop_spills']} local-memory accesses among the MMAs"
    assert usage["stack"] <= MAX_STACK, f"{config}: spills to a {usage['stack']}-byte stack"
    assert usage["shared"] <= triton_recompute._SMEM_BUDGET, f"{config}: {usage['shared']} bytes of shared memory"
    # wgmma takes 64 rows per warpgroup: with enough rows every warpgroup spans the tile's full width.
    if config.kwargs["BLOCK_T"] >= 64 * max(1, config.num_warps // 4):
        assert usage["wgmma_n"] == [config.kwargs["HEADS"] * 128], f"{config}: wgmma N {usage['wgmma_n']}"
    assert usage["tma"] == config.kwargs["TMA"], f"{config}: TMA copies {usage['tma']}"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
