"""The recompute kernel's tuning candidates compiled for Hopper (sm_90) without a GPU, and what the
compiled code looks like: registers spilled, shared memory, wgmma width, TMA copies, and the SASS
counts that say how heavy the epilogue is (shared-memory round trips of layout conversions,
barriers, global stores). Triton's wheel carries its NVIDIA backend and cuobjdump.

Static facts about the binary, not timings. The lent GPUs run Triton 3.6: put an unpacked
triton-3.6.0 wheel first on PYTHONPATH to compile with that version (benchmarks/GPU.md).

    python benchmarks/kernel_sass.py            # a markdown table
    python benchmarks/kernel_sass.py --json     # one JSON list (tests/test_kernel_sm90.py)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before the kernel is decorated: compile, do not interpret
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vllm_partial_kv.kernels import triton_recompute  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# A head-128 bf16 layer: Llama (neox RoPE) and Qwen3 (K-norm, bias, GPT-J RoPE here for coverage).
VARIANTS = {"llama": {"HAS_KNORM": False, "NEOX": True}, "qwen3_gptj_bias": {"HAS_KNORM": True, "NEOX": False}}
# What a real launch specializes on: 16-byte aligned pointers, these divisible by 16, unit last stride.
DIVISIBLE = ("hidden", "stride_x", "stride_wk", "stride_wv", "stride_cs", "stride_y", "c_s0", "c_s1", "c_s2")


def compile_sm90(config: triton.Config, flags: dict, projected: bool) -> dict:
    kernel = triton_recompute._recompute_kv_kernel
    constexprs = dict(HEAD=128, HEAD_PAD=128, ROT_DIM=128, HAS_BK=flags["HAS_KNORM"], HAS_BV=flags["HAS_KNORM"],
                      FP8_MAX=0.0, DOT_PRECISION="tf32", DOT_F32=False, c_s3=1, PROJECTED=projected, X_SCALED=False, **flags,
                      **config.kwargs)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in ("slot_ptr", "pos_ptr") else "*bf16"
        else:
            signature[name] = "fp32" if name in ("k_scale", "v_scale", "eps") else "i32"
        if name.endswith("_ptr") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage, sass = (subprocess.run([str(CUOBJDUMP), flag, cubin.name], capture_output=True, text=True,
                                      check=True).stdout for flag in ("--dump-resource-usage", "-sass"))
    ops = [line.split("*/", 1)[1] for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    ptx = compiled.asm["ptx"]
    return {
        "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "shared": compiled.metadata.shared,
        "wgmma_n": sorted({int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", ptx)}),
        "tma": "cp.async.bulk.tensor" in ptx,
        "sass": len(ops),
        **{op: sum(f" {op}" in line for line in ops) for op in ("LDS", "STS", "BAR", "STG")},
    }


def compile_all() -> list[dict]:
    """Every tuning candidate of the one-pass kernel (by index), then the epilogue that follows a cuBLAS
    GEMM (index None) at its largest tile."""
    epilogue = triton_recompute._epilogue_config(triton_recompute.SPLIT_ROWS)
    warps, stages = epilogue.pop("num_warps"), epilogue.pop("num_stages")
    runs = [(index, config, False) for index, config in enumerate(triton_recompute.TUNE_CONFIGS)]
    runs.append((None, triton.Config(epilogue, num_warps=warps, num_stages=stages), True))
    return [{"index": index, "variant": variant,
             "config": triton_recompute.config_name(config) + (" epilogue" if projected else ""),
             **compile_sm90(config, flags, projected)}
            for index, config, projected in runs for variant, flags in VARIANTS.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args()
    if not CUOBJDUMP.exists():
        sys.exit(f"this Triton wheel ({triton.__version__}) has no NVIDIA backend")
    rows = compile_all()
    if args.json:
        print(json.dumps(rows))
        return
    print(f"Triton {triton.__version__}, sm_90, head 128, bf16; per thread: spill stack bytes; SASS counts\n")
    print("| tile | variant | spill B | smem KiB | wgmma N | TMA | SASS | LDS | STS | BAR | STG |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['variant']} | {r['stack']} | {r['shared'] // 1024} | "
              f"{','.join(map(str, r['wgmma_n'])) or '-'} | {'yes' if r['tma'] else 'no'} | {r['sass']} | "
              f"{r['LDS']} | {r['STS']} | {r['BAR']} | {r['STG']} |")


if __name__ == "__main__":
    main()
