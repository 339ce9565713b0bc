"""The CPU block store: a host pool allocated once (worker side) and its LRU index (scheduler side).

The index lives with the scheduler and hands out slot ids; the worker only copies to and from the
slots it is told. A slot read by a load in flight is pinned and cannot be evicted; a slot written
by a store is only read in a later step, and a restore waits for the stores into the slots it
reads, so a load never sees a half-written block.

vLLM's own `kv_offload` LRU policies changed their interface between 0.26 and 0.32 (BlockStatus
became ChunkStatus, with request contexts), so this small index is kept here, version-free.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


@dataclass
class _Entry:
    slot: int
    has_activations: bool
    pins: int = 0
    doomed: bool = False  # discarded while pinned: never offered again, dropped when unpinned


class BlockIndex:
    """block hash -> host slot, least recently used first; pinned entries are never evicted."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"the CPU store needs at least one block slot, got {num_slots}")
        self.num_slots = num_slots
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._free = list(range(num_slots - 1, -1, -1))
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._entries

    def count_prefix_hits(self, hashes: Sequence[bytes]) -> int:
        """How many leading hashes are stored (a restore must be a contiguous prefix)."""
        n = 0
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None or entry.doomed:
                break
            n += 1
        return n

    def pin(self, hashes: Sequence[bytes]) -> list[tuple[int, bool]]:
        """Protect entries for a load; returns (slot, has_activations) and marks them recent."""
        out = []
        for h in hashes:
            entry = self._entries[h]
            entry.pins += 1
            self._entries.move_to_end(h)
            out.append((entry.slot, entry.has_activations))
        return out

    def lookup(self, hashes: Sequence[bytes]) -> list[tuple[int, bool]]:
        return [(self._entries[h].slot, self._entries[h].has_activations) for h in hashes]

    def unpin(self, hashes: Sequence[bytes]) -> None:
        for h in hashes:
            entry = self._entries.get(h)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                if entry.pins == 0 and entry.doomed:
                    self._drop(h)

    def touch(self, block_hash: bytes) -> None:
        self._entries.move_to_end(block_hash)

    def allocate(self, block_hash: bytes, has_activations: bool) -> int | None:
        """A slot for a new block, evicting the least recently used unpinned one if full;
        None when every slot is pinned (the block is then simply not offloaded)."""
        if block_hash in self._entries:
            raise KeyError("block already stored")
        if not self._free and not self._evict_one():
            return None
        slot = self._free.pop()
        self._entries[block_hash] = _Entry(slot, has_activations)
        return slot

    def _evict_one(self) -> bool:
        for h, entry in self._entries.items():
            if entry.pins == 0:
                self._drop(h)
                self.evictions += 1
                return True
        return False

    def _drop(self, block_hash: bytes) -> None:
        self._free.append(self._entries.pop(block_hash).slot)

    def discard(self, hashes: Sequence[bytes]) -> int:
        """Drop these entries (bad copies); one that a load still reads goes when it is unpinned
        and is no longer offered meanwhile. Returns how many entries were found."""
        found = 0
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None:
                continue
            found += 1
            if entry.pins:
                entry.doomed = True
            else:
                self._drop(h)
        return found

    def clear(self) -> None:
        """Drop every unpinned entry (vLLM's reset_prefix_cache)."""
        for h in [h for h, e in self._entries.items() if e.pins == 0]:
            self._drop(h)


def slots_for_budget(cpu_bytes: int, bytes_per_block: int) -> int:
    if bytes_per_block <= 0:
        raise ValueError("bytes_per_block must be positive")
    n = cpu_bytes // bytes_per_block
    if n < 1:
        raise ValueError(
            f"cpu_bytes={cpu_bytes} cannot hold a single block ({bytes_per_block} bytes per block "
            "for all layers); raise cpu_bytes"
        )
    return n


def available_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on `device`; host RAM (MemAvailable) for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ensure_room(needs: dict[torch.device, int]) -> None:
    """Fail at start-up, with the numbers and what to change, rather than with an allocator error
    (or the OOM killer) halfway through: vLLM sizes its KV cache without knowing about the
    activation buffers, and a pinned host pool larger than RAM can take the machine down."""
    for device, need in needs.items():
        free = available_bytes(device)
        if need <= free:
            continue
        if device.type == "cpu":
            hint = "lower cpu_bytes (--kv-offload-size)"
        else:
            hint = (
                "leave room for the activation buffers (half the KV cache for multi-head models): "
                "lower --gpu-memory-utilization or set --kv-cache-memory-bytes, or set "
                "recompute_ratio to 0 to keep no activations"
            )
        raise RuntimeError(
            f"partial_kv needs {need / 2**30:.2f} GiB of {device} memory for its store and "
            f"activation buffers but only {free / 2**30:.2f} GiB are available: {hint}"
        )


class HostPool:
    """Per layer: host tensors shaped like the GPU block views (K/V) and the activations, slot-first.

    Allocated once. Pinned when CUDA is present: pageable host-to-device copies run at 7-9 GB/s
    against 54 GB/s from pinned memory on an H100.
    """

    def __init__(
        self,
        num_slots: int,
        kv_block_views: dict[str, list[torch.Tensor]],
        act_block_shape: tuple[int, int] | None,
        act_dtype: torch.dtype,
        pin: bool,
    ) -> None:
        self.num_slots = num_slots
        self.pinned = pin
        self.kv: dict[str, list[torch.Tensor]] = {}
        self.act: dict[str, torch.Tensor] = {}
        for name, views in kv_block_views.items():
            # Same strides as the device blocks: blocks are copied as raw bytes, so the host copy
            # must read back in the device's (possibly permuted) element order.
            self.kv[name] = [
                torch.empty_strided(
                    (num_slots, *v.shape[1:]), v.stride(), dtype=v.dtype, pin_memory=pin
                )
                for v in views
            ]
            if act_block_shape is not None:
                self.act[name] = torch.empty(
                    (num_slots, *act_block_shape), dtype=act_dtype, pin_memory=pin
                )
        logger.info(
            "partial_kv host store: %d block slots, %.2f GiB%s, activations %s",
            num_slots,
            self.nbytes / 2**30,
            " pinned" if pin else "",
            "kept" if act_block_shape is not None else "not kept",
        )

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for views in self.kv.values() for t in views)
        return total + sum(t.numel() * t.element_size() for t in self.act.values())

