"""The host store's number format without vLLM: config key, bytes per token, the planner's choice,
the host pool's slot layout with scales, and the capacity at equal cpu_bytes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vllm_partial_kv.config import ConfigError, parse_config
from vllm_partial_kv.kernels.quant import FP8
from vllm_partial_kv.planner import ModelShape, Profile, RestoreRequest, plan_split
from vllm_partial_kv.store import BlockIndex, HostPool
from vllm_partial_kv.store_format import kv_slot_views

_spec = importlib.util.spec_from_file_location(
    "host_capacity", Path(__file__).resolve().parents[1] / "benchmarks" / "host_capacity.py")
host_capacity = importlib.util.module_from_spec(_spec)
sys.modules["host_capacity"] = host_capacity  # its dataclass looks its module up
_spec.loader.exec_module(host_capacity)


def test_config_key() -> None:
    assert parse_config({}).host_format == "auto"
    assert parse_config({"host_format": "fp8"}).host_format == "fp8"
    with pytest.raises(ConfigError, match="host_format must be one of"):
        parse_config({"host_format": "int8"})


def shape(fmt: str, kv_heads: int, kv_dtype_bytes: int = 2, **kw) -> ModelShape:
    return ModelShape(num_layers=32, hidden_size=4096, num_kv_heads=kv_heads, head_size=128, dtype_bytes=2,
                      block_size=16, kv_dtype_bytes=kv_dtype_bytes, host_format=fmt, **kw)


def test_bytes_per_token_follow_the_format() -> None:
    assert (shape("auto", 32).kv_bytes_per_token, shape("auto", 32).act_bytes_per_token) == (16384, 8192)
    assert (shape("fp8", 32).kv_bytes_per_token, shape("fp8", 32).act_bytes_per_token) == (2 * 32 * 132, 4100)
    # An fp8 KV cache goes to the host as it is: the same bytes in both formats.
    assert shape("fp8", 32, kv_dtype_bytes=1).kv_bytes_per_token == shape("auto", 32, 1).kv_bytes_per_token == 8192
    # Under tensor parallelism a rank keeps its shard of the row, with a scale of its own.
    assert shape("fp8", 16, act_shards=2).act_bytes_per_token == 2048 + 4
    assert shape("fp8", 16, act_shards=2).gather_bytes_per_token == 2048 * 2  # joined in the model's dtype
    assert shape("fp8", 32).capture_bytes_per_token == 8192  # the GPU capture space stays 16-bit
    with pytest.raises(ValueError, match="host_format"):
        shape("fp4", 32)


@pytest.mark.parametrize("fmt,kv_heads,kv_dtype_bytes,keeps_activations", [
    ("auto", 32, 2, True),  # MHA: activations half the K/V
    ("auto", 8, 2, False),  # Llama-3-8B: activations 2x the K/V
    ("fp8", 8, 2, False),  # Llama-3-8B in fp8: activations and K/V cost about the same: K/V only
    ("fp8", 32, 2, True),  # MHA in fp8: a quarter of 16-bit K/V, half of fp8 K/V
    ("auto", 32, 1, False),  # an fp8 KV cache: 16-bit activations are as large as its K/V
    ("fp8", 32, 1, True),  # ... and fp8 activations bring the multi-head gain back
])
def test_auto_split_follows_the_format_bytes(fmt: str, kv_heads: int, kv_dtype_bytes: int,
                                             keeps_activations: bool) -> None:
    s = shape(fmt, kv_heads, kv_dtype_bytes)
    profile = Profile(h2d_bytes_per_s=25e9, recompute_points=((16384, 1e-4),))  # a fast recompute
    split = plan_split(s, profile, [RestoreRequest(64, 64)])
    assert (s.act_bytes_per_token < s.kv_bytes_per_token) == keeps_activations
    assert (split[0] > 0) == keeps_activations, split


def test_fp8_slots_hold_values_and_scales_in_order() -> None:
    device = torch.zeros(2, 5, 16, 2, 64, dtype=torch.bfloat16)  # [K|V, blocks, block_size, heads, head]
    views = kv_slot_views("fp8", {"l0": [device[0], device[1]], "l1": [device[0], device[1]]}, torch.bfloat16,
                          (16, 2, 64))
    pool = HostPool(3, views, (16, 96), FP8, pin=False, fmt="fp8")
    assert pool.format == "fp8"
    for name in ("l0", "l1"):
        k, v, ks, vs = pool.kv[name]
        assert k.shape == v.shape == (3, 16, 2, 64) and k.dtype == v.dtype == FP8 and k.is_contiguous()
        assert ks.shape == vs.shape == (3, 16, 2) and ks.dtype == torch.float32
        assert pool.act[name].shape == (3, 16, 96) and pool.act[name].dtype == FP8
        assert pool.act_scale[name].shape == (3, 16) and pool.act_scale[name].dtype == torch.float32
    per_slot = 2 * (2 * 16 * 2 * 64 + 2 * 16 * 2 * 4 + 16 * 96 + 16 * 4)
    assert pool.nbytes == 3 * per_slot
    # Every view its own bytes: writing one leaves the others alone.
    pool.buffer.zero_()
    pool.kv["l1"][2].fill_(1.0)
    assert sum(int(t.view(torch.uint8).count_nonzero()) for t in (*pool.kv["l0"], *pool.kv["l1"][:2],
                                                                  pool.kv["l1"][3])) == 0
    # The "auto" format mirrors the device blocks themselves (bytes copied as they are).
    raw = {"l0": [device[0], device[1]]}
    assert kv_slot_views("auto", raw, torch.bfloat16, (16, 2, 64)) is raw
    fp8_cache = {"l0": [device[0].to(FP8), device[1].to(FP8)]}
    assert kv_slot_views("fp8", fp8_cache, FP8, (16, 2, 64)) is fp8_cache  # stored as it is


def test_entries_record_their_format() -> None:
    index = BlockIndex(2, fmt="fp8")
    index.allocate(b"a", True)
    assert index.get(b"a").fmt == "fp8"
    assert index.usage().fp8 == 1 and BlockIndex(2).usage().fp8 == 0  # the /metrics gauge
    index.allocate(b"b", True)
    index.get(b"a").fmt = "auto"  # as if stored by another store: never a hit here
    assert index.count_prefix_hits([b"b"]) == 1 and index.count_prefix_hits([b"a", b"b"]) == 0


def test_a_block_is_never_read_in_another_format() -> None:
    from vllm_partial_kv.restore import LoadSpec, RestoreRuntime

    caches = {"l0": torch.zeros(4, 2, 16, 2, 64)}
    views = kv_slot_views("fp8", {"l0": [caches["l0"][0], caches["l0"][1]]}, torch.float32, (16, 2, 64))
    runtime = RestoreRuntime(caches, 4, 16, HostPool(2, views, None, FP8, pin=False, fmt="fp8"), {}, {}, 64)
    with pytest.raises(ValueError, match="stored in host format 'auto' cannot be read from a 'fp8' store"):
        runtime.load([LoadSpec([0], [1], 0)], wait="none")
    runtime.load([LoadSpec([0], [1], 0, fmt="fp8")], wait="none")


def test_capacity_at_equal_cpu_bytes() -> None:
    """Computed from the real host pool: grouped-query K/V in fp8 hold >= 1.9x the tokens of the
    16-bit K/V store; multi-head activations-only in fp8 >= 3.7x."""
    cpu = 256 << 20
    gqa = {f: host_capacity.capacity("GQA-8B", f, "kv", cpu).tokens for f in ("auto", "fp8")}
    assert gqa["fp8"] >= 1.9 * gqa["auto"], gqa
    mha_kv = host_capacity.capacity("MHA-7B", "auto", "kv", cpu).tokens
    mha_act = host_capacity.capacity("MHA-7B", "fp8", "act", cpu).tokens
    assert mha_act >= 3.7 * mha_kv, (mha_act, mha_kv)


@pytest.mark.parametrize("quantize_kv,act_width", [(True, 96), (True, None), (False, 96)])
def test_fp8_staging_is_what_the_budget_counts(quantize_kv: bool, act_width: int | None) -> None:
    from vllm_partial_kv.fp8_copies import Fp8Copies, staging_bytes

    caches = {"l0": torch.zeros(4, 2, 16, 2, 64), "l1": torch.zeros(4, 2, 16, 2, 64)}
    copies = Fp8Copies(caches, 4, 16, quantize_kv, act_width, copy=None, device=torch.device("cpu"))
    assert copies.device_bytes == staging_bytes(16, (2, 64) if quantize_kv else None, act_width) > 0
