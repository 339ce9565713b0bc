"""The storage tier in the connector's two halves: what the scheduler half and the worker half
do with `storage.StorageIndex` and `storage.StorageIO` (the files themselves live in storage.py).

Scheduler: a look-up that misses in host memory continues on the storage index; each storage hit
gets a host slot (allocated and pinned like a store's) that is "filling" until the worker reports
the request's restore done: no other request's look-up offers it before. Blocks leave the host
store for the directory write-through: every block stored to the host is also written to the
directory once its device->host copy is done, unless the index already has it. (Write-through
rather than on host eviction: eviction happens in the scheduler, while the slot's bytes are in
the worker; and a block that is written early is there for the other instances early.)

Worker: a restore with storage blocks has its split planned first, for the storage link's
measured rate; then it reads, on the I/O threads, only the section each block needs into its host
slot: the activations of the blocks it recomputes, the K/V of those it streams. The request waits
(asynchronously) until the reads end, then the normal pipelined restore runs from the host slots
with exactly that split. A host slot that got one of its file's two sections is dropped from the
host store when the restore ends (its other half is garbage); a later look-up reads the file
again. A block whose read fails (gone, damaged, foreign) ends the restore there: the blocks from
it on are reported to vLLM as load errors and recomputed (kv_load_failure_policy "recompute").
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass, field

from vllm_partial_kv import compat, storage
from vllm_partial_kv.config import PartialKVConfig
from vllm_partial_kv.deployment import model_shape, served_layout
from vllm_partial_kv.metrics import PartialKVStats
from vllm_partial_kv.store import HostPool

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_FINGERPRINT_BYTES = 1 << 20


def weights_identity(model: str, revision: str | None) -> str:
    """Tells two checkpoints apart without reading them whole: for a local directory, each weight
    file's name, size and first and last MiB (fine-tunes of one architecture differ there); for a
    hub model, its name and revision."""
    if not os.path.isdir(model):
        return f"{model}@{revision or 'main'}"
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model)):
        path = os.path.join(model, name)
        if not name.endswith(_WEIGHT_SUFFIXES) or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}:".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
            f.seek(max(0, size - _FINGERPRINT_BYTES))
            digest.update(f.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()


def identity_keys(vllm_config, cfg: PartialKVConfig, with_act: bool) -> dict[tuple[int, int], str]:
    """(tensor-parallel rank, pipeline stage) -> the folder key of that rank's files: everything
    that decides a block's bytes (storage.py)."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    shape = model_shape(vllm_config)
    common = {
        "weights": weights_identity(mc.model, mc.revision),
        "dtype": str(mc.dtype),
        "kv_cache_dtype": str(cc.cache_dtype),
        "block_size": cc.block_size,
        "hash": str(getattr(cc, "prefix_caching_hash_algo", "")),
        "host_layout": served_layout(cfg, with_act),
        "host_format": cfg.host_format,
        "shape": [shape.num_layers, shape.hidden_size, shape.num_kv_heads, shape.head_size, shape.act_shards],
        "attention_backend": os.environ.get("VLLM_ATTENTION_BACKEND", ""),
        "tp": pc.tensor_parallel_size,
        "pp": pc.pipeline_parallel_size,
    }
    return {
        (tp, pp): storage.identity_key({**common, "tp_rank": tp, "pp_rank": pp})
        for tp in range(pc.tensor_parallel_size) for pp in range(pc.pipeline_parallel_size)
    }


@dataclass
class Fetch:
    """One block a restore reads from the directory into its host slot first."""

    block_hash: bytes
    slot: int  # -1: no host slot was free: the block fails (recomputed)
    with_kv: bool
    with_act: bool


# ------------------------------------------------------------------------------- scheduler half
class SchedulerTier:
    """The scheduler half's storage index and counters."""

    def __init__(self, vllm_config, cfg: PartialKVConfig, with_act: bool, block_bytes: int) -> None:
        keys = identity_keys(vllm_config, cfg, with_act)
        self.index = storage.StorageIndex(cfg.storage_dir, list(keys.values()), cfg.storage_bytes,
                                          cfg.storage_rescan_s, block_bytes)
        self.index.start()
        self.filling: dict[str, list[bytes]] = {}  # request -> blocks being read into host slots
        self._filling: set[bytes] = set()
        self._partial: dict[str, list[bytes]] = {}  # request -> blocks filled with one section only
        self._fetch_loads: dict[str, list[int]] = {}  # request -> GPU blocks of its restore with reads
        self._fetch_blocks: dict[int, str] = {}
        self.hit_blocks = 0
        self.missed_lookups = 0
        self._reported_bytes = -1
        if not compat.block_hashes_reproducible(str(vllm_config.cache_config.prefix_caching_hash_algo)):
            logger.warning("partial_kv: this vLLM hashes blocks differently in every process unless PYTHONHASHSEED "
                           "is set: the storage tier finds only this process's blocks; set PYTHONHASHSEED to one "
                           "value on every instance that shares %s", cfg.storage_dir)
        if vllm_config.kv_transfer_config.kv_load_failure_policy != "recompute":
            logger.warning("partial_kv: storage_dir is set but kv_load_failure_policy is not \"recompute\": a "
                           "block file that cannot be read fails its request instead of being recomputed")
        logger.info("partial_kv: storage tier in %s, at most %.1f GiB, rescanned every %.1f s",
                    cfg.storage_dir, cfg.storage_bytes / 2**30, cfg.storage_rescan_s)

    def is_filling(self, block_hash: bytes) -> bool:
        return block_hash in self._filling

    def lookup(self, hashes: list[bytes], in_host) -> list[bool]:
        """With activations, per leading block the directory holds (and the host does not)."""
        out = []
        for h in hashes:
            has_act = self.index.get(h)
            if has_act is None or h in in_host:
                break
            out.append(has_act)
        if len(out) < len(hashes):
            self.missed_lookups += 1
        return out

    def start_fill(self, req_id: str, fetches: list[Fetch]) -> None:
        hashes = [f.block_hash for f in fetches if f.slot >= 0]
        self.hit_blocks += len(hashes)
        self.filling.setdefault(req_id, []).extend(hashes)
        self._filling.update(hashes)
        # Files with both sections: the worker reads only one of them into the slot.
        self._partial.setdefault(req_id, []).extend(f.block_hash for f in fetches if f.slot >= 0 and f.with_kv
                                                    and f.with_act)

    def end_fill(self, req_id: str) -> list[bytes]:
        """The request's restore ended: the blocks whose host slots hold only part of the block
        (for the host store to drop)."""
        for h in self.filling.pop(req_id, ()):
            self._filling.discard(h)
        for b in self._fetch_loads.pop(req_id, ()):
            self._fetch_blocks.pop(b, None)
        return self._partial.pop(req_id, [])

    def fetching(self, req_id: str, block_ids: list[int]) -> None:
        """The GPU blocks of a restore that reads block files first."""
        self._fetch_loads[req_id] = block_ids
        self._fetch_blocks.update(dict.fromkeys(block_ids, req_id))

    def only_fetched(self, invalid_block_ids) -> bool:
        """Whether every failed block belongs to a restore that read block files (a file that is
        gone or damaged fails its blocks, but says nothing about the restore path)."""
        return bool(invalid_block_ids) and all(b in self._fetch_blocks for b in invalid_block_ids)

    def write_through(self, block_hash: bytes, has_act: bool) -> bytes:
        """The hash to write a newly stored block under, or b"" when the directory has it."""
        if block_hash in self.index:
            return b""
        self.index.add(block_hash, has_act)
        self.index.note_write(1)
        return block_hash

    def add_stats(self, stats: PartialKVStats | None) -> PartialKVStats | None:
        """This half's counters since the last call, and the directory's size when it changed."""
        data = {}
        if self.hit_blocks or self.missed_lookups:
            data = {"storage_hit_blocks": self.hit_blocks, "storage_missed_lookups": self.missed_lookups}
            self.hit_blocks = self.missed_lookups = 0
        if self.index.used_bytes != self._reported_bytes:
            self._reported_bytes = data["storage_used_bytes"] = self.index.used_bytes
        if not data:
            return stats
        return (stats or PartialKVStats()).aggregate(PartialKVStats(data=data))

    def close(self) -> None:
        self.index.close()


# ------------------------------------------------------------------------------- worker half
@dataclass
class _Pending:
    spec: object  # restore.LoadSpec
    first_fetch: int  # index in the spec of its first storage block
    reads: list[Future] = field(default_factory=list)


class WorkerTier:
    """The worker half's block files: write-through of stored blocks, reads before restores."""

    def __init__(self, vllm_config, cfg: PartialKVConfig, with_act: bool, pool: HostPool) -> None:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        rank = (get_tp_group().rank_in_group, get_pp_group().rank_in_group)
        key = identity_keys(vllm_config, cfg, with_act)[rank]
        kv_views = [v for views in pool.kv.values() for v in views]
        # fp8 activation rows carry one scale each (the K/V views already hold theirs).
        act_views = list(pool.act.values()) + list(pool.act_scale.values())

        def segments(slot: int, with_kv: bool, with_act: bool) -> list[memoryview]:
            return storage.slot_segments(pool.buffer, kv_views * with_kv + act_views * with_act, slot)

        host_format = repr([(tuple(v.shape[1:]), v.stride()[1:], str(v.dtype)) for v in kv_views + act_views])
        self.io = storage.StorageIO(cfg.storage_dir, key, segments, cfg.storage_io_threads, cfg.storage_fsync,
                                    host_format)
        self.block_bytes = sum(len(s) for s in segments(0, True, bool(act_views)))  # a full block's payload
        self.pending: dict[str, _Pending] = {}

    def link(self, cfg: PartialKVConfig) -> tuple[float, float]:
        """The directory's read rate (bytes/s, seconds per file), measured once and cached."""
        from vllm_partial_kv import profiler

        os.makedirs(cfg.storage_dir, exist_ok=True)
        return profiler.load_or_measure_storage(cfg.storage_dir, self.block_bytes, cfg.profile_cache_dir)

    def write(self, hashes: list[bytes], slots: list[int], with_kv: list[bool], with_act: list[bool], ready) -> None:
        for h, slot, kv, act in zip(hashes, slots, with_kv, with_act):
            if h:
                self.io.write(h, slot, kv, act, ready)

    def fetch(self, spec, fetches: list[Fetch]) -> None:
        """Start the reads of a restore's storage blocks (the last len(fetches) of the spec), its
        split already chosen: the activations of a block it recomputes, the K/V of one it streams."""
        pending = _Pending(spec, len(spec.slots) - len(fetches))
        for i, f in enumerate(fetches, start=pending.first_fetch):
            section = storage.FLAG_ACT if i < spec.recompute_blocks else storage.FLAG_KV
            if f.slot < 0 or not section & (storage.FLAG_KV * f.with_kv | storage.FLAG_ACT * f.with_act):
                failed: Future = Future()
                failed.set_result(False)
                pending.reads.append(failed)
            else:
                pending.reads.append(self.io.read(f.block_hash, f.slot, f.with_kv, f.with_act, section))
        self.pending[spec.req_id] = pending

    def ready(self) -> list[tuple[object, list[int]]]:
        """Restores whose reads all ended: each spec cut at its first block that could not be read,
        with the GPU blocks from there on (load errors)."""
        out = []
        for req_id, p in list(self.pending.items()):
            if not all(r.done() for r in p.reads):
                continue
            del self.pending[req_id]
            ok = p.first_fetch
            for r in p.reads:
                if not r.result():
                    break
                ok += 1
            spec, failed = p.spec, p.spec.block_ids[ok:]
            spec.slots, spec.block_ids = spec.slots[:ok], spec.block_ids[:ok]
            spec.recompute_blocks = min(spec.recompute_blocks, ok)
            spec.must_recompute = min(spec.must_recompute, ok)
            out.append((spec, failed))
        return out
