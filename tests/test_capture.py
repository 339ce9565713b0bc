"""The capture op writes activation rows exactly where vLLM's own KV-cache update writes K/V."""

from __future__ import annotations

import pytest
import torch

from vllm.config import CUDAGraphMode, VllmConfig
from vllm.forward_context import set_forward_context

from vllm_partial_kv import capture

NAME = "model.layers.0.self_attn.attn"


@pytest.fixture
def buf():
    buffer = torch.zeros(9, 4)  # 8 slots and the spare row that takes padding
    capture.bind_buffers({NAME: buffer})
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
    slots = torch.tensor([2, 5, -1])  # -1: padding, goes to the spare row
    with set_forward_context({NAME: object()} if metadata else None, VllmConfig(),
                             cudagraph_runtime_mode=mode, slot_mapping={NAME: slots}):
        torch.ops.partial_kv.capture(x, x, NAME)
    assert torch.equal(buf[[2, 5, 8]], x)
    assert not buf[[0, 1, 3, 4, 6, 7]].any()


def test_nothing_written_outside_a_forward_or_without_slot_mapping(buf):
    x = torch.ones(3, 4)
    torch.ops.partial_kv.capture(x, x, NAME)  # no forward context
    with set_forward_context(None, VllmConfig()):  # memory-profiling run: no slot mapping
        torch.ops.partial_kv.capture(x, x, NAME)
    assert not buf.any()
