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
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


@dataclass(eq=False)
class Entry:
    """A stored block's host slot. Loads pin the entry itself, not its hash: an entry dropped while
    a load still reads it keeps its slot until that load ends, while the same block can already be
    stored again, into another slot, under the same hash."""

    slot: int
    has_activations: bool
    pins: int = 0
    indexed: bool = True  # False once dropped from the index; its slot is freed at the last unpin
    has_kv: bool = True  # False: an activations-only slot (host layout "act"), always recomputed


@dataclass(frozen=True)
class StoreUsage:
    """What the host store holds, in block slots: the `/metrics` gauges."""

    capacity: int
    used: int  # slots not free: stored blocks, and dropped ones a load still reads
    pinned: int  # slots a load reads (never evicted until it ends)
    with_activations: int  # stored blocks that keep their activations (can be recomputed)


class BlockIndex:
    """block hash -> host slot, least recently used first; pinned entries are never evicted.

    With `act_slots` (host layout "act"), blocks with activations take activations-only slots,
    numbered apart from the K/V slots, and the others K/V slots; each kind evicts its own."""

    def __init__(self, num_slots: int, act_slots: int = 0) -> None:
        if num_slots <= 0:
            raise ValueError(f"the CPU store needs at least one block slot, got {num_slots}")
        self.num_slots = num_slots
        self.act_slots = act_slots
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._free = {True: list(range(num_slots - 1, -1, -1)), False: list(range(act_slots - 1, -1, -1))}
        self.evictions = 0
        self._pinned = 0  # entries with pins > 0
        self._with_act = 0  # indexed entries with activations

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._entries

    def count_prefix_hits(self, hashes: Sequence[bytes]) -> int:
        """How many leading hashes are stored (a restore must be a contiguous prefix)."""
        n = 0
        for h in hashes:
            if h not in self._entries:
                break
            n += 1
        return n

    def pin(self, hashes: Sequence[bytes]) -> list[Entry]:
        """Protect entries for a load and mark them recent; the caller unpins the returned entries."""
        out = []
        for h in hashes:
            entry = self._entries[h]
            self._pinned += entry.pins == 0
            entry.pins += 1
            self._entries.move_to_end(h)
            out.append(entry)
        return out

    def get(self, block_hash: bytes) -> Entry | None:
        return self._entries.get(block_hash)

    def unpin(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            if entry.pins > 0:
                entry.pins -= 1
                if entry.pins == 0:
                    self._pinned -= 1
                    if not entry.indexed:
                        self._free[entry.has_kv].append(entry.slot)

    def touch(self, block_hash: bytes) -> None:
        self._entries.move_to_end(block_hash)

    def allocate(self, block_hash: bytes, has_activations: bool) -> int | None:
        """A slot for a new block, evicting the least recently used unpinned one if full;
        None when every slot is pinned (the block is then simply not offloaded)."""
        if block_hash in self._entries:
            raise KeyError("block already stored")
        has_kv = not (self.act_slots and has_activations)
        if not self._free[has_kv] and not self._evict_one(has_kv):
            return None
        slot = self._free[has_kv].pop()
        self._entries[block_hash] = Entry(slot, has_activations, has_kv=has_kv)
        self._with_act += has_activations
        return slot

    def _evict_one(self, has_kv: bool) -> bool:
        for h, entry in self._entries.items():
            if entry.pins == 0 and entry.has_kv == has_kv:
                self._drop(h)
                self.evictions += 1
                return True
        return False

    def _drop(self, block_hash: bytes) -> None:
        entry = self._entries.pop(block_hash)
        entry.indexed = False
        self._with_act -= entry.has_activations
        if entry.pins == 0:
            self._free[entry.has_kv].append(entry.slot)

    def discard(self, hashes: Iterable[bytes]) -> int:
        """Drop these entries (bad copies, or a cache reset): they are no longer offered and can be
        stored again at once; the slot of one that a load still reads is freed when the load ends.
        Returns how many entries were found."""
        found = [h for h in dict.fromkeys(hashes) if h in self._entries]
        for h in found:
            self._drop(h)
        return len(found)

    def usage(self) -> StoreUsage:
        """Both slot kinds together (K/V slots and, with host layout "act", activations-only ones)."""
        capacity = self.num_slots + self.act_slots
        free = len(self._free[True]) + len(self._free[False])
        return StoreUsage(capacity, capacity - free, self._pinned, self._with_act)

    def clear(self) -> int:
        """Drop every entry, as vLLM's own CPU offloading does on reset_prefix_cache (weights may
        have changed: nothing stored before may be served after)."""
        return self.discard(list(self._entries))


KV_SHARE_OF_ACT_LAYOUT = 1 / 16
"""Host layout "act": the part of cpu_bytes kept for K/V slots, for the blocks stored without
activations (the capture space was full, or they were restored). Small, so that activations-only
slots (half a K/V slot for multi-head models) make up the store: 1.94x the blocks of "kv"."""


def slots_for_layout(cpu_bytes: int, kv_block_bytes: int, act_block_bytes: int, layout: str) -> tuple[int, int]:
    """(K/V slots, activations-only slots) for a host layout; both halves call this with the same
    sizes. "kv+act": one slot holds a block's K/V and its activations (when it has them); "kv":
    K/V only; "act": activations only for the blocks that have them, K/V for the others."""
    if layout == "kv":
        return slots_for_budget(cpu_bytes, kv_block_bytes), 0
    if layout == "kv+act":
        return slots_for_budget(cpu_bytes, kv_block_bytes + act_block_bytes), 0
    if layout != "act":
        raise ValueError(f"unknown host layout {layout!r}")
    kv_slots = max(1, int(cpu_bytes * KV_SHARE_OF_ACT_LAYOUT) // kv_block_bytes)
    return kv_slots, slots_for_budget(cpu_bytes - kv_slots * kv_block_bytes, act_block_bytes)


def slots_for_budget(cpu_bytes: int, bytes_per_block: int) -> int:
    if bytes_per_block <= 0:
        raise ValueError("bytes_per_block must be positive")
    n = cpu_bytes // bytes_per_block
    if n < 1:
        raise ValueError(
            f"cpu_bytes={cpu_bytes} cannot hold a single block ({bytes_per_block} bytes per block "
            "for all layers, on every tensor-parallel rank); raise cpu_bytes"
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
    (or the OOM killer) halfway through: at model load for the device buffers, and once vLLM has
    sized its KV cache for the host store and what the device still needs then (the recompute
    workspace, the start-up profile's inputs); a pinned host pool larger than RAM can take the
    machine down."""
    for device, need in needs.items():
        free = available_bytes(device)
        if need <= free:
            continue
        if device.type == "cpu":
            hint = "lower cpu_bytes (--kv-offload-size)"
        else:
            hint = (
                "lower --gpu-memory-utilization or --kv-cache-memory-bytes, capture_tokens or "
                "max_recompute_tokens, set recompute_ratio to a number (no start-up profile is "
                "measured), or to 0 to keep no activations"
            )
        raise RuntimeError(
            f"partial_kv needs {need / 2**30:.2f} GiB of {device} memory for its store and "
            f"recompute buffers but only {free / 2**30:.2f} GiB are available: {hint}"
        )


class HostPool:
    """Per layer: host views shaped like the GPU block views (K/V) and the activations, slot-first,
    all in one host allocation of exactly the store's size.

    Pinned when CUDA is present (pageable host-to-device copies run at 7-9 GB/s against 54 GB/s
    from pinned memory on an H100), the way vLLM's own offloading pins its host region: the one
    buffer is registered with the driver (`compat.pin_host_memory`). torch's pinned allocator
    would round every tensor up to a power of two instead (a 16 GiB store for an MHA-7B model
    pinned ~24 GiB) while the start-up room check counts the store's size.
    """

    def __init__(
        self,
        num_slots: int,
        kv_block_views: dict[str, list[torch.Tensor]],
        act_block_shape: tuple[int, int] | None,
        act_dtype: torch.dtype,
        pin: bool,
        act_slots: int | None = None,
    ) -> None:
        """`act_slots`: activation slots numbered apart from the K/V ones (host layout "act");
        None: each K/V slot has its activation slot (same number)."""
        self.num_slots = num_slots
        # (layer, is K/V, shape, strides, dtype) of every view. K/V keep the device blocks' element
        # order: blocks are copied as raw bytes, so a host block must read back in the device's
        # (possibly permuted) order.
        layout = []
        for name, views in kv_block_views.items():
            for v in views:
                layout.append((name, True, (num_slots, *v.shape[1:]), _slot_strides(name, v), v.dtype))
            if act_block_shape is not None:
                shape = (num_slots if act_slots is None else act_slots, *act_block_shape)
                layout.append((name, False, shape, _contiguous_strides(shape), act_dtype))
        # Widest elements first (a stable sort: K stays before V), so that every view starts at a
        # multiple of its element size without padding.
        layout.sort(key=lambda item: -item[4].itemsize)
        sizes = [math.prod(shape) * dtype.itemsize for _, _, shape, _, dtype in layout]
        self.buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        self.kv: dict[str, list[torch.Tensor]] = {name: [] for name in kv_block_views}
        self.act: dict[str, torch.Tensor] = {}
        offset = 0
        for (name, is_kv, shape, strides, dtype), size in zip(layout, sizes):
            view = self.buffer[offset : offset + size].view(dtype).as_strided(shape, strides)
            if is_kv:
                self.kv[name].append(view)
            else:
                self.act[name] = view
            offset += size
        self.pinned = False
        if pin:
            from vllm_partial_kv import compat  # only here: the index above stays free of vLLM

            unpin = compat.pin_host_memory(self.buffer)
            if unpin is not None:
                self.pinned = True
                # Before the buffer is freed, never while in use; process exit frees it anyway.
                weakref.finalize(self, unpin).atexit = False
        logger.info(
            "partial_kv host store: %d block slots%s, %.2f GiB%s, activations %s",
            num_slots,
            "" if act_slots is None else f" + {act_slots} activations-only slots",
            self.nbytes / 2**30,
            " pinned" if self.pinned else "",
            "kept" if act_block_shape is not None else "not kept",
        )

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def _slot_strides(name: str, block_view: torch.Tensor) -> tuple[int, ...]:
    """The device view's strides, one dense block per slot; a block with holes or overlaps
    cannot be copied as one run of bytes."""
    block = block_view[0]
    extent = 1 + sum((n - 1) * s for n, s in zip(block.shape, block.stride()))
    if extent != block.numel():
        raise ValueError(
            f"{name}: KV blocks of shape {tuple(block.shape)} with strides {block.stride()} are "
            "not dense in memory: they cannot be copied as bytes"
        )
    return (block.numel(), *block.stride())
