"""Fused K/V recompute vs the unfused path vs the bare GEMM, at real layer shapes on one GPU.

"recompute" is what the plugin runs (`recompute_kv(backend="triton")`): the faster, timed once per
shape (as the plugin does at start-up), of its two ways, both also timed here: the one-pass Triton kernel (projection and
epilogue in one kernel, tile autotuned) and the cuBLAS GEMM followed by the kernel's epilogue alone.
The unfused path is what the plugin would do without Triton: one cuBLAS GEMM against the merged
[W_k; W_v], RoPE on K in torch, then a paged-cache write. The bare GEMM is the floor all chase.
Prints a markdown table (time ratios < 1 mean the recompute is faster) and writes JSON to --out
after every row. `--smoke` runs the same code on the CPU (Triton's interpreter, a tiny shape,
wall-clock timing): a check that the benchmark runs, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vllm_partial_kv.kernels import recompute_kv  # noqa: E402
from vllm_partial_kv.kernels import triton_recompute  # noqa: E402
from vllm_partial_kv.kernels.reference import apply_rope  # noqa: E402

SHAPES = {"MHA-7B": (4096, 32, 128), "MHA-13B": (5120, 40, 128), "GQA-8B": (4096, 8, 128)}  # hidden, kv heads, head
SMOKE_SHAPE = {"tiny": (128, 2, 32)}
TOKENS = (256, 1024, 4096, 16384, 65536)
BLOCK_SIZE = 16
MAX_POSITION = 131072
DTYPE = torch.bfloat16

CacheWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def cache_writer(device: torch.device) -> tuple[str, CacheWrite]:
    """vLLM's reshape_and_cache_flash when vLLM's CUDA build is installed, else torch index_copy_."""
    try:
        if device.type != "cuda":
            raise ImportError("vLLM's cache kernels need a GPU")
        import vllm._C  # noqa: F401  (registers torch.ops._C_cache_ops)

        op = torch.ops._C_cache_ops.reshape_and_cache_flash
        one = torch.ones((), device=device)
        return "vllm reshape_and_cache_flash", lambda k, v, kc, vc, s: op(k, v, kc, vc, s, "auto", one, one)
    except (ImportError, AttributeError, RuntimeError):
        def write(k, v, kc, vc, s):
            kc.flatten(0, 1).index_copy_(0, s, k)
            vc.flatten(0, 1).index_copy_(0, s, v)
        return "torch index_copy_", write


def input_sets(T: int, hidden: int, num_blocks: int, n: int, device: torch.device) -> list[dict]:
    """Distinct activations, positions and block tables, cycled between timed calls."""
    sets = []
    for _ in range(n):
        blocks = torch.randperm(num_blocks, device=device)[: triton.cdiv(T, BLOCK_SIZE)]
        t = torch.arange(T, device=device)
        sets.append({
            "x": torch.randn(T, hidden, device=device, dtype=DTYPE),
            "positions": torch.randint(0, MAX_POSITION, (T,), device=device),
            "slot_mapping": blocks[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE,
        })
    return sets


def wall_clock_ms(fn: Callable[[], None]) -> float:
    """The smoke run's timer (do_bench needs CUDA): median of three calls after one warm-up."""
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_shape(name: str, hidden: int, heads: int, head: int, T: int, write: CacheWrite,
                device: torch.device) -> dict:
    kv_dim = heads * head
    num_blocks = triton.cdiv(T, BLOCK_SIZE) + 64
    sets = input_sets(T, hidden, num_blocks, 4 if T <= 4096 else 2, device)
    w_kv = [torch.randn(2 * kv_dim, hidden, device=device, dtype=DTYPE) * hidden**-0.5 for _ in range(2)]
    inv_freq = 1.0 / 500000 ** (torch.arange(0, head, 2, device=device, dtype=torch.float32) / head)
    freqs = torch.outer(torch.arange(MAX_POSITION, device=device, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DTYPE)
    kv = torch.zeros(2, num_blocks, BLOCK_SIZE, heads, head, device=device, dtype=DTYPE)
    gemm_out = torch.empty(T, 2 * kv_dim, device=device, dtype=DTYPE)
    inputs = list(itertools.product(sets, w_kv))

    def recompute(s: dict, w: torch.Tensor) -> None:  # what the plugin runs: the pick tuned at start-up
        recompute_kv(s["x"], w[:kv_dim], w[kv_dim:], kv[0], kv[1], s["slot_mapping"], s["positions"], cos_sin,
                     backend="triton", tune=device.type == "cuda")  # the interpreter has no device to time

    def way(mode: str) -> Callable[[dict, torch.Tensor], None]:
        return lambda s, w: triton_recompute.recompute_kv_triton(
            s["x"], w[:kv_dim], w[kv_dim:], kv[0], kv[1], s["slot_mapping"], s["positions"], cos_sin, True,
            None, None, None, 1e-6, None, None, mode=mode)

    def gemm(s: dict, w: torch.Tensor) -> None:
        torch.mm(s["x"], w.t(), out=gemm_out)

    def unfused(s: dict, w: torch.Tensor) -> None:
        gemm(s, w)
        k = apply_rope(gemm_out[:, :kv_dim].view(T, heads, head), s["positions"], cos_sin, True)
        write(k, gemm_out[:, kv_dim:].view(T, heads, head), kv[0], kv[1], s["slot_mapping"])

    # Correctness once per shape, before any timing: each way vs the torch backend (fp32 compute).
    ref = torch.zeros_like(kv)
    s, w = inputs[0]
    tuner = triton_recompute._tuned_kernel
    tuner.configs_timings = None
    picked = dict(triton_recompute._modes)
    recompute(s, w)  # tunes this shape's key (every candidate tile is timed), then times the two ways
    candidates = candidate_times(getattr(tuner, "configs_timings", None))
    (mode,) = [m for k, m in triton_recompute._modes.items() if k not in picked] or ["?"]
    recompute_kv(s["x"], w[:kv_dim], w[kv_dim:], ref[0], ref[1], s["slot_mapping"], s["positions"], cos_sin,
                 backend="torch")
    rel_err = {}
    for m in ("fused", "split"):
        kv.zero_()
        way(m)(s, w)
        rel_err[m] = ((kv.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel_err[m] < 1e-2, f"{name} T={T}: {m} vs torch rel error {rel_err[m]:.2e}"
    del ref

    def timed(fn: Callable[[dict, torch.Tensor], None]) -> float:
        cycle = itertools.cycle(inputs)
        if device.type != "cuda":
            return wall_clock_ms(lambda: fn(*next(cycle)))
        return do_bench(lambda: fn(*next(cycle)), return_mode="median")

    times = {"fused": timed(recompute), "one_pass": timed(way("fused")), "split": timed(way("split")),
             "unfused": timed(unfused), "gemm": timed(gemm)}
    flops = 2 * T * hidden * 2 * kv_dim
    return {
        "shape": name, "hidden": hidden, "kv_heads": heads, "head_size": head, "T": T,
        **{f"{k}_ms": v for k, v in times.items()},
        **{f"{k}_tflops": flops / v / 1e9 for k, v in times.items()},
        "fused_over_gemm": times["fused"] / times["gemm"],
        "fused_over_unfused": times["fused"] / times["unfused"],
        "mode": mode,
        "config": triton_recompute.config_name(tuner.best_config) if candidates else "fixed (not tuned)",
        "candidates_ms": candidates,
        "rel_err_vs_torch": rel_err,
    }


def candidate_times(timings: dict | None) -> dict[str, float] | None:
    """The autotuner's median ms per candidate tile (None where it did not tune, e.g. below TUNE_MIN_T)."""
    if not timings:
        return None
    return {triton_recompute.config_name(c): t[0] if isinstance(t, (list, tuple)) else t for c, t in timings.items()}


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | T | recompute ms | TFLOP/s | way | one-pass ms | GEMM+epilogue ms | unfused ms | GEMM ms "
             "| TFLOP/s | recompute/GEMM | recompute/unfused | one-pass tile |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['T']} | {r['fused_ms']:.3f} | {r['fused_tflops']:.0f} | {r['mode']} "
                     f"| {r['one_pass_ms']:.3f} | {r['split_ms']:.3f} | {r['unfused_ms']:.3f} | {r['gemm_ms']:.3f} "
                     f"| {r['gemm_tflops']:.0f} | {r['fused_over_gemm']:.2f} | {r['fused_over_unfused']:.2f} "
                     f"| {r['config']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shape (CI)")
    args = parser.parse_args()
    shapes = SHAPES
    if args.smoke:
        if not triton_recompute.INTERPRET:
            sys.exit("--smoke runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
        shapes, args.shapes, args.tokens = SMOKE_SHAPE, list(SMOKE_SHAPE), [64]
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernel.py needs a CUDA GPU (--smoke runs it on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")

    writer_name, write = cache_writer(device)
    triton_recompute._tuned_kernel.cache_results = False  # tune here, so every candidate gets timed
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)",
            "torch": torch.__version__, "triton": triton.__version__,
            "dtype": str(DTYPE), "block_size": BLOCK_SIZE, "layout": "FlashAttention [2, blocks, 16, H, D]",
            "rope": "neox, full head", "unfused_cache_write": writer_name,
            "unfused_rope": "torch (reference.apply_rope)",
            "timing": ("triton.testing.do_bench median, L2 flushed per call, inputs rotated" if device.type == "cuda"
                       else "wall clock, median of 3 (smoke: not a measurement)"),
            "ratios": "time ratios: < 1 means the recompute is faster"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.shapes:
        for T in args.tokens:
            row = bench_shape(name, *shapes[name], T, write, device)
            rows.append(row)
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))  # a cut-off run keeps its rows
            print(f"{name} T={T}: recompute {row['fused_ms']:.3f} ms ({row['fused_tflops']:.0f} TFLOP/s, "
                  f"{row['mode']}; one-pass {row['one_pass_ms']:.3f}, GEMM+epilogue {row['split_ms']:.3f}), "
                  f"GEMM {row['gemm_ms']:.3f} ms, unfused {row['unfused_ms']:.3f} ms, {row['config']}", flush=True)
            for tile, ms in sorted((row["candidates_ms"] or {}).items(), key=lambda kv: kv[1])[:4]:
                print(f"    {ms:.3f} ms  {tile}")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"\nrecompute = recompute_kv(backend='triton'), way = its pick (fused: one-pass kernel, split: cuBLAS GEMM "
          f"+ epilogue); unfused = cuBLAS GEMM + torch RoPE + {writer_name}; {meta['device']}, bf16, "
          f"TFLOP/s counts 2*T*hidden*N per projection; ratios are time ratios (<1: recompute faster)\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
