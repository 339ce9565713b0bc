"""`PartialRecomputeConnector`: vLLM's V1 KV-connector API, thin halves over store/restore/planner.

Scheduler half: finds offloaded prefixes by vLLM's block hashes, pins them until they are
loaded, and allocates host slots for blocks that fill up (prompt and, by default, decode).
Worker half: copies finished blocks (K/V and captured activations) to the host after each
forward, and restores hit blocks, recomputing the leading ones from activations with the split
the planner picks for the whole batch. By default loads are asynchronous, like vLLM's own
offloading: the request waits (WAITING_FOR_REMOTE_KVS) while other requests' steps run, until
`get_finished` reports its restore done. With `async_load: false` the restore runs inside the
step that needs it and the forward waits for each layer (`wait_for_layer_load`). Blocks vLLM
reallocates wait for stores still reading them (`handle_preemptions`). A restore that fails is
reported to vLLM as a KV load error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data

from vllm_partial_kv import capture, compat, planner
from vllm_partial_kv.capture_space import CaptureSpace
from vllm_partial_kv.deployment import (
    activations_wanted, capture_blocks, extra_config, model_shape, planning_shape, staging_bytes,
)
from vllm_partial_kv.config import ConfigError, PartialKVConfig, parse_config
from vllm_partial_kv.faults import RestoreFaults
from vllm_partial_kv.metrics import PartialKVStats
from vllm_partial_kv.ranks import TensorParallelRanks, from_first_rank
from vllm_partial_kv.restore import LoadSpec, RestoreRuntime, Wait
from vllm_partial_kv.store import (
    BlockIndex, Entry, HostPool, StoreUsage, ensure_room, slots_for_layout,
)

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


# ------------------------------------------------------------------------------ host store size
def _layout(cfg: PartialKVConfig, with_act: bool) -> str:
    """The host layout served: without activations every layout is "kv"."""
    return cfg.host_layout if with_act else "kv"


def _num_slots(vllm_config, kv_cache_config, cfg: PartialKVConfig, with_act: bool) -> tuple[int, int]:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError("PartialRecomputeConnector supports one KV cache group (full attention)")
    spec = groups[0].kv_cache_spec
    n_layers = len(groups[0].layer_names)
    shape = model_shape(vllm_config, spec.block_size)
    act_block = spec.block_size * shape.act_bytes_per_token * n_layers
    return slots_for_layout(
        cfg.cpu_bytes, over_ranks(vllm_config, spec.page_size_bytes * n_layers, n_layers),
        over_ranks(vllm_config, act_block, n_layers), _layout(cfg, with_act),
    )


def over_ranks(vllm_config, block_bytes: int, num_layers: int) -> int:
    """A block's bytes over all ranks, from one rank's `block_bytes` for its `num_layers` layers:
    `cpu_bytes` is the total across ranks, as vLLM's `--kv-offloading-size` is.

    Every rank keeps every slot, for its own heads (tensor parallel) and its own layers (pipeline
    stage). Counting all layers rather than this stage's keeps the scheduler (which sees stage 0's
    layers) and every worker on one slot count, even when the stages hold different numbers of
    layers."""
    total_layers = vllm_config.model_config.get_total_num_hidden_layers()
    tp = vllm_config.parallel_config.tensor_parallel_size
    return tp * total_layers * block_bytes // num_layers


# ------------------------------------------------------------------------------ metadata
@dataclass
class PartialKVMetadata(compat.KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    busy: bool = False  # the step also computes for requests that are not restoring
    forward_tokens: int = 0  # tokens the step's forward computes (all requests)
    store_block_ids: list[int] = field(default_factory=list)
    store_slots: list[int] = field(default_factory=list)
    store_capture: list[int] = field(default_factory=list)  # per stored block: its capture block, -1: none
    store_kv: list[bool] = field(default_factory=list)  # per stored block: copy its K/V (not: layout "act")
    # Every block the forward writes this step, and the capture block its rows go to (-1: none).
    capture_block_ids: list[int] = field(default_factory=list)
    capture_blocks: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)  # allocated this step: about to be written


@dataclass
class _Request:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    stored_blocks: int = 0  # leading blocks already stored or known to be in the store
    load: tuple[int, list[Entry]] | None = None  # (first block, its host entries) to restore
    pinned: list[Entry] = field(default_factory=list)
    replace_ids: bool = True  # next block ids from the scheduler are the whole list
    capture: dict[int, int] = field(default_factory=dict)  # block index -> lent capture block


class PartialRecomputeConnector(compat.KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None, **kwargs) -> None:
        super().__init__(vllm_config, role, kv_cache_config, **kwargs)
        self.cfg = parse_config(extra_config(vllm_config))
        self.with_act = activations_wanted(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        if self.with_act and self.cfg.max_recompute_tokens < self.block_size:
            raise ConfigError(
                f"max_recompute_tokens={self.cfg.max_recompute_tokens} is less than one block "
                f"({self.block_size} tokens): nothing could be recomputed; raise it or set recompute_ratio 0"
            )
        self.is_scheduler = role == compat.KVConnectorRole.SCHEDULER
        self.runtime: RestoreRuntime | None = None  # worker half, once KV caches exist
        if self.is_scheduler:
            self.layout = _layout(self.cfg, self.with_act)
            self.num_slots, act_slots = _num_slots(vllm_config, kv_cache_config, self.cfg, self.with_act)
            self.index = BlockIndex(self.num_slots, act_slots)
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
            self.capture = CaptureSpace(capture_blocks(vllm_config) if self.with_act else 0)
            # Requests finished in the last two steps, with the step: vLLM fails a request whose
            # synchronous restore failed before it tells the connector which blocks failed, and
            # with async scheduling a step's outcome arrives after the next step is scheduled.
            self._finished: list[tuple[int, _Request]] = []
            self._steps = 0
            self._reported_usage: StoreUsage | None = None  # the gauges last sent to /metrics
            logger.info(
                "partial_kv: %d host block slots%s (cpu_bytes=%d in total over %d ranks, host layout %s), "
                "activations %s, ratio %s",
                self.num_slots, f" + {act_slots} activations-only" if act_slots else "",
                self.cfg.cpu_bytes, vllm_config.parallel_config.world_size, self.layout,
                f"kept (capture space: {self.capture.num_blocks} blocks)" if self.with_act else "not kept",
                "auto" if self.cfg.recompute_ratio is None else self.cfg.recompute_ratio,
            )
        else:
            self.profiles: dict[bool, planner.Profile] = {}  # keyed by "GPU busy with decodes"
            self._profiled_kernel = self.cfg.kernel  # the backend the profiles were measured for
            self._failed_blocks: set[int] = set()  # restores that failed, for vLLM to recover
            self._faults = RestoreFaults.from_env()  # the documented test hook (faults.py)
            self._loading: dict[str, torch.cuda.Event | None] = {}  # async: request -> restore done
            self._ranks: TensorParallelRanks | None = None  # with activation shards, once caches exist
            self._stats = PartialKVStats()
            self.totals = PartialKVStats()  # since start-up, for logs and tests

    # ========================================================================== scheduler half
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        hashes = compat.request_block_hashes(request)
        first = num_computed_tokens // self.block_size
        # vLLM must compute at least one token itself.
        hits, forced = self._hits(hashes[first : max(first, (request.num_tokens - 1) // self.block_size)])
        if hits == 0:
            return 0, False
        self._forced_blocks += forced
        self._matched[request.request_id] = (first, hits)
        return hits * self.block_size, self.cfg.async_load

    def _hits(self, hashes: list[bytes]) -> tuple[int, int]:
        """Leading stored blocks a restore can serve, and how many of them it must recompute:
        activations-only blocks form a leading run (a restore recomputes [0, r) and streams the
        rest), within what this step's staging still holds."""
        capacity = self.cfg.max_recompute_tokens // self.block_size - self._forced_blocks
        n = forced = 0
        for h in hashes:
            entry = self.index.get(h)
            if entry is None:
                break
            if not entry.has_kv:
                if n > forced or forced >= capacity:
                    break
                forced += 1
            n += 1
        return n, forced

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        state = self.reqs.setdefault(request.request_id, _Request(request))
        state.request = request
        state.replace_ids = True  # new or resumed after preemption: vLLM sends all its blocks
        matched = self._matched.pop(request.request_id, None)
        if num_external_tokens == 0 or matched is None:
            return
        first, n = matched
        entries = self.index.pin(compat.request_block_hashes(request)[first : first + n])
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
                if self.cfg.async_load:  # the restore writes them; vLLM the rest once scheduled
                    meta.new_block_ids += meta.loads[-1].block_ids
        self._to_load = []
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
        )

    def update_connector_output(self, connector_output) -> None:
        """Asynchronous loads the worker finished may be evicted again. After a failed restore,
        vLLM recomputes the blocks; the entries are dropped so that it does not ask for them
        again (an asynchronous retry would hit them, and fail, forever), and so are the blocks
        the request stored after them: a synchronous restore's step computed those from the
        unrestored K/V. They are stored again once vLLM has recomputed them."""
        for req_id in connector_output.finished_recving or ():
            self.index.unpin(self._in_flight.pop(req_id, []))
        invalid = connector_output.invalid_block_ids
        if not invalid:
            return
        restored = {b: self._restored.pop(b) for b in invalid if b in self._restored}
        failed = list(restored.values())
        # Requests vLLM already finished (policy "fail") stored blocks after the failed ones too.
        for state in [*self.reqs.values(), *(s for _, s in self._finished)]:
            hashes = compat.request_block_hashes(state.request)
            # The block a failed restore wrote, with this request's content (a preempted
            # request's stale block ids may name a block since restored for another one).
            first = next(
                (i for i, (b, h) in enumerate(zip(state.block_ids, hashes)) if restored.get(b) == h), None
            )
            if first is not None and first < state.stored_blocks:
                failed += hashes[first : state.stored_blocks]
                state.stored_blocks = first
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
        return True

    # ============================================================================= worker half
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        vllm_config = self._vllm_config
        num_blocks = compat.num_blocks_of(next(iter(kv_caches.values())))
        layers = capture.layers() if self.with_act else {}
        if self.with_act and set(layers) != set(kv_caches):
            raise RuntimeError(
                "partial_kv: activation capture hooks were not installed for every attention "
                "layer (is the vllm_partial_kv plugin loaded?)"
            )
        device = next(iter(kv_caches.values())).device
        dtype = vllm_config.model_config.dtype
        views = {n: compat.block_views(t, num_blocks) for n, t in kv_caches.items()}
        self.shape = model_shape(vllm_config)
        self.plan_shape = planning_shape(vllm_config)
        # Activation shards: this rank keeps its 1/TP of each row's columns, and restores join them.
        if self.with_act and self.shape.act_shards > 1:
            self._ranks = TensorParallelRanks()
        width = self.shape.hidden_size // self.shape.act_shards
        kv_bytes = sum(v[0].numel() * v.element_size() for vs in views.values() for v in vs)
        act_bytes = self.block_size * self.shape.act_bytes_per_token * len(views)
        # The scheduler's formula, from the real tensors: both halves must agree on the slots.
        layout = _layout(self.cfg, self.with_act)
        num_slots, act_slots = slots_for_layout(
            self.cfg.cpu_bytes, over_ranks(vllm_config, kv_bytes, len(views)),
            over_ranks(vllm_config, act_bytes, len(views)), layout,
        )
        rows = capture_blocks(vllm_config) * self.block_size + 1  # + the spare row
        on_device = self.with_act * (  # capture space, its map, staging
            rows * len(views) * self.shape.act_bytes_per_token + 4 * num_blocks
            + staging_bytes(self.shape, self.cfg)
        )
        host = device if device.type == "cpu" else torch.device("cpu")
        needs = {device: on_device}
        needs[host] = needs.get(host, 0) + num_slots * kv_bytes + act_bytes * (
            act_slots if layout == "act" else num_slots * (layout == "kv+act")
        )
        ensure_room(needs)
        act_buffers, capture_map = {}, None
        if self.with_act:
            act_buffers = {n: torch.zeros(rows, width, dtype=dtype, device=device) for n in kv_caches}
            capture_map = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
            if self._ranks is not None:
                self._ranks.reserve(self.cfg.max_recompute_tokens, width, dtype, device)
            # The ranks' shards, in rank order, make a row (the order the join puts them in).
            first = self._ranks.rank * width if self._ranks is not None else 0
            capture.bind_buffers(act_buffers, capture_map, self.block_size, first)
        act_shape = (self.block_size, width) if self.with_act else None
        pool = HostPool(num_slots, views, act_shape, dtype, pin=device.type == "cuda",
                        act_slots=act_slots if layout == "act" else None)
        self.runtime = RestoreRuntime(
            kv_caches, num_blocks, self.block_size, pool, act_buffers, layers,
            self.cfg.max_recompute_tokens, self.cfg.kernel, capture_map,
            gather=self._ranks.gather if self._ranks else None,
        )
        self.runtime.tune_recompute()  # before the profiles: it may fall back to the torch path
        if self.with_act:
            logger.info(
                "partial_kv: capture space of %d tokens and restore staging: %.1f MiB on %s beside "
                "a KV cache of %.2f GiB", rows - 1, self.runtime.extra_device_bytes / 2**20, device,
                kv_bytes * num_blocks / 2**30,
            )
        if self.with_act and self.cfg.recompute_ratio is None:
            self.profiles = self._load_profiles()

    def _load_profiles(self) -> dict[bool, planner.Profile]:
        """Idle and busy profiles of the runtime's recompute backend, at start-up: a restore that
        shares the GPU with other requests' forward recomputes slower, so it should recompute less.
        With activation shards, the all-gather that joins them is measured on the real group. Every
        rank then plans from rank 0's profiles, so that all pick the same split."""
        from vllm_partial_kv import profiler
        from vllm_partial_kv.kernels import recompute_kv

        kernel = self._profiled_kernel = self.runtime.kernel
        dtype, device = self._vllm_config.model_config.dtype, self.runtime.device

        def fn(*args, **kwargs):
            return recompute_kv(*args, backend=kernel, tune=True, **kwargs)

        profiles = {
            busy: profiler.load_or_measure(
                self.shape, device=device, recompute_fn=fn, dtype=dtype,
                cache_dir=self.cfg.profile_cache_dir, with_load=busy, kernel=kernel,
            )
            for busy in (False, True)
        }
        if self._ranks is not None:
            bw, latency = profiler.measure_gather(
                self.shape, self._ranks.gather, device=device, dtype=dtype,
                max_tokens=self.runtime.max_recompute_tokens,
            )
            logger.info("partial_kv: joining activation shards over %d ranks: %.2f GB/s, %.0f us per call",
                        self._ranks.size, bw / 1e9, latency * 1e6)
            profiles = {k: replace(p, gather_bytes_per_s=bw, gather_latency_s=latency) for k, p in profiles.items()}
        return from_first_rank(profiles)

    def handle_preemptions(self, kv_connector_metadata) -> None:
        """vLLM calls this every step before it writes anything into the KV cache: blocks it
        just allocated may have been freed while a store was still reading them, and the
        capture op must know this step's capture blocks (before the forward, not in
        `start_load_kv`, which vLLM 0.32 may call after launching it)."""
        meta = kv_connector_metadata
        if self.runtime is not None and isinstance(meta, PartialKVMetadata):
            self.runtime.fence_blocks(meta.new_block_ids)
            self.runtime.set_capture_map(meta.capture_block_ids, meta.capture_blocks)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PartialKVMetadata) or not meta.loads or self.runtime is None:
            return
        wait: Wait = "none"
        if not self.cfg.async_load:
            wait = "layers" if compat.calls_layer_waits(forward_context) else "whole"
        failure: Exception | None = None
        try:
            self._faults.check()
        except Exception as e:
            failure = e
        kernel_profiled = self.runtime.kernel == self._profiled_kernel
        if self._ranks is not None:
            # The restore's all-gathers need every rank: all go ahead, with one split, or none.
            go, kernel_profiled = self._ranks.agree(failure is None, kernel_profiled)
            if failure is None and not go:
                failure = RuntimeError("another tensor-parallel rank cannot restore this step")
        done = None
        if failure is None:
            try:
                self._choose_split(meta, wait, kernel_profiled)
                done = self.runtime.load(meta.loads, wait)
            except Exception as e:
                failure = e
            if self._ranks is not None:
                # A rank whose restore failed midway still joined every all-gather (restore.py);
                # now every rank learns of it, and none keeps K/V another did not restore.
                (all_ok,) = self._ranks.agree(failure is None)
                if failure is None and not all_ok:
                    self.runtime.drain()
                    failure = RuntimeError("another tensor-parallel rank's restore of this step failed")
        if failure is not None:
            # A restore that fails must cost its requests, not the engine: vLLM recomputes the
            # blocks or fails the requests (kv_load_failure_policy "recompute" or "fail").
            blocks = {b for spec in meta.loads for b in spec.block_ids}
            logger.error(
                "partial_kv: restore of %d blocks for %d requests failed; reported to vLLM as "
                "load errors", len(blocks), len(meta.loads), exc_info=failure,
            )
            self._failed_blocks |= blocks
            self.runtime.stats.failed_restores += 1
            done = None  # reported finished at once, with its blocks as load errors
        if self.cfg.async_load:
            self._loading.update(dict.fromkeys((spec.req_id for spec in meta.loads), done))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Asynchronous loads whose restore has completed on the device."""
        done = {r for r, event in self._loading.items() if event is None or event.query()}
        for req_id in done:
            del self._loading[req_id]
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def _choose_split(self, meta: PartialKVMetadata, wait: Wait, kernel_profiled: bool) -> None:
        """Per batch: how many leading blocks of each restore to recompute from activations.
        An asynchronous restore shares the GPU with other requests' steps (busy profile); one
        waited for per layer shares it with this step's own forward, which the planner models."""
        loads = meta.loads
        requests = [planner.RestoreRequest(len(s.block_ids), s.recompute_blocks) for s in loads]
        if self.cfg.recompute_ratio is None and self.profiles and not kernel_profiled:
            # The kernel failed while serving (it passed start-up tuning). Profiling the torch
            # path now would stall this restore and every request behind it; streaming only is
            # never slower than plain offload.
            logger.warning(
                "partial_kv: recompute now runs on the unprofiled %s path; restores stream all "
                "blocks from now on (restart to profile it)", self.runtime.kernel,
            )
            self.cfg = replace(self.cfg, recompute_ratio=0.0)
        if not self.with_act:
            split = [0] * len(loads)
        else:
            profile = self.profiles.get(meta.busy and wait == "none")
            forward_s = 0.0
            if wait == "layers" and profile is not None:
                forward_s = planner.forward_seconds(self.plan_shape, profile, meta.forward_tokens)
            split = planner.plan_split(
                self.plan_shape, profile, requests, ratio=self.cfg.recompute_ratio,
                max_recompute_tokens=self.runtime.max_recompute_tokens, forward_s=forward_s,
            )
        for spec, r in zip(loads, split):  # activations-only blocks have nothing to stream
            spec.recompute_blocks = max(r, spec.must_recompute)
        logger.debug("partial_kv: restoring %s blocks, recomputing %s", [len(s.block_ids) for s in loads], split)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.runtime is not None:
            self.runtime.wait_layer(layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return  # blocks are stored whole after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        if self.runtime is None:
            return
        self.runtime.finish_step()
        meta = self._get_connector_metadata()
        if not isinstance(meta, PartialKVMetadata):
            return
        self.runtime.store(meta.store_block_ids, meta.store_slots, meta.store_capture, meta.store_kv)

    def get_kv_connector_stats(self):
        if self.is_scheduler:
            return self._store_gauges()
        if self.runtime is None:
            return None
        step = self.runtime.take_stats()
        self._stats.add(step, self.block_size)
        self.totals.add(step, self.block_size)
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, PartialKVStats()
        return out

    def _store_gauges(self) -> PartialKVStats | None:
        """The host store's gauges, when they changed: vLLM asks the scheduler half after every
        step and adds its stats to the worker's."""
        usage = self.index.usage()
        if usage == self._reported_usage:
            return None
        self._reported_usage = usage
        return PartialKVStats.of_store(usage)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return PartialKVStats(data=data) if data is not None else PartialKVStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm_partial_kv.metrics import PartialKVPromMetrics

        return PartialKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _leading_with_act(entries: list[Entry], without_kv: bool = False) -> int:
    """Leading entries with activations (that can be recomputed), or without K/V (that must be)."""
    n = 0
    for entry in entries:
        if not entry.has_activations or (without_kv and entry.has_kv):
            break
        n += 1
    return n
