"""Runs a step's stores and restores on the worker.

Stores (CUDA) run on their own stream after the forward that wrote the blocks, overlapping the
next steps; a block stays readable until vLLM reallocates it, and a capture block until the
scheduler lends it again, so `before_forward` (called before vLLM writes a step's new blocks and
the capture op its rows) and restores reading a slot wait only for the stores involved.

Restore pipeline (CUDA), per layer l, on two side streams:
    copy stream:    activations of the recomputed blocks -> staging[l % 2], then K/V of the
                    streamed blocks -> their paged blocks
    compute stream: wait for layer l's activations, recompute K/V into the paged blocks,
                    release staging[l % 2] for layer l + 2, wait for layer l's K/V copy,
                    mark layer l done
so layer l+1's copies overlap layer l's recompute. Under tensor parallelism the staging holds this
rank's shard of the activation columns, and the compute stream first joins every rank's shards
(`gather`, a collective: every rank restores the same blocks with the same split).
Who waits for it (`wait`):
    "none"   nobody: an asynchronous load (the default); vLLM keeps the request waiting until
             the event `load` returns has completed, and other requests' steps run meanwhile
    "layers" the forward's attention for layer l (`wait_layer`, called by vLLM from inside the
             forward) waits only for layer l
    "whole"  the forward waits for the whole restore (a step replayed as one full CUDA graph
             never calls back)
Consecutive restores are ordered on the side streams themselves (a restore's index and staging
writes follow the previous restore's reads), so a restore nobody waits for is still safe.
On the CPU the same steps run one after the other.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from vllm_partial_kv import compat, formats
from vllm_partial_kv.capture import LayerRecompute
from vllm_partial_kv.fp8_copies import Fp8Copies
from vllm_partial_kv.kernels.quant import FP8, dequantize_rows, triton_fp8_ok
from vllm_partial_kv.store import HostPool

logger = logging.getLogger(__name__)


@dataclass
class LoadSpec:
    """One request's restore: host slots and GPU blocks in block order, from `first_position`."""

    slots: list[int]
    block_ids: list[int]
    first_position: int
    recompute_blocks: int = 0
    req_id: str = ""
    must_recompute: int = 0  # leading blocks stored without K/V (host layout "act")
    fmt: str = "auto"  # the host format its blocks were stored in (`formats`)


Wait = Literal["none", "layers", "whole"]


@dataclass
class _StoreInFlight:
    done: torch.cuda.Event
    block_ids: frozenset[int]
    slots: frozenset[int]
    capture_blocks: frozenset[int]


@dataclass
class StepStats:
    stored_blocks: int = 0
    stored_without_activations: int = 0  # while activations are kept: no capture block, or restored
    loaded_blocks: int = 0
    recomputed_blocks: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    failed_restores: int = 0
    restore_seconds: list[float] = field(default_factory=list)


def copy_rows_as_bytes(memcpy, dst: torch.Tensor, dst_idx: torch.Tensor, src: torch.Tensor, src_idx: torch.Tensor) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for whole slot-rows, as raw bytes in one batched call.

    No layout knowledge is needed as long as a row is one dense chunk and both sides keep its
    elements in the same order (the host pool mirrors the device strides): vLLM 0.26's
    FlashAttention cache, for one, is logically [blocks, heads, block, 2*head] but stored NHD.
    """
    row = src[0].numel() * src.element_size()
    for t in (dst, src):
        if t.stride(0) * t.element_size() != row or t[0].numel() * t.element_size() != row:
            raise ValueError(f"slot rows of {tuple(t.shape)} are not dense: cannot copy them as bytes")
    if dst.stride()[1:] != src.stride()[1:]:
        raise ValueError(
            f"host and device blocks keep their elements in different orders "
            f"({dst.stride()} vs {src.stride()})"
        )
    memcpy(src_idx * row + src.data_ptr(), dst_idx * row + dst.data_ptr(), torch.full_like(src_idx, row))


class _RowCopier:
    """Copies whole slot-rows between a host tensor and a device tensor (both slot-first); the
    indices are CPU int64 tensors built once per step and shared by every layer."""

    def __init__(self) -> None:
        self._memcpy = compat.batched_memcpy()

    def __call__(self, dst: torch.Tensor, dst_idx: torch.Tensor, src: torch.Tensor, src_idx: torch.Tensor):
        if not len(dst_idx):
            return
        if int(dst_idx.max()) >= dst.shape[0] or int(src_idx.max()) >= src.shape[0]:
            raise IndexError(
                f"block copy out of range ({int(src_idx.max())} of {src.shape[0]} -> "
                f"{int(dst_idx.max())} of {dst.shape[0]}): scheduler and worker disagree on the store size"
            )
        if self._memcpy is not None and (dst.is_cuda or src.is_cuda):
            copy_rows_as_bytes(self._memcpy, dst, dst_idx, src, src_idx)
        elif dst.device == src.device:
            if dst.element_size() == 1:  # fp8 has no CPU index_copy_: copy the bytes
                dst, src = dst.view(torch.uint8), src.view(torch.uint8)
            dst.index_copy_(0, dst_idx.to(dst.device), src[src_idx.to(src.device)])
        else:  # no batched copy available: one copy per row
            for di, si in zip(dst_idx.tolist(), src_idx.tolist()):
                dst[di].copy_(src[si], non_blocking=True)


def _index(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


class RestoreRuntime:
    def __init__(
        self,
        kv_caches: dict[str, torch.Tensor],
        num_gpu_blocks: int,
        block_size: int,
        pool: HostPool,
        act_buffers: dict[str, torch.Tensor],
        layers: dict[str, LayerRecompute],
        max_recompute_tokens: int,
        kernel: str = "auto",
        capture_map: torch.Tensor | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        staging: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None,
        staging_scale: list[torch.Tensor] | None = None,
    ) -> None:
        """`staging`: the staging buffers and the recomputed tokens' slot and position buffers made
        at model load (`device_buffers`), for max_recompute_tokens; None: allocated here (a runtime
        without an engine). `staging_scale`: with the fp8 host format, the staged rows' scales."""
        self.kv_caches = kv_caches
        self.gather = gather  # activation shards of every rank -> whole rows; None: rows are whole
        self.names = list(kv_caches)
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.pool = pool
        self.layers = layers
        self.kernel = kernel
        self.gpu_views = {n: compat.block_views(t, num_gpu_blocks) for n, t in kv_caches.items()}
        # The capture space as [capture_blocks, block_size, hidden] block rows (the spare last
        # row left out), and the map from KV block to capture block the capture op reads.
        self.act_views = {
            n: b[: (b.shape[0] - 1) // block_size * block_size].view(-1, block_size, b.shape[-1])
            for n, b in act_buffers.items()
        }
        self.capture_map = capture_map
        self._capture_space = list(act_buffers.values())
        self.copy = _RowCopier()
        self._kv_slot_bytes = sum(t[0].numel() * t.element_size() for v in pool.kv.values() for t in v)
        self._act_slot_bytes = sum(t[0].numel() * t.element_size() for t in (*pool.act.values(),
                                                                             *pool.act_scale.values()))
        self.device = next(iter(kv_caches.values())).device
        self.cuda = self.device.type == "cuda"
        self.max_recompute_tokens = max_recompute_tokens - max_recompute_tokens % block_size
        self.staging: list[torch.Tensor] = []
        self.staging_scale: list[torch.Tensor] = []  # fp8 rows' scales, one per row
        if self.act_views and staging is not None:
            self.staging, self._slots_buf, self._pos_buf = staging
            self.staging_scale = staging_scale or []
            if self._slots_buf.shape[0] < self.max_recompute_tokens:
                raise ValueError(f"staging for {self._slots_buf.shape[0]} tokens, {self.max_recompute_tokens} asked")
            if self.staging[0].dtype != next(iter(pool.act.values())).dtype or bool(pool.act_scale) != bool(
                    self.staging_scale):
                raise ValueError(f"{self.staging[0].dtype} staging cannot hold the host store's {pool.format} rows")
        elif self.act_views:
            hidden = next(iter(self.act_views.values())).shape[-1]
            dtype = next(iter(pool.act.values())).dtype  # the host's: fp8 in the fp8 format
            n_staging = 2 if self.cuda else 1
            self.staging = [
                torch.empty(
                    (self.max_recompute_tokens // block_size, block_size, hidden),
                    dtype=dtype,
                    device=self.device,
                )
                for _ in range(n_staging)
            ]
            self.staging_scale = [torch.empty(t.shape[:2], device=self.device) for t in self.staging if pool.act_scale]
            self._slots_buf = torch.empty(self.max_recompute_tokens, dtype=torch.long, device=self.device)
            self._pos_buf = torch.empty(self.max_recompute_tokens, dtype=torch.long, device=self.device)
        self.fp8 = None  # the fp8 host store's quantized copies
        if pool.format == "fp8":
            cache_bytes = next(iter(kv_caches.values())).element_size()
            self.fp8 = Fp8Copies(kv_caches, num_gpu_blocks, block_size, formats.quantizes_kv("fp8", cache_bytes),
                                 next(iter(self.act_views.values())).shape[-1] if self.act_views else None,
                                 self.copy, self.device)
        self.stats = StepStats()
        self.last_loads: list[LoadSpec] = []  # the latest restore, for logs and tests
        self.last_waited: list[str] = []  # layers the latest restoring forward waited for, in order
        self.layerwise = True  # cleared for good if vLLM ever skips a layer's wait
        self._awaiting: dict[str, torch.cuda.Event | None] = {}
        self._pending_timers: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stores: list[_StoreInFlight] = []  # oldest first; CUDA only
        if self.cuda:
            self._init_streams()

    @property
    def act_dtype(self) -> torch.dtype:
        """The model's dtype: the capture space's rows."""
        return next(iter(self.act_views.values())).dtype

    @property
    def extra_device_bytes(self) -> int:
        """What the runtime holds on the KV cache's device beside it: capture space and its map,
        restore staging and index buffers."""
        tensors = [*self._capture_space, *self.staging, *self.staging_scale]
        if self.staging:
            tensors += [self._slots_buf, self._pos_buf, self.capture_map]
        fp8 = self.fp8.device_bytes if self.fp8 is not None else 0
        return fp8 + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _init_streams(self) -> None:
        """Streams and the per-layer events, created once (a restore or store only adds its
        own completion events)."""
        self.copy_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.Stream(self.device)
        self.store_stream = torch.cuda.Stream(self.device)
        self._free = [torch.cuda.Event(), torch.cuda.Event()]
        self._x_ready = torch.cuda.Event()
        self._kv_ready = torch.cuda.Event()
        self._layer_done = {name: torch.cuda.Event() for name in self.names}

    # ---------------------------------------------------------------- stores (device -> host)
    def store(
        self, block_ids: list[int], slots: list[int], capture_blocks: list[int], with_kv: list[bool] | None = None
    ) -> torch.cuda.Event | None:
        """Copy blocks the forward just completed to their host slots: K/V (unless `with_kv` says
        the slot holds activations only), and the activations from the block's capture block
        where it has one (-1: none, its inputs were not kept). Returns the event the copies
        complete with (None on the CPU: they have)."""
        if not block_ids:
            return None
        done = None
        act = [(s, c) for s, c in zip(slots, capture_blocks) if c >= 0] if self.act_views else []
        kv = [(s, b) for s, b, k in zip(slots, block_ids, with_kv or [True] * len(slots)) if k]
        if self.cuda:
            self.store_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.store_stream):
                self._store(kv, act)
            done = torch.cuda.Event()
            self.store_stream.record_event(done)
            self._stores.append(
                _StoreInFlight(done, frozenset(block_ids), frozenset(slots), frozenset(c for _, c in act))
            )
        else:
            self._store(kv, act)
        self.stats.stored_blocks += len(block_ids)
        if self.act_views:
            self.stats.stored_without_activations += len(block_ids) - len(act)
        self.stats.bytes_to_host += len(kv) * self._kv_slot_bytes + len(act) * self._act_slot_bytes
        return done

    def _store(self, kv: list[tuple[int, int]], act: list[tuple[int, int]]) -> None:
        """(host slot, GPU block) pairs of K/V and (activation slot, capture block) pairs."""
        if kv:
            slot_idx, block_idx = (_index(list(c)) for c in zip(*kv))
            for name in self.names:
                if self.fp8 is not None and self.fp8.kv:
                    self.fp8.store_kv(name, self.pool.kv[name], slot_idx, block_idx)
                    continue
                for dst, src in zip(self.pool.kv[name], self.gpu_views[name]):
                    self.copy(dst, slot_idx, src, block_idx)
        if act:
            act_slots, act_blocks = (_index(list(c)) for c in zip(*act))
            for name in self.names:
                if self.pool.act_scale:
                    self.fp8.store_act(self.act_views[name], self.pool.act[name], self.pool.act_scale[name],
                                       act_slots, act_blocks)
                else:
                    self.copy(self.pool.act[name], act_slots, self.act_views[name], act_blocks)

    def _last_store_touching(self, key: str, ids: list[int]) -> torch.cuda.Event | None:
        """The newest store in flight that reads one of these GPU blocks (key "block_ids") or
        capture blocks ("capture_blocks"), or writes one of these host slots ("slots"): waiting
        for it covers the older ones too."""
        self._stores = [s for s in self._stores if not s.done.query()]
        for s in reversed(self._stores):
            if not getattr(s, key).isdisjoint(ids):
                return s.done
        return None

    def fence_blocks(self, block_ids: list[int]) -> None:
        """Before vLLM writes these (newly allocated) GPU blocks on the current stream."""
        self._fence("block_ids", block_ids)

    def _fence(self, key: str, ids: list[int]) -> None:
        if self.cuda and self._stores:
            done = self._last_store_touching(key, ids)
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)

    def set_capture_map(self, block_ids: list[int], capture_blocks: list[int]) -> None:
        """Before the forward: where the capture op writes the rows of each block it fills this
        step (in place on the current stream: the map keeps its address for CUDA graphs). A capture
        block lent again waits for the store still reading it."""
        if self.capture_map is None or not block_ids:
            return
        self._fence("capture_blocks", [c for c in capture_blocks if c >= 0])
        idx = torch.tensor(block_ids, dtype=torch.long)
        values = torch.tensor(capture_blocks, dtype=torch.int32)
        if self.capture_map.is_cuda:  # pinned: a pageable source would make the host wait
            idx, values = idx.pin_memory(), values.pin_memory()
        self.capture_map.index_copy_(
            0, idx.to(self.device, non_blocking=True), values.to(self.device, non_blocking=True)
        )

    # ---------------------------------------------------------------- restores (host -> device)
    def load(self, loads: list[LoadSpec], wait: Wait = "layers") -> torch.cuda.Event | None:
        """Issue a step's restores. Returns, for `wait="none"`, an event that completes with
        the restore (None when it already has, on the CPU). A restore that raises midway is
        drained first: vLLM rewrites the blocks of a failed restore and must not race its copies."""
        if not loads:
            return None
        for spec in loads:
            if spec.fmt != self.pool.format:
                raise ValueError(f"blocks stored in host format {spec.fmt!r} cannot be read from a "
                                 f"{self.pool.format!r} store")
        try:
            return self._load(loads, wait)
        except BaseException:
            self.drain()
            raise

    def drain(self) -> None:
        """Order what follows on the current stream after the restore's copies and recomputes:
        for a restore that failed here or on another rank, whose blocks vLLM rewrites."""
        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.copy_stream)
            main.wait_stream(self.compute_stream)

    def _local(self, failed: list[Exception], fn: Callable[..., None], *args, **kwargs) -> None:
        """One of this rank's own steps of a restore. With activation shards the other ranks wait
        in every layer's all-gather, so after a failure the restore skips its own steps but still
        joins each gather, and raises the first failure once all of them are issued."""
        if failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            if self.gather is None:
                raise
            failed.append(e)

    def _load(self, loads: list[LoadSpec], wait: Wait) -> torch.cuda.Event | None:
        self.last_loads = loads
        self.last_waited = []
        rc_slots, rc_blocks, positions = [], [], []
        kv_slots, kv_blocks = [], []
        for spec in loads:
            r = spec.recompute_blocks
            rc_slots += spec.slots[:r]
            rc_blocks += spec.block_ids[:r]
            kv_slots += spec.slots[r:]
            kv_blocks += spec.block_ids[r:]
            if r:
                positions.append(torch.arange(spec.first_position, spec.first_position + r * self.block_size))
        n_rc = len(rc_blocks) * self.block_size
        if n_rc > self.max_recompute_tokens:
            raise ValueError(f"{n_rc} recompute tokens exceed the staging capacity {self.max_recompute_tokens}")
        if n_rc and not self.layers:
            raise RuntimeError("recompute requested but no activations are captured")
        failed: list[Exception] = []
        if n_rc:
            blocks = _index(rc_blocks)
            slot_map = (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
            # On the compute stream: after the previous restore's recomputes read the buffers.
            with torch.cuda.stream(self.compute_stream) if self.cuda else contextlib.nullcontext():
                self._local(failed, self._write_index, slot_map, torch.cat(positions))
        if wait == "layers" and not self.layerwise:
            wait = "whole"
        kv_idx = (_index(kv_slots), _index(kv_blocks))
        rc_idx = (_index(rc_slots), torch.arange(len(rc_slots)))  # host slot -> staging row
        done = None
        if self.cuda:
            stored = self._last_store_touching("slots", rc_slots + kv_slots)
            done = self._load_pipelined(rc_idx, kv_idx, n_rc, wait, stored, failed)
        else:
            t0 = time.perf_counter()
            for name in self.names:
                self._local(failed, self._copy_kv, name, *kv_idx)
                if n_rc:
                    self._local(failed, self._copy_act, 0, name, rc_idx)
                    self._local(failed, self._recompute, name, self._rows(0, n_rc), n_rc, **self._scales(0, n_rc))
            if failed:
                raise failed[0]
            self.stats.restore_seconds.append(time.perf_counter() - t0)
            if wait == "layers":  # nothing to wait for, but the forward's calls are still checked
                self._awaiting = dict.fromkeys(self.names)
        self.stats.loaded_blocks += len(kv_blocks) + len(rc_blocks)
        self.stats.recomputed_blocks += len(rc_blocks)
        self.stats.bytes_to_device += (
            len(kv_blocks) * self._kv_slot_bytes + len(rc_blocks) * self._act_slot_bytes
        )
        return done if wait == "none" else None

    def _write_index(self, slot_map: torch.Tensor, positions: torch.Tensor) -> None:
        """Slots and positions of the recomputed tokens (on the compute stream, which reads them).
        From pinned memory on CUDA: a pageable source may make the host wait for the stream,
        i.e. for the previous restore, which an asynchronous load must not."""
        if self.cuda:
            slot_map, positions = slot_map.pin_memory(), positions.pin_memory()
        n = slot_map.numel()
        self._slots_buf[:n].copy_(slot_map, non_blocking=True)
        self._pos_buf[:n].copy_(positions, non_blocking=True)

    def _load_pipelined(
        self, rc_idx, kv_idx, n_rc: int, wait: Wait, stored: torch.cuda.Event | None, failed: list[Exception]
    ) -> torch.cuda.Event:
        main = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        main.record_event(start)
        # After vLLM's fence on the blocks it writes, after the previous restore's recomputes
        # (staging reuse), and after the newest store into a slot it reads (`stored`); the
        # compute stream follows through its waits on the copy stream's events.
        self.copy_stream.wait_stream(main)
        self.copy_stream.wait_stream(self.compute_stream)
        if stored is not None:
            self.copy_stream.wait_event(stored)
        for layer, name in enumerate(self.names):
            slot = layer % 2
            with torch.cuda.stream(self.copy_stream):
                if n_rc:
                    if layer >= 2:
                        self.copy_stream.wait_event(self._free[slot])
                    self._local(failed, self._copy_act, slot, name, rc_idx)
                    self.copy_stream.record_event(self._x_ready)
                self._local(failed, self._copy_kv, name, *kv_idx)
                self.copy_stream.record_event(self._kv_ready)
            with torch.cuda.stream(self.compute_stream):
                if n_rc:
                    self.compute_stream.wait_event(self._x_ready)
                    self._local(failed, self._recompute, name, self._rows(slot, n_rc), n_rc,
                                **self._scales(slot, n_rc))
                    self.compute_stream.record_event(self._free[slot])
                self.compute_stream.wait_event(self._kv_ready)
                self.compute_stream.record_event(self._layer_done[name])
        if failed:
            raise failed[0]
        self.compute_stream.record_event(end)
        self._pending_timers.append((start, end))
        if wait == "layers":
            self._awaiting = dict(self._layer_done)
        elif wait == "whole":
            main.wait_event(end)
        return end

    def _copy_act(self, slot: int, name: str, rc_idx: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Host activation slots -> staging rows (with their scales in the fp8 format)."""
        self.copy(self.staging[slot], rc_idx[1], self.pool.act[name], rc_idx[0])
        if self.pool.act_scale:
            self.copy(self.staging_scale[slot], rc_idx[1], self.pool.act_scale[name], rc_idx[0])

    def _rows(self, slot: int, n: int) -> torch.Tensor:
        """The first n activation rows in staging slot `slot`, joined across the ranks if sharded.
        Shards are joined in the model's dtype: each rank's fp8 shard has scales of its own."""
        x = self.staging[slot].view(-1, self.staging[slot].shape[-1])[:n]
        if self.gather is None:
            return x
        if self.staging_scale:
            x = dequantize_rows(x, self.staging_scale[slot].view(-1)[:n], self.act_dtype)
        return self.gather(x)

    def _scales(self, slot: int, n: int) -> dict[str, torch.Tensor]:
        """The recompute's `x_scale` for the rows `_rows` returns: their scales where they are fp8."""
        if not self.staging_scale or self.gather is not None:
            return {}
        return {"x_scale": self.staging_scale[slot].view(-1)[:n]}

    def wait_layer(self, name: str) -> None:
        """Called before the forward reads layer `name`: order it after that layer's restore."""
        if name not in self._awaiting:
            return  # no restore this step, or a layer vLLM calls twice
        event = self._awaiting.pop(name)
        self.last_waited.append(name)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def finish_step(self) -> None:
        """After the forward: catch forwards that skipped a layer's wait, and order what follows
        (stores into slots the restore reads, vLLM's next writes) after those layers' restore."""
        if self._awaiting:
            for event in self._awaiting.values():
                if event is not None:  # None on the CPU: nothing runs beside the forward
                    torch.cuda.current_stream(self.device).wait_event(event)
            logger.warning(
                "partial_kv: the forward read %d restored layers without waiting for them "
                "(first: %s); from now on the whole restore completes before the forward",
                len(self._awaiting), next(iter(self._awaiting)),
            )
            self.layerwise = False
            self._awaiting = {}

    def _copy_kv(self, name: str, slots: torch.Tensor, blocks: torch.Tensor) -> None:
        if self.fp8 is not None and self.fp8.kv:
            self.fp8.load_kv(name, self.pool.kv[name], slots, blocks)
            return
        for dst, src in zip(self.gpu_views[name], self.pool.kv[name]):
            self.copy(dst, blocks, src, slots)

    def tune_recompute(self) -> None:
        """Decide the Triton recompute's way and tile for every power-of-two bucket of tokens a
        restore can recompute, now, before serving: timing a bucket at its first restore would
        synchronize the device under live requests. Every layer runs its serving call (real cache
        views, weights, staging and index buffers), so that serving finds each call's key tuned;
        layers of one shape share the timing. Where the kernel cannot run, restores use vLLM's
        own modules from the start (`_recompute` logs why). The cache holds no data yet: the
        zeroed inputs write finite K/V into its first blocks."""
        if not (self.cuda and self.layers and self.kernel != "torch"):
            return
        started = time.perf_counter()
        n = self.max_recompute_tokens
        largest: dict[int, int] = {}  # token bucket -> the most tokens a restore recomputes in it
        for tokens in range(self.block_size, n + 1, self.block_size):
            largest[1 << (tokens - 1).bit_length()] = tokens
        rotary = [s.rope.table.shape[0] for s in self.layers.values() if s.rope is not None]
        slots = torch.arange(n) % (self.num_gpu_blocks * self.block_size)
        self._write_index(slots, torch.arange(n) % min(rotary, default=n))
        x = self.staging[0].view(-1, self.staging[0].shape[-1]).zero_()
        width = next(iter(self.layers.values())).hidden_size
        if x.shape[-1] != width:  # the staging holds shards; the kernel reads whole rows, unscaled
            x = torch.zeros(n, width, dtype=self.act_dtype, device=self.device)
        for tokens in largest.values():
            for name in self.names:
                scale = self.staging_scale[0].view(-1)[:tokens].fill_(1.0) if x.dtype == FP8 else None
                self._recompute(name, x[:tokens], tokens, tune=True, x_scale=scale)
                if self.kernel == "torch":
                    return
        torch.cuda.synchronize(self.device)
        logger.info("partial_kv: K/V recompute tuned for %d token buckets up to %d tokens in %.1f s",
                    len(largest), n, time.perf_counter() - started)

    def _recompute(self, name: str, x: torch.Tensor, n: int, tune: bool = False,
                   x_scale: torch.Tensor | None = None) -> None:
        """K/V of n rows of x into the paged blocks; x_scale: x holds fp8 rows with these scales."""
        spec = self.layers[name]
        slots, positions = self._slots_buf[:n], self._pos_buf[:n]
        attn = spec.attn
        heads, head = attn.num_kv_heads, attn.head_size
        use_triton = self.cuda and self.kernel != "torch" and spec.has_dense_weight and (
            x_scale is None or triton_fp8_ok(self.device))  # fp8 rows: e4m3 loads need sm_89+
        if use_triton:
            from vllm_partial_kv.kernels import recompute_kv

            try:
                k_view, v_view = compat.kv_cache_views(
                    self.kv_caches[name], self.num_gpu_blocks, attn.kv_cache_dtype
                )
            except ValueError:  # a layout or cache dtype the kernel does not write: vLLM's op does
                use_triton = False
        if use_triton:
            rope = spec.rope
            b_k, b_v = spec.biases()
            scaled = self.kv_caches[name].element_size() == 1
            try:
                recompute_kv(
                    x, spec.w_k, spec.w_v, k_view, v_view, slots, positions,
                    rope.table if rope is not None else None,
                    is_neox=rope.is_neox if rope is not None else True,
                    b_k=b_k, b_v=b_v,
                    k_norm_weight=spec.k_norm.weight if spec.k_norm is not None else None,
                    k_norm_eps=spec.k_norm.variance_epsilon if spec.k_norm is not None else 1e-6,
                    k_scale=attn._k_scale_float if scaled else None,
                    v_scale=attn._v_scale_float if scaled else None,
                    backend="triton", tune=tune, x_scale=x_scale,
                )
                return
            except Exception:  # refused or failed to compile before writing anything
                logger.exception(
                    "partial_kv: the Triton recompute kernel failed on %s; restores use vLLM's "
                    "own modules from now on", name,
                )
                self.kernel = "torch"
        # Reference path: vLLM's own modules for the norm and RoPE, and the attention backend's
        # own cache write, so every layout and cache dtype vLLM supports is handled.
        if x_scale is not None:
            x = dequantize_rows(x, x_scale, self.act_dtype)
        k, v = spec.project_kv(x)
        if spec.k_norm is not None:
            k = spec.k_norm(k.view(-1, heads, head)).view(-1, heads * head)
        if spec.rope is not None:
            k = spec.rope.apply(positions, k)
        attn.impl.do_kv_cache_update(
            attn, k.view(-1, heads, head), v.view(-1, heads, head), self.kv_caches[name], slots
        )

    def take_stats(self) -> StepStats:
        done = [(s, e) for s, e in self._pending_timers if e.query()]
        self._pending_timers = [p for p in self._pending_timers if p not in done]
        self.stats.restore_seconds += [s.elapsed_time(e) / 1e3 for s, e in done]
        stats, self.stats = self.stats, StepStats()
        return stats
