"""Serving benchmark: multi-turn conversations against a real `vllm serve`, one server per system.

The workload has the shape of LMCache's multi-round QA benchmark: N users share a system prompt,
each has a document of their own, and in every round each user asks one more question, so the
histories grow; the users' histories together are several times the GPU KV cache, so by the time
a user comes back their KV has left the GPU. Requests are token-id prompts on the completions
endpoint (`--load-format dummy` weights need no tokenizer); an answer is a fixed number of tokens
(`ignore_eos`), and the next round's prompt appends synthetic answer tokens of that length, so all
systems see identical prompts. The client is vLLM's own benchmark client
(`vllm.benchmarks.lib.endpoint_request_func`, streaming, TTFT and inter-token latencies).

Systems: `none` (no offloading), `native` (vLLM's `--kv-offloading-backend native`; CUDA only:
vLLM refuses it on the CPU platform), `partial-auto` (this plugin, planner picks the split),
`partial-r0` (this plugin, `recompute_ratio` 0: plain KV offload through the plugin), `partial-fp8`
(this plugin, planner's split, `host_format` fp8),
`partial-storage` (as `partial-auto`, with the storage tier in a fresh directory under `--storage-dir`).

Per system and round: TTFT p50/p90/p99, inter-token latency p50/p90, output throughput, prefix-cache
hit rates from vLLM's own `/metrics` (GPU prefix cache and the connector's "external" one), and
the plugin's counters.

    python benchmarks/serve.py --out benchmarks/results/serve.json     # GPU: MHA-7B shape
    python benchmarks/serve.py --smoke --out /tmp/serve.json           # CPU: tiny model, CI
    python benchmarks/serve.py --replot benchmarks/results/serve.json  # table and PNG again
    python benchmarks/serve.py --systems partial-auto --append a.json  # a saved run plus more systems

The JSON and the table are rewritten after every system, so a run cut off by a time limit keeps
what it measured. The PNG (TTFT p50 by round, one line per system) needs matplotlib; where it is
missing (the lent GPU machine, the CPU CI venv) the run says so and `--replot` draws it later.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from restore import SHAPES, _device, write_config  # noqa: E402

from vllm_partial_kv.server import Server, free_port, metric_sum  # noqa: E402

SYSTEMS = ("none", "native", "partial-auto", "partial-r0", "partial-fp8", "partial-storage")
PROM = {  # key in the results -> vLLM metric (counters, read as per-round deltas)
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "external_queries": "vllm:external_prefix_cache_queries_total",
    "external_hits": "vllm:external_prefix_cache_hits_total",
    "tokens_loaded": "vllm:partial_kv_tokens_loaded_total",
    "tokens_recomputed": "vllm:partial_kv_tokens_recomputed_total",
    "tokens_stored": "vllm:partial_kv_tokens_stored_total",
    "restore_failures": "vllm:partial_kv_restore_failures_total",
    "storage_hit_blocks": "vllm:partial_kv_storage_hit_blocks_total",
    "storage_blocks_read": "vllm:partial_kv_storage_blocks_read_total",
}


def conversations(args) -> tuple[list[int], list[list[int]], list[list[list[int]]], list[list[int]]]:
    """Token ids: the shared system prompt, each user's document, each user's question per round,
    each user's synthetic answer per round (appended to the history for the next round)."""
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, args.vocab) for _ in range(n)]

    system = ids(args.system_tokens)
    docs = [ids(args.doc_tokens) for _ in range(args.users)]
    questions = [[ids(args.question_tokens) for _ in range(args.rounds)] for _ in range(args.users)]
    answers = [ids(args.answer_tokens) for _ in range(args.users)]
    return system, docs, questions, answers


def prompt(conv, user: int, round_: int) -> list[int]:
    system, docs, questions, answers = conv
    out = system + docs[user]
    for r in range(round_ + 1):
        out += questions[user][r]
        if r < round_:
            out += answers[user]
    return out


def server_command(args, system: str, model: Path, port: int) -> list[str] | str:
    """The `vllm serve` command for a system, or why it cannot run here."""
    import torch

    cuda = torch.cuda.is_available()
    kv_bytes = int(args.gpu_kv_gib * 2**30)
    cmd = [sys.executable, "-m", "vllm_partial_kv.cli", "serve", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
           "--max-model-len", str(len(prompt(args.conv, 0, args.rounds - 1)) + args.answer_tokens + 64),
           "--kv-cache-memory-bytes", str(kv_bytes), "--seed", "0", "--skip-tokenizer-init",
           "--max-num-seqs", str(max(args.concurrency, 8))]
    if cuda:
        cmd += ["--load-format", "dummy", "--dtype", "bfloat16", "--block-size", "16"]
    else:
        cmd += ["--dtype", "float32", "--block-size", "32", "--enforce-eager"]
    if args.eager and cuda:
        cmd += ["--enforce-eager"]
    if system == "none":
        return cmd + ["--kv-offload", "none"]
    if system == "native":
        if not cuda:
            return "vLLM's native offloading runs on CUDA only (it refuses the CPU platform)"
        return cmd + ["--kv-offload", "none", "--kv-offloading-backend", "native",
                      "--kv-offloading-size", str(args.cpu_gib)]
    if system == "partial-storage":
        storage_dir = tempfile.mkdtemp(prefix="kv-", dir=args.storage_dir)
        extra = {"cpu_bytes": int(args.cpu_gib * 2**30), "storage_dir": storage_dir}
        return cmd + ["--kv-offload", "none", "--kv-transfer-config", json.dumps({
            "kv_connector": "PartialRecomputeConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra})]
    cmd += ["--kv-offload", "partial-recompute", "--kv-offload-size", str(args.cpu_gib)]
    return cmd + (["--recompute-ratio", "0"] if system == "partial-r0" else []) + (
        ["--host-format", "fp8"] if system == "partial-fp8" else [])


def scrape(server: Server) -> dict[str, float]:
    text = server.metrics()
    return {key: metric_sum(text, name) for key, name in PROM.items()}


def run_round(args, base_url: str, round_: int) -> dict:
    """Every user's next question, `concurrency` requests at a time, users in a fixed order (so
    that a user's KV has been pushed off the GPU by the others' when they come back)."""
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_completions,
    )

    async def main():
        gate = asyncio.Semaphore(args.concurrency)
        timeout = aiohttp.ClientTimeout(total=3600)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one(user: int):
                ids = prompt(args.conv, user, round_)
                req = RequestFuncInput(prompt=ids, api_url=f"{base_url}/v1/completions",
                                       prompt_len=len(ids), output_len=args.answer_tokens,
                                       model="bench", ignore_eos=True,
                                       extra_body={"temperature": 0.0})
                async with gate:
                    return await async_request_openai_completions(req, session)

            start = time.perf_counter()
            outs = []
            for user in range(args.users):  # submitted in order; the gate keeps them in order
                outs.append(asyncio.create_task(one(user)))
                await asyncio.sleep(0)
            outs = [await o for o in outs]
            return outs, time.perf_counter() - start

    outs, wall = asyncio.run(main())
    failed = [o.error.strip().splitlines()[-1] if o.error else "no tokens" for o in outs if not o.success]
    ok = [o for o in outs if o.success]
    ttft = [o.ttft for o in ok]
    itl = [x for o in ok for x in o.itl]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {
        "round": round_ + 1, "requests": len(outs), "failed": len(failed), "errors": failed[:3],
        "prompt_tokens_mean": float(np.mean([o.prompt_len for o in ok])) if ok else None,
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50), "itl_p90_s": pct(itl, 90),
        "output_tok_per_s": sum(o.output_tokens or 0 for o in ok) / wall, "wall_s": wall,
    }


def run_system(args, system: str, model: Path, work: Path) -> dict:
    port = free_port()
    cmd = server_command(args, system, model, port)
    if isinstance(cmd, str):
        print(f"[serve] {system}: skipped: {cmd}", flush=True)
        return {"system": system, "skipped": cmd}
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log = work / f"{system}.log"
    with Server(cmd, port, log, env=env, ready_timeout_s=args.ready_timeout_s) as server:
        print(f"[serve] {system}: ready after {server.ready_after_s:.0f} s", flush=True)
        rounds, before = [], scrape(server)
        for r in range(args.rounds):
            out = run_round(args, server.base_url, r)
            after = scrape(server)
            delta = {k: after[k] - before[k] for k in PROM}
            before = after
            out["prefix_hit_rate"] = delta["prefix_hits"] / delta["prefix_queries"] if delta["prefix_queries"] else None
            out["external_hit_rate"] = (delta["external_hits"] / delta["external_queries"]
                                        if delta["external_queries"] else None)
            out.update({k: delta[k] for k in ("tokens_loaded", "tokens_recomputed", "tokens_stored", "restore_failures",
                                              "storage_hit_blocks", "storage_blocks_read")})
            rounds.append(out)
            print(f"[serve] {system} round {r + 1}: TTFT p50 {_ms(out['ttft_p50_s'])} ms, "
                  f"p90 {_ms(out['ttft_p90_s'])} ms, {out['failed']} failed, prefix hits "
                  f"{_pct(out['prefix_hit_rate'])}, external hits {_pct(out['external_hit_rate'])}", flush=True)
    return {"system": system, "ready_s": server.ready_after_s, "rounds": rounds}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def summarize(data: dict) -> str:
    rows = ["| system | round | TTFT p50 ms | p90 | p99 | ITL p50 ms | p90 | out tok/s | prefix hits | external hits | "
            "tokens loaded | recomputed | failed |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in data["results"]:
        if "skipped" in res:
            rows.append(f"| {res['system']} | skipped: {res['skipped']} |" + " |" * 11)
            continue
        for r in res["rounds"]:
            rows.append(
                f"| {res['system']} | {r['round']} | {_ms(r['ttft_p50_s'])} | {_ms(r['ttft_p90_s'])} | "
                f"{_ms(r['ttft_p99_s'])} | {_ms(r['itl_p50_s'])} | {_ms(r['itl_p90_s'])} | "
                f"{r['output_tok_per_s']:.1f} | {_pct(r['prefix_hit_rate'])} | {_pct(r['external_hit_rate'])} | "
                f"{r['tokens_loaded']:.0f} | {r['tokens_recomputed']:.0f} | {r['failed']} |")
    return "\n".join(rows)


def plot(data: dict, path: Path) -> bool:
    """TTFT p50 by round, one line per system; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in data["results"]:
        if "rounds" in res:
            rounds = [r for r in res["rounds"] if r["ttft_p50_s"] is not None]
            ax.plot([r["round"] for r in rounds], [r["ttft_p50_s"] * 1e3 for r in rounds], "o-", label=res["system"])
    ax.set_xlabel("round (1: cold; later: returning conversations)")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title(data.get("title", ""), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(summarize(data) + "\n")


def replot(path: Path) -> None:
    data = json.loads(path.read_text())
    save(path, data)
    if not plot(data, path.with_suffix(".png")):
        sys.exit(f"wrote {path.with_suffix('.md')}; the plot needs matplotlib (pip install matplotlib)")
    print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")


def kv_bytes_per_token(model: Path, smoke: bool) -> int:
    cfg = json.loads((model / "config.json").read_text())
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * heads * head * (4 if smoke else 2)


def make_model(args, work: Path) -> Path:
    if args.smoke or args.tiny:
        from vllm_partial_kv.tiny_models import make_tiny_model

        return make_tiny_model(work / "tiny-llama2", "llama2")
    return write_config(work, args.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--shape", default="mha7b", choices=sorted(SHAPES))
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--system-tokens", type=int, default=1024)
    p.add_argument("--doc-tokens", type=int, default=1536)
    p.add_argument("--question-tokens", type=int, default=64)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--gpu-kv-gib", type=float, default=4.0, help="GPU KV cache (--kv-cache-memory-bytes)")
    p.add_argument("--cpu-gib", type=float, default=32.0, help="host store of the offloading systems")
    p.add_argument("--storage-dir", default=None, help="where partial-storage makes its directory (default: /tmp)")
    p.add_argument("--eager", action="store_true", help="skip torch.compile and CUDA graphs")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, the plugin only (CI)")
    p.add_argument("--tiny", action="store_true", help="the tiny model, with the workload given (CPU runs)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    p.add_argument("--replot", type=Path, help="rewrite the table and plot of a saved --out JSON")
    p.add_argument("--append", type=Path, metavar="JSON",
                   help="start from the results of a saved run (a run split across calls)")
    args = p.parse_args()
    if args.replot:
        replot(args.replot)
        return
    if args.smoke:  # 6 users' histories: about 3x the 1k-token GPU KV cache
        # One server (start-up dominates on a CPU); native only prints why it is skipped.
        args.systems, args.users, args.rounds, args.concurrency = "native,partial-auto", 6, 2, 2
        args.system_tokens, args.doc_tokens, args.question_tokens, args.answer_tokens = 96, 320, 32, 8
        args.gpu_kv_gib, args.cpu_gib = (1024 * 4 * 2 * 256 * 4) / 2**30, 0.125
    args.vocab = 1000 if args.smoke or args.tiny else SHAPES[args.shape][5]
    args.conv = conversations(args)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        sys.exit(f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    total = sum(len(prompt(args.conv, u, args.rounds - 1)) + args.answer_tokens for u in range(args.users))
    data = {"title": f"{'tiny llama2 (smoke)' if args.smoke else 'tiny llama2' if args.tiny else args.shape}, {args.users} users x {args.rounds} rounds, "
                     f"{_device()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": _device(),
            "args": {k: v for k, v in vars(args).items() if k not in ("conv", "out", "replot", "append")},
            "working_set_tokens": total, "results": []}
    if args.append:
        data["results"] = json.loads(args.append.read_text())["results"]
    with tempfile.TemporaryDirectory(prefix="vllm-partial-kv-serve-") as tmp:
        work = Path(tmp)
        model = make_model(args, work)
        data["gpu_cache_tokens"] = int(args.gpu_kv_gib * 2**30 // kv_bytes_per_token(model, args.smoke or args.tiny))
        print(f"[serve] {data['title']}: final histories {total} tokens in all, "
              f"{total / data['gpu_cache_tokens']:.1f}x the GPU KV cache", flush=True)
        for system in systems:
            data["results"].append(run_system(args, system, model, work))
            save(args.out, data)
    print(summarize(data))
    if plot(data, args.out.with_suffix(".png")):
        print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    else:
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}; no PNG: matplotlib is not installed "
              f"here; draw it with `python benchmarks/serve.py --replot {args.out}` where it is")


if __name__ == "__main__":
    main()
