"""End-to-end demo: a tiny model served with partial-recompute KV offloading.

The server's KV cache is kept small (5120 tokens), so long conversations evict each other's
blocks; the connector keeps them on the host, and a conversation's next turn restores its
history from there instead of prefilling it again. The restored answer is checked against
the same turn computed before the eviction (the tiny model's greedy output is stable).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from vllm_partial_kv.server import Server, free_port, metric_sum, tail

BLOCK_SIZE = 32
CACHE_TOKENS = 5120  # device KV cache: about three 1.6k-token conversations
DOC_TOKENS = 1600
REPLY_TOKENS = 48
READY_TIMEOUT_S = 180
MODEL_NAME = "tiny-llama2"
CPU_RECOMPUTE_RATIO = 0.5


class DemoError(Exception):
    pass


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vllm-partial-kv-demo-") as tmp:
        work = Path(tmp)
        try:
            return _run(work)
        except DemoError as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1


def _run(work: Path) -> int:
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from vllm_partial_kv.tiny_models import make_tiny_model

    hf_logging.disable_progress_bar()
    on_gpu = torch.cuda.is_available()
    model = make_tiny_model(work / MODEL_NAME, "llama2")
    tok = AutoTokenizer.from_pretrained(model)
    print(f"[demo] tiny MHA model in {model} ({'GPU' if on_gpu else 'CPU'} run)", flush=True)

    port = free_port()
    log_path = work / "server.log"
    server = Server(_server_command(model, port, on_gpu), port, log_path, ready_timeout_s=READY_TIMEOUT_S)
    try:
        server.start()
        print(f"[demo] server ready after {server.ready_after_s:.0f} s", flush=True)
        summary = _workload(port, tok)
        metrics = server.metrics()
    except Exception as exc:  # any failure: show why, from the server's side too
        raise DemoError(f"{type(exc).__name__}: {exc}\n--- server log tail ---\n"
                        f"{tail(log_path)}") from exc
    finally:
        rc = server.stop()
    lines = [ln for ln in metrics.splitlines()
             if "partial_kv" in ln and not ln.startswith("#") and "_created" not in ln]
    print("[demo] partial_kv metrics:")
    print("\n".join(f"  {ln}" for ln in lines) if lines else "  no partial_kv metrics yet")
    restored = metric_sum(metrics, "vllm:external_prefix_cache_hits_total")
    print(f"[demo] {summary['requests']} requests, {summary['prompt']} prompt + "
          f"{summary['completion']} completion tokens in {summary['elapsed']:.1f} s; "
          f"{restored:.0f} prompt tokens came from the host store")
    if rc != 0:
        raise DemoError(f"server exited with status {rc}\n{tail(log_path)}")
    if restored <= 0:
        raise DemoError("no prompt tokens were restored from the host store")
    print("[demo] ok", flush=True)
    return 0


def _server_command(model: Path, port: int, on_gpu: bool) -> list[str]:
    """`vllm-partial-kv serve` with a KV cache small enough that conversations evict."""
    import json

    cfg = json.loads((model / "config.json").read_text())
    dtype, dtype_bytes = ("bfloat16", 2) if on_gpu else ("float32", 4)
    kv_bytes = (2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
                * dtype_bytes * CACHE_TOKENS)
    cmd = [sys.executable, "-m", "vllm_partial_kv.cli", "serve", str(model),
           "--kv-offload", "partial-recompute", "--kv-offload-size", "0.25",
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME,
           "--dtype", dtype, "--block-size", str(BLOCK_SIZE), "--max-model-len", "4096",
           "--kv-cache-memory-bytes", str(kv_bytes), "--enable-prompt-tokens-details"]
    if on_gpu:
        return cmd
    # On a CPU torch.compile adds 1-2 minutes of start-up for no gain on a 4-layer model, and
    # "auto" would stream everything (a host "copy" is a memcpy there): force some recompute
    # so the demo exercises it.
    return cmd + ["--enforce-eager", "--recompute-ratio", str(CPU_RECOMPUTE_RATIO)]


def _workload(port: int, tok) -> dict:
    """A completion, then conversation A, three others that evict it, and A's next turn."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300,
                    max_retries=0)
    totals = {"requests": 0, "prompt": 0, "completion": 0}

    def chat(label: str, messages: list[dict]) -> str:
        start = time.perf_counter()
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                             max_tokens=REPLY_TOKENS, temperature=0.0)
        _count(totals, out.usage, label, time.perf_counter() - start)
        if out.usage.completion_tokens != REPLY_TOKENS:
            raise DemoError(f"{label}: {out.usage.completion_tokens} tokens, not {REPLY_TOKENS}")
        return out.choices[0].message.content

    started = time.perf_counter()
    start = time.perf_counter()
    out = client.completions.create(model=MODEL_NAME, prompt="Zaiba kou mipa", max_tokens=16,
                                    temperature=0.0)
    _count(totals, out.usage, "completion", time.perf_counter() - start)
    print(f"[demo]   text: {out.choices[0].text!r}")

    history = [{"role": "user", "content": _document(tok, seed=1)}]
    history.append({"role": "assistant", "content": chat("A turn 1 (cold)", history)})
    history.append({"role": "user", "content": "Go on, please."})
    reference = chat("A turn 2 (device prefix cache, reference)", history)
    for seed, name in ((2, "B"), (3, "C"), (4, "D")):
        chat(f"{name} turn 1 (evicts A)", [{"role": "user", "content": _document(tok, seed)}])
    restored = chat("A turn 2 again (history restored from the host)", history)
    if restored != reference:
        raise DemoError(f"restored answer differs:\n  {restored!r}\n  vs {reference!r}")
    print("[demo] the restored turn matches the reference answer", flush=True)
    return {**totals, "elapsed": time.perf_counter() - started}


def _count(totals: dict, usage, label: str, seconds: float) -> None:
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    totals["requests"] += 1
    totals["prompt"] += usage.prompt_tokens
    totals["completion"] += usage.completion_tokens
    print(f"[demo] {label:<48} prompt {usage.prompt_tokens:>5} (cached {cached:>5}), "
          f"completion {usage.completion_tokens:>3}, {seconds:6.2f} s", flush=True)


def _document(tok, seed: int) -> str:
    """About DOC_TOKENS tokens of the tokenizer's pseudo-English, different for each seed."""
    from vllm_partial_kv.tiny_models import corpus

    parts, count = [], 0
    for line in corpus(seed + 100):
        if count >= DOC_TOKENS:
            break
        parts.append(line)
        count += len(tok.encode(line + "\n", add_special_tokens=False))
    return "\n".join(parts) + "\nSummarize the text above."
