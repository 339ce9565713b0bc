"""The connector's scheduler half: which blocks are on the host, which to store, which to restore.

Finds offloaded prefixes by vLLM's block hashes, pins them until they are loaded, allocates host
slots for blocks that fill up (prompt and, by default, decode), and lends the GPU capture space's
blocks to the KV blocks being filled. Everything it decides reaches the worker half in the step's
`PartialKVMetadata`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data

from vllm_partial_kv import compat
from vllm_partial_kv.capture_space import CaptureSpace
from vllm_partial_kv.config import PartialKVConfig
from vllm_partial_kv.deployment import capture_blocks, model_shape, over_ranks, served_layout
from vllm_partial_kv.formats import quantizes_kv
from vllm_partial_kv.metadata import PartialKVMetadata
from vllm_partial_kv.metrics import PartialKVStats
from vllm_partial_kv.restore import LoadSpec
from vllm_partial_kv.store import BlockIndex, Entry, StoreUsage, slots_for_layout

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


def _num_slots(vllm_config, kv_cache_config, cfg: PartialKVConfig, with_act: bool) -> tuple[int, int]:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError("PartialRecomputeConnector supports one KV cache group (full attention)")
    spec = groups[0].kv_cache_spec
    n_layers = len(groups[0].layer_names)
    shape = model_shape(vllm_config, spec.block_size)
    act_block = spec.block_size * shape.act_bytes_per_token * n_layers
    # The worker's slot views: the device pages as they are, or (fp8 over a 16-bit cache) fp8 and scales.
    kv_page = spec.block_size * shape.kv_bytes_per_token if quantizes_kv(cfg.host_format, shape.kv_dtype_bytes) \
        else spec.page_size_bytes
    return slots_for_layout(
        cfg.cpu_bytes, over_ranks(vllm_config, kv_page * n_layers, n_layers),
        over_ranks(vllm_config, act_block, n_layers), served_layout(cfg, with_act),
    )


@dataclass
class _Request:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    stored_blocks: int = 0  # leading blocks already stored or known to be in the store
    load: tuple[int, list[Entry]] | None = None  # (first block, its host entries) to restore
    pinned: list[Entry] = field(default_factory=list)
    replace_ids: bool = True  # next block ids from the scheduler are the whole list
    capture: dict[int, int] = field(default_factory=dict)  # block index -> lent capture block
    fetch: list = field(default_factory=list)  # the load's blocks read from the storage tier first
    load_failed: bool = False  # a restore of it failed: it never looks up the host store again


class RestoreBreaker:
    """Host hits are not offered for `cooldown_s` after `threshold` steps in a row whose restores
    failed; then restores probe again, and one more failure opens it again at once (as vLLM 0.34's
    `CircuitBreaker` in kv_connector/utils.py, which older vLLMs lack, does for transfers). A step's restores
    count as done once an engine output two steps later reported none of them failed (with
    asynchronous scheduling a step's output arrives after the next step is scheduled)."""

    def __init__(self, threshold: int = 3, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold, self.cooldown_s, self.clock = threshold, cooldown_s, clock
        self.failures = 0
        self.open_until = 0.0

    def allows(self) -> bool:
        return self.clock() >= self.open_until

    def failed(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self.clock() + self.cooldown_s
            logger.warning(
                "partial_kv: restores failed in %d steps in a row; host hits are not offered for %.0f s",
                self.failures, self.cooldown_s,
            )

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0


class PartialKVScheduler:
    storage = None  # the storage tier's index (storage_tier.SchedulerTier), with storage_dir

    def __init__(self, vllm_config, kv_cache_config, cfg: PartialKVConfig, with_act: bool) -> None:
        self.cfg = cfg
        self.with_act = with_act
        self.block_size = vllm_config.cache_config.block_size
        self.layout = served_layout(cfg, with_act)
        self.num_slots, act_slots = _num_slots(vllm_config, kv_cache_config, cfg, with_act)
        self.index = BlockIndex(self.num_slots, act_slots, fmt=cfg.host_format)
        # Blocks that restores of this step must recompute (activations-only slots), within
        # the staging capacity; counted as get_num_new_matched_tokens offers them.
        self._forced_blocks = 0
        self.reqs: dict[str, _Request] = {}
        self._matched: dict[str, tuple[int, int]] = {}
        self._to_load: list[str] = []  # requests whose load goes into the next metadata
        self._in_flight: dict[str, list[Entry]] = {}  # async loads: request -> pinned entries
        # GPU block -> hash of the block restored into it, to find the host copies of a
        # failed restore.
        self._restored: dict[int, bytes] = {}
        self.capture = CaptureSpace(capture_blocks(vllm_config) if with_act else 0)
        # Requests finished in the last two steps, with the step: vLLM fails a request whose
        # synchronous restore failed before it tells the connector which blocks failed, and
        # with async scheduling a step's outcome arrives after the next step is scheduled.
        self._finished: list[tuple[int, _Request]] = []
        self._steps = 0
        self._load_steps: list[int] = []  # steps that issued restores not yet known to have succeeded
        self.breaker = RestoreBreaker()
        self._reported_usage: StoreUsage | None = None  # the gauges last sent to /metrics
        if cfg.storage_dir:
            from vllm_partial_kv.storage_tier import SchedulerTier

            self.storage = SchedulerTier(vllm_config, cfg, with_act, cfg.cpu_bytes // (self.num_slots + act_slots))
        logger.info(
            "partial_kv: %d host block slots%s (cpu_bytes=%d in total over %d ranks, host layout %s), "
            "activations %s, ratio %s",
            self.num_slots, f" + {act_slots} activations-only" if act_slots else "",
            cfg.cpu_bytes, vllm_config.parallel_config.world_size, self.layout,
            f"kept (capture space: {self.capture.num_blocks} blocks)" if with_act else "not kept",
            "auto" if cfg.recompute_ratio is None else cfg.recompute_ratio,
        )

    # ========================================================================== scheduler half
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self.reqs.get(request.request_id)
        if (state is not None and state.load_failed) or not self.breaker.allows():
            return 0, False
        hashes = compat.request_block_hashes(request)
        first = num_computed_tokens // self.block_size
        # vLLM must compute at least one token itself.
        wanted = hashes[first : max(first, (request.num_tokens - 1) // self.block_size)]
        hits, forced = self._hits(wanted)
        stored: list[bool] = []
        if self.storage is not None and hits < len(wanted) and self.storage.is_filling(wanted[hits]):
            return None, False  # another request reads the next block from storage: ask again later
        if self.storage is not None and hits < len(wanted) and wanted[hits] not in self.index:
            stored, forced = self._storage_hits(wanted[hits:], hits, forced)
        if hits + len(stored) == 0:
            return 0, False
        self._forced_blocks += forced
        self._matched[request.request_id] = (first, hits, stored)
        return (hits + len(stored)) * self.block_size, self.cfg.async_load

    def may_load_async(self, request) -> bool:
        """vLLM >= 0.34 asks this as a request enters its waiting queue (so it must be cheap): a
        request whose restore may run asynchronously can then start it while the running batch is
        full. One index look-up, of its first block; older vLLMs never ask."""
        if not self.cfg.async_load or not self.breaker.allows():
            return False
        hashes = compat.request_block_hashes(request)
        return bool(hashes) and (hashes[0] in self.index or (self.storage is not None and hashes[0] in self.storage.index))

    def _hits(self, hashes: list[bytes]) -> tuple[int, int]:
        """Leading stored blocks a restore can serve, and how many of them it must recompute:
        activations-only blocks form a leading run (a restore recomputes [0, r) and streams the
        rest), within what this step's staging still holds."""
        capacity = self.cfg.max_recompute_tokens // self.block_size - self._forced_blocks
        n = forced = 0
        for h in hashes:
            entry = self.index.get(h)
            if entry is None or (self.storage is not None and self.storage.is_filling(h)):
                break
            if not entry.has_kv:
                if n > forced or forced >= capacity:
                    break
                forced += 1
            n += 1
        return n, forced

    def _storage_hits(self, hashes: list[bytes], n: int, forced: int) -> tuple[list[bool], int]:
        """The storage tier's leading blocks after `n` host hits (with activations, per block), by
        the host hits' rule for blocks that take activations-only slots, and as many as the host
        store has slots for that no load pins (the `n` host hits will be pinned too)."""
        capacity = self.cfg.max_recompute_tokens // self.block_size - self._forced_blocks
        usage = self.index.usage()
        room = usage.capacity - usage.pinned - n
        out = []
        for has_act in self.storage.lookup(hashes, self.index):
            if len(out) >= room:
                break
            if self.layout == "act" and has_act:
                if n > forced or forced >= capacity:
                    break
                forced += 1
            out.append(has_act)
            n += 1
        return out, forced

    def _allocate_fills(self, req_id: str, hashes: list[bytes], stored: list[bool]) -> tuple[list[Entry], list]:
        """Host slots for a restore's storage blocks, pinned and "filling" until the restore ends.
        A block without a slot (every slot pinned) gets slot -1: its read fails, it is recomputed."""
        from vllm_partial_kv.storage_tier import Fetch

        entries, fetches = [], []
        for h, has_act in zip(hashes, stored):
            slot = None if h in self.index else self.index.allocate(h, has_act)
            if slot is None:
                entries.append(Entry(-1, False, indexed=False))
                fetches.append(Fetch(h, -1, True, has_act))
                continue
            (entry,) = self.index.pin([h])
            entries.append(entry)
            fetches.append(Fetch(h, slot, entry.has_kv, has_act and self.with_act))
        self.storage.start_fill(req_id, fetches)
        return entries, fetches

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        state = self.reqs.setdefault(request.request_id, _Request(request))
        state.request = request
        state.replace_ids = True  # new or resumed after preemption: vLLM sends all its blocks
        matched = self._matched.pop(request.request_id, None)
        if num_external_tokens == 0 or matched is None:
            return
        first, n, stored = matched
        hashes = compat.request_block_hashes(request)
        entries = self.index.pin(hashes[first : first + n])
        if stored:
            filled, state.fetch = self._allocate_fills(
                request.request_id, hashes[first + n : first + n + len(stored)], stored
            )
            entries += filled
        state.pinned += entries
        state.load = (first, entries)
        self._to_load.append(request.request_id)
        if self.cfg.async_load:  # the request is not scheduled: its blocks come from here
            state.block_ids = list(blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output) -> PartialKVMetadata:
        meta = PartialKVMetadata()
        self._forced_blocks = 0  # the offers of this step's scheduling are in this metadata
        self._steps += 1
        self._finished = [(step, s) for step, s in self._finished if self._steps - step < 2]
        scheduled = []
        for req_id in scheduler_output.preempted_req_ids or ():
            if req_id in self.reqs:  # its blocks are freed: it starts them again when resumed
                self._give_back_capture(self.reqs[req_id])
                # Offered for storing again from block 0 (those still stored are only touched):
                # copies evicted while it waited are stored again once recomputed.
                self.reqs[req_id].stored_blocks = 0
        for req_id, new_ids, resumed in yield_req_data(scheduler_output):
            state = self.reqs.get(req_id)
            if state is None:
                continue
            if new_ids is not None:
                ids = list(new_ids[0])
                replace = resumed or state.replace_ids
                if replace:
                    self._give_back_capture(state)
                # A new or resumed request's whole block list: its leading local prefix-cache
                # hits are only read, so the fence skips them (a restore's blocks are fenced).
                hits = state.load[0] if state.load else state.request.num_computed_tokens // self.block_size
                meta.new_block_ids += ids[hits:] if replace else ids
                state.block_ids = ids if replace else state.block_ids + ids
                state.replace_ids = False
            scheduled.append((req_id, state))
        for req_id in self._to_load:
            state = self.reqs.get(req_id)
            if state is not None and state.load is not None:
                meta.loads.append(self._load_spec(req_id, state))
                if state.fetch:
                    meta.fetches[req_id], state.fetch = state.fetch, []
                    self.storage.fetching(req_id, meta.loads[-1].block_ids)
                if self.cfg.async_load:  # the restore writes them; vLLM the rest once scheduled
                    meta.new_block_ids += meta.loads[-1].block_ids
        self._to_load = []
        if meta.loads:
            self._load_steps.append(self._steps)
        # Every lend before any give-back: a capture block one request's store reads after
        # this forward must not be written by another request's blocks in the same forward.
        for req_id, state in scheduled:
            self._map_capture(req_id, state, scheduler_output, meta)
        fresh: list[Entry] = []  # this step's new entries: not evicted by its later blocks
        for req_id, state in scheduled:
            fresh += self._plan_stores(req_id, state, scheduler_output, meta)
            self._give_back_capture(state, below=state.stored_blocks)
        self.index.unpin(fresh)
        loading = {spec.req_id for spec in meta.loads}
        meta.busy = any(r not in loading for r in scheduler_output.num_scheduled_tokens)
        meta.forward_tokens = scheduler_output.total_num_scheduled_tokens
        # Synchronous loads are issued before this step's stores: their slots may be reused
        # now. Asynchronous ones stay pinned until the worker reports them finished.
        for req_id, state in self.reqs.items():
            if state.pinned:
                if req_id in loading and self.cfg.async_load:
                    self._in_flight[req_id] = state.pinned
                else:
                    self.index.unpin(state.pinned)
                state.pinned = []
        return meta

    def _load_spec(self, req_id: str, state: _Request) -> LoadSpec:
        first, entries = state.load
        state.load = None
        hashes = compat.request_block_hashes(state.request)[first : first + len(entries)]
        block_ids = state.block_ids[first : first + len(entries)]
        self._restored.update(zip(block_ids, hashes))
        return LoadSpec(
            slots=[entry.slot for entry in entries],
            block_ids=block_ids,
            first_position=first * self.block_size,
            recompute_blocks=_leading_with_act(entries),
            req_id=req_id,
            must_recompute=_leading_with_act(entries, without_kv=True),
            fmt=self.index.fmt,  # every entry's: a hit is only a block stored in the index's format
        )

    def update_connector_output(self, connector_output) -> None:
        """Asynchronous loads the worker finished may be evicted again. After a failed restore,
        vLLM recomputes the blocks; the entries are dropped so that it does not ask for them
        again (an asynchronous retry would hit them, and fail, forever), and so are the blocks
        the request stored after them: a synchronous restore's step computed those from the
        unrestored K/V. They are stored again once vLLM has recomputed them, but that request
        never looks up the host store again (as vLLM 0.34's offloading), and steps of failed
        restores in a row open the breaker (block files that could not be read do not: they are
        misses of the storage tier, not restore failures)."""
        unreadable = self.storage is not None and self.storage.only_fetched(connector_output.invalid_block_ids)
        for req_id in connector_output.finished_recving or ():
            self.index.unpin(self._in_flight.pop(req_id, []))
            if self.storage is not None:
                self.index.discard(self.storage.end_fill(req_id))
        invalid = connector_output.invalid_block_ids
        restored = {b: self._restored.pop(b) for b in invalid or () if b in self._restored}
        if not restored:
            if any(self._steps - step >= 2 for step in self._load_steps):
                self.breaker.succeeded()
                self._load_steps = [step for step in self._load_steps if self._steps - step < 2]
            return
        if not unreadable:
            self.breaker.failed()
            self._load_steps = []
        failed = list(restored.values())
        # Requests vLLM already finished (policy "fail") stored blocks after the failed ones too.
        for state in [*self.reqs.values(), *(s for _, s in self._finished)]:
            hashes = compat.request_block_hashes(state.request)
            # The block a failed restore wrote, with this request's content (a preempted
            # request's stale block ids may name a block since restored for another one).
            first = next(
                (i for i, (b, h) in enumerate(zip(state.block_ids, hashes)) if restored.get(b) == h), None
            )
            if first is None:
                continue
            state.load_failed = True  # as vLLM's own offloading: a faulting load is not retried
            if first < state.stored_blocks:
                failed += hashes[first : state.stored_blocks]
                state.stored_blocks = first
        if self.storage is not None:  # a file that could not be read is not offered again
            self.storage.index.discard(restored.values())
        dropped = self.index.discard(failed)
        logger.warning("partial_kv: dropped %d host blocks of failed restores", dropped)

    def _map_capture(self, req_id: str, state: _Request, scheduler_output, meta) -> None:
        """Lends capture blocks to the request's blocks that start filling in this step (a block
        started without one keeps none: its earlier rows are lost), and tells the worker where
        the rows of every block this step writes go."""
        if not self.with_act:
            return
        start = state.request.num_computed_tokens
        end = start + scheduler_output.num_scheduled_tokens.get(req_id, 0)
        storable = len(state.block_ids)
        if self.cfg.offload_prompt_only:
            storable = min(storable, state.request.num_prompt_tokens // self.block_size)
        for i in range(start // self.block_size, min(-(-end // self.block_size), len(state.block_ids))):
            fresh = i * self.block_size >= start and i not in state.capture
            if fresh and state.stored_blocks <= i < storable:
                block = self.capture.lend()
                if block is not None:
                    state.capture[i] = block
            meta.capture_block_ids.append(state.block_ids[i])
            meta.capture_blocks.append(state.capture.get(i, -1))

    def _give_back_capture(self, state: _Request, below: int | None = None) -> None:
        """Capture blocks of blocks whose store is issued (index < `below`), or all of them."""
        done = [i for i in state.capture if below is None or i < below]
        self.capture.give_back(state.capture.pop(i) for i in done)

    def _plan_stores(self, req_id: str, state: _Request, scheduler_output, meta) -> list[Entry]:
        """Allocates host slots for the request's newly full blocks; returns their entries,
        pinned, so that later blocks of the same step do not evict them (two copies into one
        slot in one batch would race on the GPU)."""
        req = state.request
        done = req.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(req_id, 0)
        if self.cfg.offload_prompt_only:
            done = min(done, req.num_prompt_tokens)
        hashes = compat.request_block_hashes(req)
        full = min(done // self.block_size, len(hashes), len(state.block_ids))
        fresh: list[Entry] = []
        for i in range(state.stored_blocks, full):
            if hashes[i] in self.index:
                self.index.touch(hashes[i])
                continue
            captured = state.capture.get(i, -1)  # its rows are the block's own inputs
            slot = self.index.allocate(hashes[i], captured >= 0)
            if slot is None:  # every slot pinned (loads in flight, this step's stores)
                full = i  # not an error: stored in a later step if a slot frees up
                break
            fresh += self.index.pin([hashes[i]])
            meta.store_block_ids.append(state.block_ids[i])
            meta.store_slots.append(slot)
            meta.store_capture.append(captured)
            meta.store_kv.append(self.index.get(hashes[i]).has_kv)
            if self.storage is not None:
                meta.store_hashes.append(self.storage.write_through(hashes[i], captured >= 0))
        state.stored_blocks = max(state.stored_blocks, full)
        return fresh

    def request_finished(self, request, block_ids=None) -> tuple[bool, dict | None]:
        # An aborted request's load in flight keeps its pins until the worker reports it done
        # (vLLM keeps its blocks until then too).
        state = self.reqs.pop(request.request_id, None)
        if state is not None:
            self._give_back_capture(state)
            self.index.unpin(state.pinned)
            state.pinned = []
            self._finished.append((self._steps, state))
        self._matched.pop(request.request_id, None)
        return False, None

    def reset_cache(self) -> bool:
        logger.info("partial_kv: host store reset, %d blocks dropped", self.index.clear())
        if self.storage is not None:  # the weights may have changed: files written now would lie
            self.storage.close()
            self.storage = None
            logger.warning("partial_kv: the storage tier is off after a cache reset (restart to use it again)")
        for state in self.reqs.values():  # running requests store their blocks again, from block 0
            state.stored_blocks = 0
        return True

    def store_gauges(self) -> PartialKVStats | None:
        """The host store's gauges, when they changed: vLLM asks the scheduler half after every
        step and adds its stats to the worker's."""
        usage = self.index.usage()
        stats = None
        if usage != self._reported_usage:
            self._reported_usage = usage
            stats = PartialKVStats.of_store(usage)
        if self.storage is not None:
            stats = self.storage.add_stats(stats)
        return stats


def _leading_with_act(entries: list[Entry], without_kv: bool = False) -> int:
    """Leading entries with activations (that can be recomputed), or without K/V (that must be)."""
    n = 0
    for entry in entries:
        if not entry.has_activations or (without_kv and entry.has_kv):
            break
        n += 1
    return n
