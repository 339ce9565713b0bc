"""The capture op writes activation rows exactly where vLLM's own KV-cache update writes K/V."""

from __future__ import annotations

import pytest
import torch

from vllm.config import CUDAGraphMode, VllmConfig
from vllm.forward_context import set_forward_context

from vllm_partial_kv import capture

NAME = "model.layers.0.self_attn.attn"


BS = 4
# KV block -> capture block: blocks 1 and 2 are being filled with capture blocks 1 and 0; blocks 0
# and 3 have none (their rows, like padding, go to the spare row).
BLOCK_MAP = [-1, 1, 0, -1]


@pytest.fixture
def buf():
    buffer = torch.zeros(2 * BS + 1, 4)  # two capture blocks and the spare row
    capture.bind_buffers({NAME: buffer}, torch.tensor(BLOCK_MAP, dtype=torch.int32), BS)
    yield buffer
    capture.bind_buffers({})


@pytest.mark.parametrize("mode,metadata", [
    (CUDAGraphMode.NONE, True),  # eager step
    (CUDAGraphMode.FULL, True),  # full-graph capture: metadata built for the graph
    (CUDAGraphMode.PIECEWISE, False),  # piecewise capture: slot mapping only, no metadata
])
def test_rows_written_by_slot_mapping(buf, mode, metadata):
    """A piecewise CUDA graph records what the op does while vLLM captures it, with no attention
    metadata: an op that wrote nothing then would capture nothing in every replayed step."""
    x = torch.arange(12.0).view(3, 4) + 1
    slots = torch.tensor([6, 9, -1])  # block 1 offset 2, block 2 offset 1; -1: padding
    with set_forward_context({NAME: object()} if metadata else None, VllmConfig(),
                             cudagraph_runtime_mode=mode, slot_mapping={NAME: slots}):
        torch.ops.partial_kv.capture(x, x, NAME)
    assert torch.equal(buf[[BS + 2, 1, 2 * BS]], x)
    assert not buf[[0, 2, 3, 4, 5, 7]].any()


def test_blocks_without_a_capture_block_write_only_the_spare_row(buf):
    x = torch.ones(3, 4)
    with set_forward_context(None, VllmConfig(), slot_mapping={NAME: torch.tensor([0, 3, 13])}):
        torch.ops.partial_kv.capture(x, x, NAME)
    assert not buf[: 2 * BS].any() and buf[2 * BS].all()


def test_blocks_past_the_map_write_only_the_spare_row(buf):
    """The map is sized at model load from a bound on KV blocks: a block past it (here with the
    map's last block lent a capture block) goes to the spare row, never to a wrong row."""
    capture._MAP[0][0][-1] = 1
    x = torch.ones(2, 4)
    slots = torch.tensor([len(BLOCK_MAP) * BS + 1, 10 * BS])
    with set_forward_context(None, VllmConfig(), slot_mapping={NAME: slots}):
        torch.ops.partial_kv.capture(x, x, NAME)
    assert not buf[: 2 * BS].any() and buf[2 * BS].all()


def test_nothing_written_outside_a_forward_or_without_slot_mapping(buf):
    x = torch.ones(3, 4)
    torch.ops.partial_kv.capture(x, x, NAME)  # no forward context
    with set_forward_context(None, VllmConfig()):  # memory-profiling run: no slot mapping
        torch.ops.partial_kv.capture(x, x, NAME)
    assert not buf.any()


def _engine_config(model, ratio=0.5, **extra):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    kv = KVTransferConfig(kv_connector="PartialRecomputeConnector", kv_role="kv_both",
                          kv_connector_extra_config={"recompute_ratio": ratio})
    return EngineArgs(model=str(model), kv_transfer_config=kv, block_size=32, max_model_len=2048,
                      **extra).create_engine_config()


@pytest.mark.parametrize("extra,reason", [
    ({}, None),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}}, None),
    ({"enable_lora": True}, "LoRA"),
    ({"speculative_config": {"method": "draft_model", "model": "<tiny>", "num_speculative_tokens": 2}},
     "draft model"),
    ({"model_impl": "transformers"}, "architecture"),  # Hugging Face's attention code: outside the matcher
])
def test_deployments_recompute_cannot_serve_offload_plain_kv(tiny_model, extra, reason, monkeypatch, caplog):
    """Where the captured activations would not give back the served K/V (LoRA on the K/V
    projection, a draft model's unhooked layers, an architecture outside the matcher), the plugin keeps no
    activations and says why, once."""
    import logging

    from vllm_partial_kv import deployment

    model = tiny_model("llama2")
    if "speculative_config" in extra and "model" in extra["speculative_config"]:
        extra["speculative_config"]["model"] = str(model)
    cfg = _engine_config(model, **extra)
    monkeypatch.setattr(deployment, "_warned_no_capture", set())
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_partial_kv.deployment"):
        wanted = [deployment.activations_wanted(cfg) for _ in range(2)]
    assert wanted == [reason is None] * 2
    warnings = [r.getMessage() for r in caplog.records if "cannot recompute" in r.getMessage()]
    assert len(warnings) == (reason is not None) and all(reason in w for w in warnings), warnings


@pytest.mark.parametrize("kv_cache_dtype,wanted", [("auto", True), ("fp8", False)])
def test_auto_mode_keeps_activations_only_when_smaller_than_the_cached_kv(tiny_model, kv_cache_dtype, wanted):
    """A multi-head model's activations are half its K/V, but as large as an fp8 cache's K/V."""
    from vllm_partial_kv import deployment

    cfg = _engine_config(tiny_model("llama2"), ratio="auto", kv_cache_dtype=kv_cache_dtype)
    shape = deployment.model_shape(cfg)
    assert shape.kv_bytes_per_token == 2 * shape.act_bytes_per_token // (1 if wanted else 2)
    assert deployment.activations_wanted(cfg) is wanted
