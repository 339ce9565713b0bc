"""Capture that does not depend on when vLLM creates the connector.

vLLM 0.34's extensible KV cache (its default on CUDA) creates the KV connector only after the model
was compiled, warmed up and its CUDA graphs recorded; a graph records what the capture op did while
it was captured, so the capture space and its map must be bound, at their final addresses, before
the model's first forward. The CPU build has no CUDA graphs: the test reproduces the ordering on it
(torch.compile on, the connector created and registered after `compile_or_warm_up_model`) and checks
that precondition at the first forward, then that restores and tokens are right."""

from __future__ import annotations

import pytest
import torch

from vllm import SamplingParams

from test_restore import _connector_cfg, _prompt, _restored_kv_error, _worker, make_llm  # noqa: F401


@pytest.fixture
def connector_after_warm_up(monkeypatch):
    """vLLM's CPU worker, made to create and register the connector as 0.34 does on CUDA: not in
    `initialize_from_config` but after `compile_or_warm_up_model`. Records, in order, the model's
    forwards (with the capture op's buffers and map at that moment), the end of warm-up and the
    registration."""
    from torch._dynamo.utils import counters

    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.v1.worker import gpu_worker
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_partial_kv import capture, plugin

    plugin.register()  # its model-load hook first: the recorder below goes around it
    events: list[tuple] = []
    late: dict = {}

    def state() -> tuple:
        buffers = {n: b.data_ptr() for n, b in capture._BUFFERS.items()}
        return buffers, capture._MAP[0][0].data_ptr() if capture._MAP else None

    load_model = BaseModelLoader.load_model

    def recording_load_model(self, vllm_config, model_config, *args, **kwargs):
        model = load_model(self, vllm_config, model_config, *args, **kwargs)
        model.register_forward_pre_hook(lambda module, args: events.append(("forward", *state())))
        return model

    monkeypatch.setattr(BaseModelLoader, "load_model", recording_load_model)
    monkeypatch.setattr(gpu_worker, "ensure_kv_transfer_initialized",
                        lambda config, kv_cache_config=None: late.update(args=(config, kv_cache_config)))
    make_tensors = GPUModelRunner.initialize_kv_cache_tensors

    def recording_tensors(self, *args, **kwargs):
        late["kv_caches"] = make_tensors(self, *args, **kwargs)
        return late["kv_caches"]

    monkeypatch.setattr(GPUModelRunner, "initialize_kv_cache_tensors", recording_tensors)
    warm_up = CPUWorker.compile_or_warm_up_model

    def warm_up_then_connect(self):
        out = warm_up(self)
        events.append(("warmed up", counters["stats"]["unique_graphs"]))
        if self.vllm_config.kv_transfer_config is None:
            return out
        from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_initialized

        ensure_kv_transfer_initialized(*late["args"])
        get_kv_transfer_group().register_kv_caches(late["kv_caches"])
        events.append(("registered", *state()))
        return out

    monkeypatch.setattr(CPUWorker, "compile_or_warm_up_model", warm_up_then_connect)
    return events


def test_connector_created_after_compile_and_warm_up(tiny_model, make_llm, connector_after_warm_up):  # noqa: F811
    """The capture space and its map were bound at the model's first forward (before torch.compile
    traced it), at the addresses the worker then uses; restored K/V equal the originals for r = 0,
    n/2, n, and the greedy tokens are vLLM's without the plugin."""
    from torch._dynamo.utils import counters

    from vllm_partial_kv import device_buffers

    events = connector_after_warm_up
    model = tiny_model("llama2")
    sp = SamplingParams(temperature=0, max_tokens=4)
    prompt = _prompt(31, 9 * 32 + 5)
    expected = make_llm(model).generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    events.clear()
    graphs = counters["stats"]["unique_graphs"]
    llm = make_llm(model, kv_transfer_config=_connector_cfg(0.5), enforce_eager=False)
    kinds = [e[0] for e in events]
    assert "warmed up" in kinds and kinds.index("forward") < kinds.index("warmed up") < kinds.index("registered")
    assert events[kinds.index("warmed up")][1] > graphs, "Dynamo traced no graph: the model was not compiled"
    worker = _worker()
    runtime = worker.runtime
    buffers = device_buffers.current()
    at_register = events[kinds.index("registered")][1:]
    first_forward = events[kinds.index("forward")][1:]
    assert first_forward == at_register, "the capture op had no buffers, or others, at the first forward"
    assert at_register == ({n: b.data_ptr() for n, b in buffers.capture.items()}, buffers.block_map.data_ptr())
    assert all(runtime.act_views[n].data_ptr() == ptr for n, ptr in at_register[0].items())
    assert runtime.capture_map.data_ptr() == at_register[1] and runtime.staging[0] is buffers.staging[0]

    stored = []
    store = runtime.store
    runtime.store = lambda ids, *a: (stored.extend(ids), store(ids, *a))
    assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected
    original = {n: [v[stored[:9]].clone() for v in runtime.gpu_views[n]] for n in runtime.names}
    for ratio in (0.0, 0.5, 1.0):
        worker.cfg = worker.cfg.__class__(**{**worker.cfg.__dict__, "recompute_ratio": ratio})
        llm.reset_prefix_cache()  # drop the cached copies; the host store keeps them
        assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected
        (load,) = runtime.last_loads
        assert len(load.block_ids) == 9 and abs(load.recompute_blocks - ratio * 9) <= 0.5
        worst, tol = _restored_kv_error(runtime, load, "auto", original)
        assert worst < tol, f"ratio {ratio}: relative K/V error {worst}"
    del llm
