"""Memory the plugin takes beside the KV cache: peak RSS of an in-process engine (tiny multi-head
model, KV cache sized by VLLM_CPU_KVCACHE_SPACE) without the connector, with recompute_ratio 0
and with activations kept ("auto"), and the capture space + restore staging the runtime allocated.

    python benchmarks/memory.py [--space-gib 2]      # one child process per mode; prints a table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

MODES = ("none", "0", "auto")


def child(model: str, mode: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kwargs = {}
    if mode != "none":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="PartialRecomputeConnector", kv_role="kv_both",
            kv_connector_extra_config={"cpu_bytes": 64 << 20, "recompute_ratio": 0.0 if mode == "0" else "auto"},
        )
    llm = LLM(model, dtype="float32", block_size=32, max_model_len=2048, enforce_eager=True, seed=0, **kwargs)
    llm.generate([{"prompt_token_ids": list(range(10, 600))}], SamplingParams(temperature=0, max_tokens=8),
                 use_tqdm=False)
    extra = kv = 0
    if mode != "none":
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        runtime = get_kv_transfer_group().worker.runtime
        extra = runtime.extra_device_bytes
        kv = sum(t.numel() * t.element_size() for t in runtime.kv_caches.values())
    print("RESULT " + json.dumps({
        "mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "extra_mib": round(extra / 2**20, 2), "kv_mib": kv / 2**20,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space-gib", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from vllm_partial_kv.tiny_models import make_tiny_model

    model = make_tiny_model(os.path.join(tempfile.mkdtemp(), "llama2"), "llama2")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.space_gib)}
    print(f"| VLLM_CPU_KVCACHE_SPACE | connector | peak RSS (MB) | capture + staging (MiB) |\n|---|---|---|---|")
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", str(model), mode], env=env,
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        label = {"none": "none", "0": "recompute_ratio 0", "auto": "auto (activations kept)"}[mode]
        share = f" ({r['extra_mib'] / r['kv_mib']:.1%} of the KV cache)" if r["kv_mib"] else ""
        print(f"| {args.space_gib} GiB | {label} | {r['peak_rss_mb']} | {r['extra_mib']}{share} |")


if __name__ == "__main__":
    main()
