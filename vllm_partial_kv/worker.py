"""The connector's worker half: stores finished blocks to the host, restores hit blocks.

After each forward it copies finished blocks (K/V and captured activations) to the host; it
restores hit blocks, recomputing the leading ones from activations with the split the planner
picks for the whole batch. By default loads are asynchronous, like vLLM's own offloading: the
request waits (WAITING_FOR_REMOTE_KVS) while other requests' steps run, until `get_finished`
reports its restore done. With `async_load: false` the restore runs inside the step that needs
it and the forward waits for each layer (`wait_for_layer_load`). Blocks vLLM reallocates wait
for stores still reading them (`handle_preemptions`). A restore that fails is reported to vLLM as
a KV load error.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from vllm_partial_kv import capture, compat, device_buffers, planner
from vllm_partial_kv.config import PartialKVConfig
from vllm_partial_kv.deployment import (
    fp8_late_device_bytes, late_device_bytes, model_shape, over_ranks, planning_shape, served_layout,
)
from vllm_partial_kv.faults import RestoreFaults
from vllm_partial_kv.kernels.quant import describe_path
from vllm_partial_kv.metadata import PartialKVMetadata
from vllm_partial_kv.metrics import PartialKVStats
from vllm_partial_kv.ranks import TensorParallelRanks, from_first_rank
from vllm_partial_kv.restore import RestoreRuntime, Wait
from vllm_partial_kv.store import HostPool, ensure_room, slots_for_layout
from vllm_partial_kv.store_format import act_dtype, kv_slot_views, slot_bytes

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


class PartialKVWorker:
    def __init__(self, vllm_config, cfg: PartialKVConfig, with_act: bool) -> None:
        self._vllm_config = vllm_config
        self.cfg = cfg
        self.with_act = with_act
        self.block_size = vllm_config.cache_config.block_size
        self.runtime: RestoreRuntime | None = None  # once KV caches exist
        self.profiles: dict[bool, planner.Profile] = {}  # keyed by "GPU busy with decodes"
        self._profiled_kernel = cfg.kernel  # the backend the profiles were measured for
        self._failed_blocks: set[int] = set()  # restores that failed, for vLLM to recover
        self._faults = RestoreFaults.from_env()  # the documented test hook (faults.py)
        self._loading: dict[str, torch.cuda.Event | None] = {}  # async: request -> restore done
        self._ranks: TensorParallelRanks | None = None  # with activation shards, once caches exist
        self.recomputes = with_act  # False where capture hooked nothing (set with the KV caches)
        self._stats = PartialKVStats()
        self.totals = PartialKVStats()  # since start-up, for logs and tests
        self.storage = None  # the storage tier's files (storage_tier.py), with storage_dir
        self._link: tuple[float, float] | None = None  # its read rate, for the split of its restores

    # ============================================================================= worker half
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Takes over the device buffers made at model load (`device_buffers`: the capture op has
        written into them since, in every warm-up step and recorded graph) and allocates the host
        store. vLLM may call this only after compiling, warming up and recording CUDA graphs
        (0.34's extensible KV cache), with the KV cache already sized: what is still allocated on
        the device now is checked against what is left."""
        vllm_config = self._vllm_config
        num_blocks = compat.num_blocks_of(next(iter(kv_caches.values())))
        layers = capture.layers() if self.with_act else {}
        # The structural match refused the model (capture.install warned, nothing was hooked or
        # made at model load): the scheduler still plans with activations, so the host layout and
        # slots stay its own, with activation slots that are never read; this worker never recomputes.
        self.recomputes = self.with_act and (bool(layers) or capture.why_not_installed() is None)
        buffers = device_buffers.current() if self.with_act else None
        if self.with_act and not self.recomputes:
            buffers = device_buffers.allocate(vllm_config, list(kv_caches), next(iter(kv_caches.values())).device)
        made = set(buffers.capture) if buffers is not None else set()
        if self.recomputes and not set(layers) == made == set(kv_caches):
            raise RuntimeError(
                "partial_kv: activation capture hooks and buffers were not set up at model load for "
                "every attention layer (is the vllm_partial_kv plugin loaded?)"
            )
        if buffers is not None:
            buffers.check_fits(num_blocks, self.block_size)
        device = next(iter(kv_caches.values())).device
        dtype = vllm_config.model_config.dtype
        views = {n: compat.block_views(t, num_blocks) for n, t in kv_caches.items()}
        self.shape = model_shape(vllm_config)
        self.plan_shape = planning_shape(vllm_config)
        # Activation shards: this rank keeps its 1/TP of each row's columns, and restores join them.
        self._ranks = buffers.ranks if buffers is not None else None
        width = self.shape.hidden_size // self.shape.act_shards
        kv_dtype = next(iter(kv_caches.values())).dtype  # uint8 for fp8 caches: one byte either way
        fmt = self.cfg.host_format
        slot_views = kv_slot_views(fmt, views, kv_dtype, (self.block_size, self.shape.num_kv_heads,
                                                            self.shape.head_size))
        kv_bytes = sum(slot_bytes(vs) for vs in slot_views.values())
        act_bytes = self.block_size * self.shape.act_bytes_per_token * len(views)
        # The scheduler's formula, from the real tensors: both halves must agree on the slots.
        layout = served_layout(self.cfg, self.with_act)
        num_slots, act_slots = slots_for_layout(
            self.cfg.cpu_bytes, over_ranks(vllm_config, kv_bytes, len(views)),
            over_ranks(vllm_config, act_bytes, len(views)), layout,
        )
        profiling = self.recomputes and self.cfg.recompute_ratio is None
        host = device if device.type == "cpu" else torch.device("cpu")
        needs = {device: self.with_act * late_device_bytes(self.shape, self.cfg, profiling)
                 + fp8_late_device_bytes(self.shape, self.with_act)}
        needs[host] = needs.get(host, 0) + num_slots * kv_bytes + act_bytes * (
            act_slots if layout == "act" else num_slots * (layout == "kv+act")
        )
        ensure_room(needs)
        act_shape = (self.block_size, width) if self.with_act else None
        pool = HostPool(num_slots, slot_views, act_shape, act_dtype(fmt, dtype), pin=device.type == "cuda",
                        act_slots=act_slots if layout == "act" else None, fmt=fmt)
        if fmt == "fp8":
            logger.info("partial_kv: fp8 host store: %s; quantized with %s",
                        "K/V as the fp8 cache holds them" if kv_dtype.itemsize == 1 else "K/V per token and head",
                        describe_path(device))
        self.runtime = RestoreRuntime(
            kv_caches, num_blocks, self.block_size, pool, buffers.capture if buffers else {}, layers,
            self.cfg.max_recompute_tokens, self.cfg.kernel, buffers.block_map if buffers else None,
            gather=self._ranks.gather if self._ranks else None,
            staging=(buffers.staging, buffers.slots, buffers.positions) if buffers else None,
            staging_scale=buffers.staging_scale if buffers else None,
        )
        self.runtime.tune_recompute()  # before the profiles: it may fall back to the torch path
        if self.with_act:
            logger.info(
                "partial_kv: capture space of %d tokens and restore staging: %.1f MiB on %s (made at "
                "model load) beside a KV cache of %.2f GiB", buffers.capture[next(iter(made))].shape[0] - 1,
                buffers.nbytes / 2**20, device, sum(t.numel() * t.element_size() for t in kv_caches.values()) / 2**30,
            )
        if profiling:
            self.profiles = self._load_profiles()
        if self.cfg.storage_dir:
            from vllm_partial_kv.storage_tier import WorkerTier

            self.storage = WorkerTier(vllm_config, self.cfg, self.with_act, pool)
            if self.profiles:
                self._link = self.storage.link(self.cfg)

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

    def start_load_kv(self, meta, forward_context) -> None:
        if not isinstance(meta, PartialKVMetadata) or not meta.loads or self.runtime is None:
            return
        if not self.recomputes:
            meta = self._refuse_activations_only(meta)
        if self.storage is not None and meta.fetches:  # restored once their files are read
            fetching = [s for s in meta.loads if s.req_id in meta.fetches]
            # The split first, for the storage link: it decides which section of each file to read.
            try:
                self._choose_split(PartialKVMetadata(loads=fetching, busy=True), "none",
                                   self.runtime.kernel == self._profiled_kernel, self._link)
            except Exception:  # never the engine's end: stream what can be streamed
                logger.exception("partial_kv: planning a restore from the storage tier failed; streaming it")
                for spec in fetching:
                    spec.recompute_blocks = spec.must_recompute
            for spec in fetching:
                self.storage.fetch(spec, meta.fetches[spec.req_id])
            meta = replace(meta, loads=[s for s in meta.loads if s.req_id not in meta.fetches])
        if not meta.loads:
            return
        wait: Wait = "none"
        if not self.cfg.async_load:
            wait = "layers" if compat.calls_layer_waits(forward_context) else "whole"
        self._issue(meta, wait)

    def _issue(self, meta: PartialKVMetadata, wait: Wait, planned: bool = False) -> None:
        """Issue a step's restores (`planned`: their split is chosen, as their storage reads were)."""
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
                if not planned:
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

    def _refuse_activations_only(self, meta: PartialKVMetadata) -> PartialKVMetadata:
        """Without capture, restores whose leading blocks are kept without K/V (host layout "act")
        cannot be served here: reported as load errors at once, so that vLLM computes them."""
        refused = [spec for spec in meta.loads if spec.must_recompute]
        if not refused:
            return meta
        self._failed_blocks |= {b for spec in refused for b in spec.block_ids}
        self.runtime.stats.failed_restores += len(refused)
        if self.cfg.async_load:
            self._loading.update(dict.fromkeys((spec.req_id for spec in refused), None))
        return replace(meta, loads=[spec for spec in meta.loads if not spec.must_recompute])

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Asynchronous loads whose restore has completed on the device. Restores whose storage
        reads have ended are issued here (the tier runs with one worker: deployment.py)."""
        if self.storage is not None and self.storage.pending:
            ready = self.storage.ready()
            for spec, failed in ready:
                self._failed_blocks |= set(failed)
                if not spec.block_ids:
                    self._loading[spec.req_id] = None
            loads = [spec for spec, _ in ready if spec.block_ids]
            if loads:
                self._issue(PartialKVMetadata(loads=loads, busy=True), "none", planned=True)
        done = {r for r, event in self._loading.items() if event is None or event.query()}
        for req_id in done:
            del self._loading[req_id]
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def _choose_split(
        self, meta: PartialKVMetadata, wait: Wait, kernel_profiled: bool, link: tuple[float, float] | None = None
    ) -> None:
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
        if not self.recomputes:
            split = [0] * len(loads)
        else:
            profile = self.profiles.get(meta.busy and wait == "none")
            if profile is not None and link is not None:
                profile = profile.through_link(*link)
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

    def wait_for_save(self, meta) -> None:
        if self.runtime is None:
            return
        self.runtime.finish_step()
        if not isinstance(meta, PartialKVMetadata):
            return
        if self.storage is not None:  # a write still reading a slot ends before the slot is reused
            self.storage.io.wait_slots(meta.store_slots)
        done = self.runtime.store(meta.store_block_ids, meta.store_slots, meta.store_capture, meta.store_kv)
        if self.storage is not None and meta.store_hashes:
            with_act = [self.with_act and c >= 0 for c in meta.store_capture]
            self.storage.write(meta.store_hashes, meta.store_slots, meta.store_kv, with_act,
                               done.synchronize if done is not None else None)

    def get_kv_connector_stats(self):
        if self.runtime is None:
            return None
        step = self.runtime.take_stats()
        self._stats.add(step, self.block_size)
        self.totals.add(step, self.block_size)
        if self.storage is not None:
            io = self.storage.io.take_stats()
            self._stats.add_storage(io)
            self.totals.add_storage(io)
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, PartialKVStats()
        return out
