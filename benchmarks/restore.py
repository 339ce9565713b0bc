"""Restore benchmark: vLLM's native CPU offloading vs partial recompute, in one run on one GPU.

For each model shape (random weights, `load_format="dummy"`, token-id prompts) and each system,
a child process starts vLLM and measures, for the same prompts:
  cold    a first prefill (which also offloads the blocks),
  gpu     a GPU prefix-cache hit,
  cpu     a CPU hit: the GPU prefix cache is reset, so every block is restored from the host.
The figure of merit is the extra time of a CPU hit over a GPU hit. Partial recompute is swept
over fixed ratios and "auto" within one engine (the split is chosen per batch on the worker).

    python benchmarks/restore.py --out results/restore.json            # GPU: MHA-7B and GQA-8B
    python benchmarks/restore.py --smoke                               # CPU: tiny model, CI
    python benchmarks/restore.py --replot results/restore.json         # table and plot again (matplotlib)

The JSON and the table are rewritten after every engine, and an engine still measuring when
--budget-s runs out is stopped with the ratios it finished, so a run cut off by a time limit keeps
what it measured. Host and GPU KV sizes default to what the prompts need (--cpu-gib, --gpu-kv-gib).
The plot needs matplotlib, which the lent GPU machine lacks: plot there or later,
with --replot, wherever matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "mha7b": (4096, 32, 32, 32, 11008, 32000),
    "mha13b": (5120, 40, 40, 40, 13824, 32000),
    "gqa8b": (4096, 32, 32, 8, 14336, 128256),
}
# The planner's pick and the two ends first: a sweep cut off by the time budget keeps them.
RATIOS = ["auto", 0.0, 1.0, 0.5, 0.25, 0.75]


def kv_act_bytes(model: Path, elem: int) -> tuple[int, int]:
    """K+V and activation bytes of one token over all layers (the plugin stores both)."""
    cfg = json.loads((model / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers = cfg["num_hidden_layers"]
    kv = 2 * layers * cfg.get("num_key_value_heads", heads) * head * elem
    return kv, layers * cfg["hidden_size"] * elem


def sizes_gib(model: Path, system: str, tokens: int, elem: int) -> tuple[float, float]:
    """Host store and GPU KV cache that hold `tokens` tokens with a margin (whole blocks, the
    sequences' last partial blocks, the plugin's activations next to K/V on the host)."""
    kv, act = kv_act_bytes(model, elem)
    per_token = kv + (act if system == "partial" else 0)
    return round(tokens * per_token * 1.15 / (1 << 30) + 0.25, 2), round(tokens * kv * 1.1 / (1 << 30) + 0.25, 2)


def write_config(root: Path, shape: str) -> Path:
    hidden, layers, heads, kv_heads, inter, vocab = SHAPES[shape]
    path = root / shape
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": inter, "vocab_size": vocab, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child(args) -> None:
    """One engine: measure cold, GPU-hit and CPU-hit times (per ratio for partial recompute). Prints
    a RESULT line after each measurement, so that an engine stopped by the time budget keeps them."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    cuda = torch.cuda.is_available()
    gib = 1 << 30
    if args.system == "native":
        kv_cfg = KVTransferConfig(
            kv_connector="OffloadingConnector", kv_role="kv_both",
            kv_connector_extra_config={"cpu_bytes_to_use": int(args.cpu_gib * gib)},
        )
    else:
        extra = {"cpu_bytes": int(args.cpu_gib * gib), "recompute_ratio": 1.0,
                 "max_recompute_tokens": args.seqs * args.tokens, "async_load": not args.sync_load}
        kv_cfg = KVTransferConfig(
            kv_connector="PartialRecomputeConnector", kv_role="kv_both",
            kv_connector_module_path="vllm_partial_kv.connector", kv_connector_extra_config=extra,
        )
    t0 = time.perf_counter()
    llm = LLM(
        args.model, load_format="dummy" if cuda else "auto", skip_tokenizer_init=cuda,
        dtype="bfloat16" if cuda else "auto", kv_cache_memory_bytes=int(args.gpu_kv_gib * gib),
        max_model_len=args.tokens + 64, max_num_batched_tokens=max(8192, args.tokens),
        block_size=16 if cuda else 32, seed=0, enforce_eager=args.eager,
        kv_transfer_config=kv_cfg,
    )
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(100, 30000 if cuda else 900, (args.tokens,), generator=g).tolist()}
               for _ in range(args.seqs)]
    sp = SamplingParams(temperature=0, max_tokens=1, detokenize=False)

    def run():
        llm.generate(prompts, sp, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()

    def cpu_hit():
        llm.reset_prefix_cache()
        run()

    def emit() -> None:
        print("RESULT " + json.dumps(out), flush=True)

    kv_bytes, _ = kv_act_bytes(Path(args.model), 2 if cuda else 4)
    out = {"system": args.system, "shape": args.shape, "tokens": args.seqs * args.tokens,
           "async_load": args.system == "native" or not args.sync_load, "eager": args.eager,
           "kv_bytes_per_token": kv_bytes, "cpu_gib": args.cpu_gib, "gpu_kv_gib": args.gpu_kv_gib,
           "startup_s": round(time.perf_counter() - t0, 1)}
    out["cold_s"] = _time(run, 1)
    time.sleep(1.0)
    run()  # lets asynchronous stores (native) finish and be acknowledged
    out["gpu_hit_s"] = _time(run, args.repeats)
    if args.system == "native":
        cpu_hit()  # warm-up of the load path
        out["cpu_hit_s"] = _time(cpu_hit, args.repeats)
        emit()
        return
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    worker = get_kv_transfer_group().worker
    profiles = worker._load_profiles()
    out["sweep"] = []
    for ratio in args.ratios:
        auto = ratio == "auto"
        worker.cfg = worker.cfg.__class__(**{**worker.cfg.__dict__, "recompute_ratio": None if auto else ratio})
        worker.profiles = profiles
        cpu_hit()  # warm-up (Triton autotune, first-touch)
        before = dict(worker.totals.data)
        t = _time(cpu_hit, args.repeats)
        moved = {k: worker.totals.data[k] - before[k]
                 for k in ("tokens_loaded", "tokens_recomputed", "bytes_to_device")}
        out["sweep"].append({
            "ratio": ratio, "cpu_hit_s": t,
            "recompute_fraction": moved["tokens_recomputed"] / max(moved["tokens_loaded"], 1),
            "bytes_to_device": moved["bytes_to_device"] // args.repeats,
            "bytes_per_token": moved["bytes_to_device"] / max(moved["tokens_loaded"], 1),
        })
        emit()


def parent(args, t_start: float) -> None:
    """Children one after the other, until --budget-s (counted from this process's start) is spent."""
    import torch

    cuda = torch.cuda.is_available()
    root = Path(tempfile.mkdtemp(prefix="restore-bench-"))
    results = []
    if args.smoke:
        from vllm_partial_kv.tiny_models import make_tiny_model

        model = args.model or str(make_tiny_model(root / "tiny", "llama2"))
        jobs = [("tiny", model, "partial")]
    else:
        if not cuda:
            sys.exit("error: the full benchmark needs a GPU; use --smoke on a CPU machine")
        jobs = [(s, str(write_config(root, s)), system) for s in args.shapes.split(",")
                for system in ("native", "partial")]
    for shape, model, system in jobs:
        left = args.budget_s - (time.time() - t_start)
        if left <= 0:
            print(f"time budget spent: skipping {shape}/{system}", flush=True)
            continue
        cpu_gib, gpu_kv_gib = sizes_gib(Path(model), system, args.seqs * args.tokens, 2 if cuda else 4)
        cmd = [sys.executable, __file__, "--child", "--model", model, "--shape", shape,
               "--system", system, "--seqs", str(args.seqs), "--tokens", str(args.tokens),
               "--cpu-gib", str(args.cpu_gib or cpu_gib), "--gpu-kv-gib", str(args.gpu_kv_gib or gpu_kv_gib),
               "--repeats", str(args.repeats), "--ratios", ",".join(map(str, args.ratios))] + (
                   ["--eager"] if args.eager else []) + (["--sync-load"] if args.sync_load else [])
        t0 = time.time()
        print(f"{shape}/{system}: starting ({left:.0f} s of the budget left)", flush=True)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=left)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:  # keeps what the engine printed before it was stopped
            stdout, stderr, rc = (_text(exc.stdout), _text(exc.stderr), "stopped at the time budget")
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if rc != 0:
            print(f"{shape}/{system} failed (exit {rc}):\n{stderr[-4000:]}", flush=True)
        if not lines:
            continue
        res = json.loads(lines[-1][7:])
        res["child_wall_s"] = round(time.time() - t0, 1)
        if rc != 0:
            res["stopped"] = str(rc)
        results.append(res)
        print(json.dumps(res), flush=True)
        if args.out:
            save(Path(args.out), {"results": results, "device": _device()})
    print(summarize(results))
    if args.out and not plot(results, Path(args.out).with_suffix(".png")):
        print(f"no matplotlib here: plot with `python {Path(__file__).name} --replot {args.out}` where it is")
    if args.smoke and not results:
        sys.exit(1)


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def save(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(summarize(data["results"]))


def replot(path: Path) -> None:
    """Table and plot from a saved run (e.g. fetched from the GPU machine)."""
    data = json.loads(path.read_text())
    save(path, data)
    if not plot(data["results"], path.with_suffix(".png")):
        sys.exit(f"wrote {path.with_suffix('.md')}; the plot needs matplotlib (pip install matplotlib)")
    print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.processor() or platform.machine()}"


def summarize(results: list[dict]) -> str:
    rows = ["| shape | system | ratio | CPU-hit s | GPU-hit s | extra s | vs native | recomputed | GB to GPU |",
            "|---|---|---|---|---|---|---|---|---|"]
    native = {r["shape"]: r["cpu_hit_s"] - r["gpu_hit_s"] for r in results if r["system"] == "native"}
    for r in results:
        base = native.get(r["shape"])
        entries = r.get("sweep") or [{"ratio": "-", "cpu_hit_s": r["cpu_hit_s"], "recompute_fraction": 0.0}]
        for e in entries:
            extra = e["cpu_hit_s"] - r["gpu_hit_s"]
            vs = f"{extra / base:.2f}x" if base else "-"
            gb = f"{e['bytes_to_device'] / 1e9:.2f}" if "bytes_to_device" in e else "-"
            rows.append(f"| {r['shape']} | {r['system']} | {e['ratio']} | {e['cpu_hit_s']:.3f} | "
                        f"{r['gpu_hit_s']:.3f} | {extra:.3f} | {vs} | {e['recompute_fraction']:.2f} | {gb} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path) -> bool:
    """Restore extra time against the recomputed fraction, per shape, with native offload and the
    planner's pick; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    native = {r["shape"]: r["cpu_hit_s"] - r["gpu_hit_s"] for r in results if r["system"] == "native"}
    for r in results:
        if not r.get("sweep"):
            continue
        fixed = [e for e in r["sweep"] if e["ratio"] != "auto"]
        line, = ax.plot([e["recompute_fraction"] for e in fixed],
                        [(e["cpu_hit_s"] - r["gpu_hit_s"]) * 1e3 for e in fixed], "o-", label=f"{r['shape']} partial")
        for e in r["sweep"]:
            if e["ratio"] == "auto":
                ax.plot([e["recompute_fraction"]], [(e["cpu_hit_s"] - r["gpu_hit_s"]) * 1e3], "*",
                        ms=14, color=line.get_color(), label=f"{r['shape']} auto")
        if r["shape"] in native:
            ax.axhline(native[r["shape"]] * 1e3, ls="--", color=line.get_color(), label=f"{r['shape']} native")
    ax.set_xlabel("recomputed fraction r/n")
    ax.set_ylabel("restore extra time over a GPU hit (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _ratios(text: str) -> list:
    """"auto,0,0.5" -> ["auto", 0.0, 0.5]"""
    return [r if r == "auto" else float(r) for r in text.split(",")]


def main() -> None:
    t_start = time.time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="mha7b,gqa8b")
    p.add_argument("--seqs", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--cpu-gib", type=float, help="host store size (default: what the prompts need)")
    p.add_argument("--gpu-kv-gib", type=float, help="GPU KV cache size (default: what the prompts need)")
    p.add_argument("--ratios", type=_ratios, default=RATIOS, help="partial recompute sweep, e.g. auto,0,1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="skip torch.compile and CUDA graphs")
    p.add_argument("--budget-s", type=float, default=480,
                   help="stop here: later engines are skipped, the running one keeps what it measured")
    p.add_argument("--sync-load", action="store_true",
                   help="partial recompute restores inside the step (async_load: false)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (CI)")
    p.add_argument("--out")
    p.add_argument("--replot", type=Path, help="rewrite the table and plot of a saved --out JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help="with --smoke: a tiny model already built (else one is made)")
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.seqs, args.tokens, args.cpu_gib, args.gpu_kv_gib, args.repeats = 2, 512, 0.25, 0.0625, 1
    if args.replot:
        replot(args.replot)
    elif args.child:
        child(args)
    else:
        parent(args, t_start)


if __name__ == "__main__":
    main()
