"""Plugin registration, in-process and through vLLM's spawned multi-process engine."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest


def test_entry_point_registers_connector_idempotently():
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "partial_kv"]
    register = ep.load()
    register()
    register()  # vLLM loads plugins in every process, sometimes twice
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    cls = KVConnectorFactory._registry["PartialRecomputeConnector"]()
    assert cls.__name__ == "PartialRecomputeConnector"


SPAWNED = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    def worker_state(self=None):
        import os
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        from vllm_partial_kv import capture
        worker = get_kv_transfer_group().worker
        return {"pid": os.getpid(), "totals": worker.totals.data, "captured_layers": len(capture.layers()),
                "bound": [b.data_ptr() for b in capture._BUFFERS.values()],
                "used": [b.data_ptr() for b in worker.runtime._capture_space]}

    if __name__ == "__main__":
        llm = LLM(sys.argv[1], kv_cache_memory_bytes=32 << 20, block_size=32, max_model_len=1024,
                  enforce_eager=True, seed=0,
                  # by name only: resolvable only if the entry point ran in the engine process
                  kv_transfer_config=KVTransferConfig(
                      kv_connector="PartialRecomputeConnector", kv_role="kv_both",
                      kv_connector_extra_config={"cpu_bytes": 64 << 20, "recompute_ratio": 1.0}))
        sp = SamplingParams(temperature=0, max_tokens=8)
        prompt = {"prompt_token_ids": [(7 * i) % 900 + 10 for i in range(200)]}
        first = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        llm.reset_prefix_cache()
        again = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        state = llm.collective_rpc(worker_state)[0]
        print("RESULT " + json.dumps({"same": list(first) == list(again), "main_pid": __import__("os").getpid(), **state}))
    """
)


@pytest.mark.spawn
def test_spawned_engine_registers_connector_and_capture(tiny_model, tmp_path):
    """With the multi-process engine the plugin must load in the engine-core and worker
    processes: the connector resolves by name and the worker recomputes from captured inputs."""
    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model("llama2"))],
        capture_output=True, text=True, env=env, timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][7:])
    assert result["pid"] != result["main_pid"]  # the worker really is another process
    assert result["captured_layers"] == 4
    assert result["bound"] and result["bound"] == result["used"]  # made at model load in the worker
    assert result["totals"]["tokens_recomputed"] > 0
    assert result["same"]


def _config(model, ratio, **kwargs):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    kv = KVTransferConfig(
        kv_connector="PartialRecomputeConnector", kv_role="kv_both",
        kv_connector_extra_config={"cpu_bytes": 64 << 20, "recompute_ratio": ratio},
    )
    config = EngineArgs(model=str(model), kv_transfer_config=kv, **kwargs).create_engine_config()
    config.cache_config.kv_cache_memory_bytes = kwargs.get("kv_cache_memory_bytes")
    return config


def test_buffers_made_at_model_load_are_sized_from_the_config(tiny_model):
    """What the model-load hook allocates, before vLLM profiles memory (which then counts it): the
    capture space (one block per running sequence plus one step's tokens, at most 4096 tokens, and
    the spare row, in every layer), the restore staging with its slot and position indices (two
    stagings on a GPU, one on the CPU), and the map from KV block to capture block, sized from an
    upper bound on KV blocks; all bound to the capture op at once."""
    import torch

    from vllm_partial_kv import capture, device_buffers
    from vllm_partial_kv.deployment import device_bytes, kv_block_bound, model_shape

    gib = 1 << 30
    mha = _config(tiny_model("llama2"), 0.5)
    shape = model_shape(mha)
    assert shape.act_bytes_per_token * 2 == shape.kv_bytes_per_token  # MHA: act is half of K+V
    hf = mha.model_config.hf_config  # QKV + output + gated MLP, over the K/V projection
    assert shape.forward_ratio == (4 * hf.hidden_size**2 + 3 * hf.hidden_size * hf.intermediate_size) / (
        2 * hf.hidden_size**2
    )
    staging = 2 * 16384 * (shape.act_bytes_per_token + 8)
    sched, bs = mha.scheduler_config, shape.block_size
    tokens = -(-min(sched.max_num_seqs * bs + sched.max_num_batched_tokens, 4096) // bs) * bs
    capture_space = (tokens + 1) * shape.act_bytes_per_token * shape.num_layers
    assert device_bytes(mha) == capture_space + staging
    # The bound on KV blocks: the whole device, an explicit KV cache size, or the blocks override.
    per_block = bs * shape.kv_bytes_per_token * shape.num_layers
    assert kv_block_bound(mha, 80 * gib) == 80 * gib // per_block + 1
    assert kv_block_bound(_config(tiny_model("llama2"), 0.5, kv_cache_memory_bytes=gib), 80 * gib) == gib // per_block + 1
    mha.cache_config.num_gpu_blocks_override = 1000
    assert kv_block_bound(mha, 80 * gib) == 1000

    names = [f"model.layers.{i}.self_attn.attn" for i in range(shape.num_layers)]
    try:
        buffers = device_buffers.allocate(mha, names, torch.device("cpu"))
        assert device_buffers.current() is buffers and buffers.block_map.shape == (1000,)
        assert buffers.nbytes == device_bytes(mha) - 16384 * shape.act_bytes_per_token + 4 * 1000  # one staging
        assert capture._BUFFERS == buffers.capture and capture._MAP[0][0] is buffers.block_map
        buffers.check_fits(1000, bs)
        with pytest.raises(RuntimeError, match="vLLM made 1001 KV blocks, more than the 1000"):
            buffers.check_fits(1001, bs)
        with pytest.raises(RuntimeError, match=f"set --block-size {2 * bs}"):
            buffers.check_fits(10, 2 * bs)
    finally:
        device_buffers.release()
    assert device_buffers.current() is None and not capture._BUFFERS and not capture._MAP


def test_forward_ratio_of_real_shapes():
    """The planner's forward model in units of the K/V projection, from the model config."""
    from types import SimpleNamespace

    from vllm_partial_kv.deployment import forward_ratio

    llama7b = SimpleNamespace(intermediate_size=11008)
    assert forward_ratio(llama7b, 4096, 4096, 4096) == pytest.approx(6.03, abs=0.01)
    llama3_8b = SimpleNamespace(intermediate_size=14336)  # GQA: a small K/V projection
    assert forward_ratio(llama3_8b, 4096, 4096, 1024) == pytest.approx(26.0)
    opt = SimpleNamespace(ffn_dim=4 * 768)  # two MLP matrices
    assert forward_ratio(opt, 768, 768, 768) == pytest.approx(6.0)
    assert forward_ratio(llama7b, 4096, 4096 // 2, 4096 // 2, tp=2) == pytest.approx(6.03, abs=0.01)


def test_split_per_restore_mode(caplog):
    """Which profile and forward model the worker hands the planner: an asynchronous restore
    shares the GPU with other requests (busy profile); one waited for per layer shares it with
    the step's own forward (idle profile plus the forward); a whole-step wait, with neither."""
    import dataclasses
    from types import SimpleNamespace

    from vllm_partial_kv.config import PartialKVConfig
    from vllm_partial_kv.metadata import PartialKVMetadata
    from vllm_partial_kv.worker import PartialKVWorker
    from vllm_partial_kv.planner import ModelShape, Profile
    from vllm_partial_kv.restore import LoadSpec

    shape = ModelShape(32, 4096, 32, 128, 2, 16, forward_ratio=6.0)
    idle = Profile(25e9, ((1024, 1024 * 4 * 4096 * 4096 / 30e12),))
    worker = SimpleNamespace(
        with_act=True, plan_shape=shape, cfg=PartialKVConfig(), _profiled_kernel="auto",
        runtime=SimpleNamespace(max_recompute_tokens=1 << 20, kernel="auto"),
        profiles={False: idle, True: dataclasses.replace(idle, busy_factor=3.0)},
    )

    def split(wait: str, busy: bool, forward_tokens: int) -> int:
        meta = PartialKVMetadata(loads=[LoadSpec(list(range(1024)), list(range(1024)), 0, 1024)])
        meta.busy, meta.forward_tokens = busy, forward_tokens
        profiled = worker.runtime.kernel == worker._profiled_kernel  # start_load_kv's check
        PartialKVWorker._choose_split(worker, meta, wait, profiled)
        return meta.loads[0].recompute_blocks

    alone = split("whole", False, 8192)
    assert 0 < alone == split("whole", True, 8192) == split("none", False, 8192)
    assert split("none", True, 8192) < alone  # other requests slow the recompute down
    assert split("layers", False, 16) >= 0.95 * alone  # a decode-sized forward barely matters
    assert split("layers", True, 8192) < 0.8 * alone  # an 8k-token forward competes per layer

    # A Triton kernel that fails while serving leaves the runtime on the torch path, which the
    # profiles do not describe: measuring it now would stall the restore (and the requests behind
    # it), so restores stream every block from then on, with one warning, measuring nothing.
    worker._load_profiles = lambda: pytest.fail("profiled while serving")
    worker.runtime.kernel = "torch"
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_partial_kv.worker"):
        assert split("whole", False, 0) == split("none", True, 8192) == 0
    assert [r.getMessage() for r in caplog.records].count(
        "partial_kv: recompute now runs on the unprofiled torch path; restores stream all blocks "
        "from now on (restart to profile it)") == 1
