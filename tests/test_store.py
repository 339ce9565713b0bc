"""The host store's index and the connector's configuration, without vLLM."""

from __future__ import annotations

import pytest
import torch

from vllm_partial_kv.config import ConfigError, parse_config
from vllm_partial_kv.store import BlockIndex, StoreUsage, slots_for_budget


def h(i: int) -> bytes:
    return i.to_bytes(8, "little")


def test_lru_eviction_skips_pinned_blocks():
    index = BlockIndex(3)
    slots = [index.allocate(h(i), has_activations=True) for i in range(3)]
    assert sorted(slots) == [0, 1, 2]
    index.pin([h(0)])  # a load in flight reads block 0
    index.touch(h(1))  # block 1 is now more recent than block 2
    slot = index.allocate(h(3), has_activations=False)
    assert slot == slots[2] and h(2) not in index and h(0) in index
    index.allocate(h(4), has_activations=False)
    assert h(1) not in index and h(0) in index  # pinned block 0 survives twice
    assert index.evictions == 2


def test_all_pinned_store_is_skipped_not_an_error():
    index = BlockIndex(2)
    for i in range(2):
        index.allocate(h(i), has_activations=True)
    pinned = index.pin([h(0), h(1)])
    assert index.allocate(h(2), has_activations=True) is None
    index.unpin(pinned[:1])
    assert index.allocate(h(2), has_activations=True) is not None
    assert h(0) not in index


def test_prefix_hits_and_pinned_entries():
    index = BlockIndex(8)
    for i in (0, 1, 2, 4):
        index.allocate(h(i), has_activations=i != 1)
    assert index.count_prefix_hits([h(0), h(1), h(2), h(3), h(4)]) == 3
    assert [e.has_activations for e in index.pin([h(0), h(1), h(2)])] == [True, False, True]
    with pytest.raises(KeyError):
        index.allocate(h(0), has_activations=True)


def test_clear_drops_everything_and_frees_pinned_slots_once_unpinned():
    index = BlockIndex(4)
    for i in range(3):
        index.allocate(h(i), has_activations=True)
    (pinned,) = index.pin([h(1)])  # a load still reads it
    assert index.clear() == 3
    assert len(index) == 0 and index.count_prefix_hits([h(0)]) == 0
    fresh = {index.allocate(h(i), True) for i in range(5, 8)}
    assert pinned.slot not in fresh  # not reused while read
    index.pin([h(i) for i in range(5, 8)])
    assert index.allocate(h(1), True) is None  # every slot is read by some load
    index.unpin([pinned])
    assert index.allocate(h(1), True) == pinned.slot


def test_discarded_block_is_stored_again_while_its_old_copy_is_still_read():
    index = BlockIndex(3)
    slots = [index.allocate(h(i), has_activations=True) for i in range(3)]
    (old,) = index.pin([h(1)])  # another load still reads it
    assert index.discard([h(0), h(1), h(9), h(1)]) == 2
    assert h(0) not in index and h(1) not in index and index.evictions == 0
    assert index.count_prefix_hits([h(1)]) == 0  # never offered again
    new = index.allocate(h(1), has_activations=True)  # the recomputed block is stored again
    assert new == slots[0] and new != old.slot
    (fresh,) = index.pin([h(1)])
    index.unpin([old])  # the old load ends: its slot is free, the new entry keeps its pin
    assert fresh.pins == 1 and h(1) in index
    assert index.allocate(h(6), has_activations=True) == old.slot and index.evictions == 0


def test_usage_counts_slots_pins_and_activations():
    """The `/metrics` gauges: a dropped block a load still reads keeps its slot used and pinned."""
    index = BlockIndex(4)
    assert index.usage() == StoreUsage(capacity=4, used=0, pinned=0, with_activations=0)
    for i in range(3):
        index.allocate(h(i), has_activations=i != 1)
    first = index.pin([h(0), h(1)])
    second = index.pin([h(0)])  # a second load of block 0: still one pinned slot
    assert index.usage() == StoreUsage(4, used=3, pinned=2, with_activations=2)
    index.discard([h(0)])
    assert index.usage() == StoreUsage(4, used=3, pinned=2, with_activations=1)
    index.unpin(first)
    assert index.usage() == StoreUsage(4, used=3, pinned=1, with_activations=1)
    index.unpin(second + second)  # unpinning more than pinned changes nothing
    assert index.usage() == StoreUsage(4, used=2, pinned=0, with_activations=1)
    index.allocate(h(5), True)
    index.allocate(h(6), True)
    index.allocate(h(7), False)  # evicts block 2 (the loads made block 1 more recent)
    assert index.usage() == StoreUsage(4, used=4, pinned=0, with_activations=2)
    index.clear()
    assert index.usage() == StoreUsage(4, 0, 0, 0)


def test_budget_too_small_is_a_clear_error():
    assert slots_for_budget(10 << 20, 1 << 20) == 10
    with pytest.raises(ValueError, match="cannot hold a single block"):
        slots_for_budget(1000, 1 << 20)


def test_config_defaults_and_errors():
    cfg = parse_config({"cpu_bytes": "1073741824", "recompute_ratio": "0.25"})
    assert cfg.cpu_bytes == 1 << 30 and cfg.recompute_ratio == 0.25
    assert parse_config(None).recompute_ratio is None  # auto
    assert parse_config({"recompute_ratio": "auto"}).wants_activations is None
    assert parse_config({"recompute_ratio": 0}).wants_activations is False
    assert parse_config(None).async_load and not parse_config({"async_load": False}).async_load
    for bad in (
        {"recompute_ratio": 1.5},
        {"recompute_ratio": "half"},
        {"recompute_ratio": True},
        {"cpu_bytes": -1},
        {"cpu_bytes": 1.5},
        {"offload_prompt_only": "yes"},
        {"async_load": 1},
        {"kernel": "cuda"},
        {"max_recompute_tokens": 0},
        {"cpu_bytes": float("inf")},  # vLLM's JSON parsing accepts Infinity
        {"max_recompute_tokens": "inf"},
        {"profile_cache_dir": 3},
        {"cpu_byte": 1},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):  # the message names the key
            parse_config(bad)
    assert parse_config({"profile_cache_dir": None}).profile_cache_dir is None  # null: the default


def test_no_room_is_a_clear_error(monkeypatch):
    from vllm_partial_kv import store

    free = {"cpu": 8 << 30, "cuda": 1 << 30}
    monkeypatch.setattr(store, "available_bytes", lambda device: free[device.type])
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    store.ensure_room({cpu: 8 << 30, gpu: 1 << 30})  # exactly fits
    with pytest.raises(RuntimeError, match=r"2\.00 GiB of cuda:0 memory .* 1\.00 GiB .*gpu-memory-utilization"):
        store.ensure_room({cpu: 1, gpu: 2 << 30})
    with pytest.raises(RuntimeError, match=r"of cpu memory .*cpu_bytes"):
        store.ensure_room({cpu: 9 << 30, gpu: 1})
    assert store.available_bytes(cpu) > 0
