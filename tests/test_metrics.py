"""Connector stats: worker counters and scheduler gauges merged as vLLM merges them, and the
restore fault hook's parsing. No engine: the served path is checked in test_serving.py."""

from __future__ import annotations

import pytest

from vllm_partial_kv.config import ConfigError
from vllm_partial_kv.faults import ENV, InjectedRestoreFailure, RestoreFaults
from vllm_partial_kv.metrics import PartialKVStats
from vllm_partial_kv.store import StoreUsage


def test_scheduler_gauges_ride_on_worker_counters():
    """vLLM adds the scheduler half's stats to the worker's (`aggregate`), then the logger
    accumulates steps the same way: counters add up, gauges keep the latest snapshot."""
    worker = PartialKVStats()
    worker.data["tokens_loaded"] = 64
    assert PartialKVStats().is_empty() and not worker.is_empty()
    gauges = PartialKVStats.of_store(StoreUsage(capacity=10, used=4, pinned=2, with_activations=3))
    assert not gauges.is_empty()  # a snapshot with all-zero counters is still sent
    step = worker.aggregate(gauges)
    later = PartialKVStats()
    later.data["tokens_loaded"] = 32
    later.aggregate(PartialKVStats.of_store(StoreUsage(10, 5, 0, 3)))
    total = step.aggregate(later).reduce()
    assert total["tokens_loaded"] == 96
    assert (total["store_capacity_blocks"], total["store_used_blocks"], total["store_pinned_blocks"],
            total["store_activation_blocks"]) == (10, 5, 0, 3)
    assert PartialKVStats.of_store(StoreUsage(10, 5, 0, 3, fp8=1)).data["store_format_fp8"] == 1
    counters_only = PartialKVStats()
    counters_only.data["restores"] = 1
    assert step.aggregate(counters_only).data["store_used_blocks"] == 5  # no snapshot: kept


def test_fault_hook_fails_every_kth_restore(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    faults = RestoreFaults.from_env()
    outcomes = []
    for _ in range(7):
        try:
            faults.check()
            outcomes.append("ok")
        except InjectedRestoreFailure:
            outcomes.append("failed")
    assert outcomes == ["ok", "ok", "failed", "ok", "ok", "failed", "ok"]
    monkeypatch.delenv(ENV)
    off = RestoreFaults.from_env()
    for _ in range(5):
        off.check()
    for bad in ("0", "-2", "every", "1.5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ConfigError, match=ENV):
            RestoreFaults.from_env()
