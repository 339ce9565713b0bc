"""Connector stats through vLLM's KV-connector stats mechanism: worker -> scheduler -> the
OpenAI server's `/metrics` (Prometheus) and the periodic "KV Transfer metrics" log line.

Counters come from the worker half (copies, restores); gauges from the scheduler half, which owns
the host store's index: vLLM aggregates the scheduler connector's stats into the worker's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_partial_kv.compat import KVConnectorPromMetrics, KVConnectorStats

COUNTERS = {
    "tokens_stored": "Tokens whose KV (and activations) were copied to the CPU store",
    "tokens_loaded": "Tokens restored from the CPU store",
    "tokens_recomputed": "Restored tokens whose K/V were recomputed from activations",
    "blocks_stored_without_activations": (
        "Blocks stored with K/V only while activations are kept (the capture space was full, "
        "or the block was restored): their restores cannot recompute them"
    ),
    "bytes_to_host": "Bytes copied device -> host by stores",
    "bytes_to_device": "Bytes copied host -> device by restores",
    "restores": "Restore operations (one per scheduler step with hits)",
    "restore_seconds": "Time spent restoring (copy + recompute), seconds",
    "restore_failures": "Restores that failed and were reported to vLLM as KV load errors",
    "storage_hit_blocks": "Blocks a look-up found in the storage tier (after missing in host memory)",
    "storage_missed_lookups": "Look-ups that went on to the storage tier and ended on a block it does not hold",
    "storage_blocks_read": "Blocks read from the storage tier into the host store",
    "storage_bytes_read": "Bytes read from the storage tier",
    "storage_blocks_written": "Blocks written to the storage tier",
    "storage_bytes_written": "Bytes written to the storage tier",
    "storage_read_misses": "Block files the index offered that were gone when read (evicted elsewhere)",
    "storage_rejected_files": "Block files rejected on read: truncated, corrupt, foreign or unreadable",
    "storage_write_errors": "Block writes that failed (full, read-only or missing directory)",
}
GAUGES = {  # StoreUsage field -> (metric suffix, documentation)
    "capacity": ("store_capacity_blocks", "Block slots of the host store"),
    "used": ("store_used_blocks", "Host store slots holding a block (stored, or read by a load)"),
    "pinned": ("store_pinned_blocks", "Host store slots a restore in flight reads (not evictable)"),
    "with_activations": (
        "store_activation_blocks", "Stored blocks that keep activations (their K/V can be recomputed)"
    ),
    "fp8": (
        "store_format_fp8", "1: the host store keeps fp8 (e4m3) values with scales (host_format fp8); "
        "0: K/V in the KV cache's dtype and activations in the model's"
    ),
    "storage_used_bytes": ("storage_used_bytes", "Bytes of block files in the storage directory (all instances)"),
}


@dataclass
class PartialKVStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for key in COUNTERS:
            self.data.setdefault(key, 0)

    def add(self, step, block_size: int) -> None:
        d = self.data
        d["tokens_stored"] += step.stored_blocks * block_size
        d["tokens_loaded"] += step.loaded_blocks * block_size
        d["tokens_recomputed"] += step.recomputed_blocks * block_size
        d["blocks_stored_without_activations"] += step.stored_without_activations
        d["bytes_to_host"] += step.bytes_to_host
        d["bytes_to_device"] += step.bytes_to_device
        d["restores"] += len(step.restore_seconds)
        d["restore_seconds"] += sum(step.restore_seconds)
        d["restore_failures"] += step.failed_restores

    def add_storage(self, io) -> None:
        """A worker's `storage.IOStats`."""
        d = self.data
        d["storage_blocks_read"] += io.blocks_read
        d["storage_bytes_read"] += io.bytes_read
        d["storage_blocks_written"] += io.blocks_written
        d["storage_bytes_written"] += io.bytes_written
        d["storage_read_misses"] += io.read_misses
        d["storage_rejected_files"] += sum(io.rejected.values())
        d["storage_write_errors"] += io.write_errors

    @classmethod
    def of_store(cls, usage) -> PartialKVStats:
        """The scheduler half's snapshot of the host store (a `store.StoreUsage`)."""
        return cls(data={GAUGES[name][0]: getattr(usage, name) for name in GAUGES if hasattr(usage, name)})

    def reset(self) -> None:
        self.data = {key: 0 for key in COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> PartialKVStats:
        """Counters add up; gauges keep the latest snapshot."""
        for key in COUNTERS:
            self.data[key] += other.data.get(key, 0)
        for key, _ in GAUGES.values():
            if key in other.data:
                self.data[key] = other.data[key]
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.get(key) for key in COUNTERS) and not any(
            key in self.data for key, _ in GAUGES.values()
        )


class PartialKVPromMetrics(KVConnectorPromMetrics):
    """Counters named `vllm:partial_kv_<what>_total` and gauges `vllm:partial_kv_store_<what>`,
    with vLLM's engine labels."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[str, dict[int, Any]] = {}
        for key, doc in COUNTERS.items():
            counter = self._counter_cls(
                name=f"vllm:partial_kv_{key}", documentation=doc, labelnames=labelnames
            )
            self.counters[key] = {
                idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()
            }
        self.gauges: dict[str, dict[int, Any]] = {}
        for key, doc in GAUGES.values():
            gauge = self._gauge_cls(
                name=f"vllm:partial_kv_{key}", documentation=doc, labelnames=labelnames,
                multiprocess_mode="mostrecent",
            )
            self.gauges[key] = {
                idx: gauge.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self.counters.items():
            value = transfer_stats_data.get(key, 0)
            if value:
                per_engine[engine_idx].inc(value)
        for key, per_engine in self.gauges.items():
            if key in transfer_stats_data:
                per_engine[engine_idx].set(transfer_stats_data[key])
