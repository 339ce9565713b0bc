"""Part 1 of the GPU acceptance run: correctness of real vLLM engines with the plugin, in one process.

Each engine, named ARCH:KV_CACHE_DTYPE:plugin|baseline|plugin-vllm-sized, runs in this process (vLLM
in-process, so that the checks can read the worker's caches) under vLLM's defaults on a GPU (bf16,
torch.compile, FULL_AND_PIECEWISE CUDA graphs, block size 16); on the CPU build eager, block size 32
(smoke). The KV cache is sized to CACHE_TOKENS, except for "plugin-vllm-sized": the plugin under vLLM's
own memory sizing (no kv_cache_memory_bytes; from gpu_memory_utilization, or on vLLM 0.34 from the
memory left after warm-up and CUDA-graph capture, where the connector is created only then; on the
CPU build from VLLM_CPU_KVCACHE_SPACE). It prints one `RESULT {json}` line per finished check, so that
a run stopped at its time limit keeps them:

  kv        (plugin) restored K/V equal to the originals on the paged cache for r = 0, n/2 and n,
            for a prompt shorter than vLLM's largest piecewise CUDA-graph size (its prefill is
            replayed from a graph) and one longer (compiled, no graph); the same greedy tokens
  eviction  interleaved conversations in a GPU cache of about two of them: later turns restore
            from the host (asynchronously, r = n/2); the tokens, which `gpu_acceptance.py`
            compares with the baseline engine's (the same model without the connector). Under
            vLLM's own sizing the cache holds them all: the same tokens, nothing need be restored

The test helpers are those of tests/test_restore.py, which runs the same checks in the suite.

    python benchmarks/acceptance_checks.py --models-dir DIR --engines llama2:auto:plugin,llama2:auto:baseline
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the checks read the worker's tensors

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # a checkout without installing; the tests' helpers

CACHE_TOKENS = 2048  # the eviction case's GPU cache: about two of its four conversations
MAX_MODEL_LEN = 1024
RATIOS = (0.0, 0.5, 1.0)


def emit(engine: str, check: str, **fields) -> None:
    print("RESULT " + json.dumps({"engine": engine, "check": check, **fields}), flush=True)


def make_engine(model: Path, kv_dtype: str, plugin: bool, gpu_memory_utilization: float, sized_by_vllm: bool = False):
    import torch
    from test_restore import _connector_cfg, _kv_bytes

    from vllm import LLM

    cuda = torch.cuda.is_available()
    kwargs = dict(model=str(model), kv_cache_dtype=kv_dtype, max_model_len=MAX_MODEL_LEN, seed=0,
                  disable_log_stats=True)
    if not sized_by_vllm:
        kwargs["kv_cache_memory_bytes"] = _kv_bytes(model, CACHE_TOKENS)
    elif not cuda:  # vLLM's CPU sizing asks for most of the RAM otherwise
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if cuda:  # vLLM's defaults otherwise: torch.compile, FULL_AND_PIECEWISE graphs, block size 16
        kwargs.update(dtype="bfloat16", gpu_memory_utilization=gpu_memory_utilization)
    else:  # the model's float32 (the cache size assumes it); CPU attention needs blocks of 32;
        # torch.compile costs 25-60 s per engine on 2 cores
        kwargs.update(dtype="float32", block_size=32, enforce_eager=True)
    if plugin:
        kwargs["kv_transfer_config"] = _connector_cfg(0.5)
    return LLM(**kwargs)


def engine_facts(llm) -> dict:
    """What vLLM actually ran with: the checks mean little if it fell back to eager."""
    cfg = llm.llm_engine.vllm_config
    comp = cfg.compilation_config
    sizes = list(getattr(comp, "cudagraph_capture_sizes", None) or [])
    cache = cfg.cache_config
    return {"dtype": str(cfg.model_config.dtype).removeprefix("torch."), "block_size": cache.block_size,
            "kv_cache_dtype": cache.cache_dtype, "enforce_eager": cfg.model_config.enforce_eager,
            "cudagraph_mode": str(getattr(comp, "cudagraph_mode", None)), "max_capture_size": max(sizes, default=0),
            "kv_cache_memory_bytes": cache.kv_cache_memory_bytes, "num_gpu_blocks": cache.num_gpu_blocks,
            "extensible_kv_cache": getattr(cache, "enable_extensible_kv_cache", None)}


def check_kv(engine: str, llm, kv_dtype: str, max_capture: int) -> None:
    from test_restore import _corrupted_row_shows, _prompt, _restored_kv_error, _worker

    from vllm import SamplingParams

    worker = _worker()
    runtime, bs = worker.runtime, worker.block_size
    short = 9 * bs + 5
    lengths = {"short": short, "long": min(max(max_capture, short) + 3 * bs + 5, MAX_MODEL_LEN - 8)}
    sp = SamplingParams(temperature=0, max_tokens=4)
    for label, n_tokens in lengths.items():
        prompt = _prompt(len(label), n_tokens)
        first = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        for ratio in RATIOS:
            t0 = time.perf_counter()
            worker.cfg = worker.cfg.__class__(**{**worker.cfg.__dict__, "recompute_ratio": ratio})
            llm.reset_prefix_cache()  # drop the GPU copies; the host store keeps them
            again = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
            (load,) = runtime.last_loads
            worst, tol = _restored_kv_error(runtime, load, kv_dtype)
            blocks, want = len(load.block_ids), n_tokens // bs
            ok = (list(again) == list(first) and blocks == want
                  and abs(load.recompute_blocks - ratio * blocks) <= 0.5 and worst < tol)
            emit(engine, "kv", prompt=label, tokens=n_tokens, above_capture=n_tokens > max_capture, ratio=ratio,
                 blocks=blocks, expected_blocks=want, recomputed_blocks=load.recompute_blocks,
                 rel_err=worst, tol=tol, same_tokens=list(again) == list(first),
                 asynchronous=runtime.last_waited == [], seconds=round(time.perf_counter() - t0, 2), ok=ok)
    # The comparison can fail: one corrupted activation row shows up in the recomputed K/V (r = n).
    diff = _corrupted_row_shows(llm, runtime, prompt, sp, kv_dtype)
    emit(engine, "kv_detects_corruption", max_abs_diff=diff, ok=diff > 1e-2)


def check_eviction(engine: str, llm, plugin: bool, conversations: int, turns: int, must_restore: bool = True) -> None:
    from test_restore import _conversations, _worker

    from vllm import SamplingParams

    t0 = time.perf_counter()
    if plugin:
        worker = _worker()
        worker.cfg = worker.cfg.__class__(**{**worker.cfg.__dict__, "recompute_ratio": 0.5})
        before = dict(worker.totals.data)
    tokens = _conversations(llm, conversations, turns, SamplingParams(temperature=0, max_tokens=24))
    fields = {}
    if plugin:
        moved = {k: worker.totals.data[k] - before[k] for k in ("tokens_loaded", "tokens_recomputed")}
        fields = {**moved, "async_load": worker.cfg.async_load, "ok": moved["tokens_loaded"] > 0 or not must_restore}
    emit(engine, "eviction", tokens=tokens, seconds=round(time.perf_counter() - t0, 2), **fields)


def run_engine(spec: str, models_dir: Path, args) -> None:
    import torch
    from test_restore import _fp8_cache_available

    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    arch, kv_dtype, role = spec.split(":")
    if kv_dtype.startswith("fp8") and not _fp8_cache_available():
        emit(spec, "skipped", reason="vLLM's CPU attention needs AVX-512 or AMX for fp8 caches")
        return
    t0 = time.perf_counter()
    plugin, sized_by_vllm = role.startswith("plugin"), role == "plugin-vllm-sized"
    llm = make_engine(models_dir / arch, kv_dtype, plugin, args.gpu_memory_utilization, sized_by_vllm)
    facts = engine_facts(llm)
    emit(spec, "engine", startup_s=round(time.perf_counter() - t0, 1), sized_by_vllm=sized_by_vllm, **facts)
    if plugin:
        check_kv(spec, llm, kv_dtype, facts["max_capture_size"])
    if kv_dtype == "auto":
        check_eviction(spec, llm, plugin, args.conversations, args.turns, must_restore=not sized_by_vllm)
    del llm
    gc.collect()
    ensure_kv_transfer_shutdown()  # the next engine in this process must not find this one's connector
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, required=True, help="tiny models by arch (make_tiny_model)")
    p.add_argument("--engines", required=True,
                   help="comma-separated ARCH:KV_CACHE_DTYPE:plugin|baseline|plugin-vllm-sized")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.15,
                   help="per engine: several run side by side on one GPU")
    args = p.parse_args()
    for spec in args.engines.split(","):
        try:
            run_engine(spec, args.models_dir, args)
        except Exception as exc:  # the next engine may still pass; the parent marks this one failed
            import traceback

            traceback.print_exc()
            emit(spec, "error", error=f"{type(exc).__name__}: {exc}"[:2000], ok=False)


if __name__ == "__main__":
    main()
