"""The storage tier: host-store blocks as files in a directory (local NVMe or a shared filesystem)
that several vLLM instances read and write. Pure Python and torch, no vLLM.

Layout: `<dir>/<identity key>/<first 2 hex of the hash>/<block hash hex>.<k|a>`, one file per block
("a": with activations, "k": without). The identity key is a digest of everything that decides a
block's bytes (model and weights, dtypes, host layout, block size, tensor-parallel rank and size,
pipeline stage, the on-disk format version): instances that differ in any of it use other
folders and never read each other's blocks. The block hash is vLLM's chained prefix hash, equal
across instances when they hash the same way (sha256, or PYTHONHASHSEED shared for the others).

A file: a fixed header (magic, format version, flags, identity digest, and per section its length
and CRC-32 of the hash and the section), the block hash, then two sections: the host slot's K/V,
layer by layer, then its activations. Each section can be read and verified alone: a restore
reads only the activations of the blocks it recomputes and only the K/V of those it streams.
Writes go to a temporary file in the same folder, then `os.replace` (atomic on POSIX filesystems
and on NFS): a reader sees a whole block or none. Two instances writing one block both write a
whole file; the last rename wins and one copy remains. A read checks size, header, identity, hash
and the checksum of each section it reads; any mismatch is a miss (counted, logged once per kind), never a wrong block.

Who does what: the scheduler's `StorageIndex` answers look-ups from memory (a dict) and learns of
other instances' files from a background rescan every `rescan_s`; the same thread keeps the whole
directory under its size bound by removing the least recently used files (by mtime: a read
touches its file). The worker's `StorageIO` reads and writes on its own threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers

FORMAT_VERSION = 2  # 2: a length and CRC-32 per section (K/V, activations)
MAGIC = b"PKVBLOCK"
# magic, format version, flags, hash length, identity digest, K/V bytes, activation bytes, their CRC-32s
_HEADER = struct.Struct("<8sHHI16sQQII")
FLAG_KV, FLAG_ACT = 1, 2
_TMP_SUFFIX = ".tmp"
_STALE_TMP_S = 600.0  # a temporary file this old belongs to a writer that died
LOW_WATERMARK = 0.9  # eviction frees down to this share of the size bound
REJECT_KINDS = ("truncated", "corrupt", "foreign", "unreadable")


def identity_key(fields: dict) -> str:
    """The folder of one identity: a digest of its canonical JSON."""
    canonical = json.dumps({**fields, "format": FORMAT_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def block_path(root: str, key: str, block_hash: bytes, has_act: bool) -> str:
    name = block_hash.hex()
    return os.path.join(root, key, name[:2], f"{name}.{'a' if has_act else 'k'}")


def parse_name(name: str) -> tuple[bytes, bool] | None:
    """(block hash, with activations) of a block file's name; None for anything else."""
    stem, dot, kind = name.rpartition(".")
    if not dot or kind not in ("a", "k"):
        return None
    try:
        return bytes.fromhex(stem), kind == "a"
    except ValueError:
        return None


# ------------------------------------------------------------------------------- one block file
class Rejected(Exception):
    """A file that is there but cannot be served: `kind` is one of REJECT_KINDS."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(f"{kind}: {why}")
        self.kind = kind


def _crc(block_hash: bytes, segments: Sequence[memoryview]) -> int:
    crc = zlib.crc32(block_hash)
    for seg in segments:
        crc = zlib.crc32(seg, crc)  # releases the GIL for large buffers
    return crc


def write_block(
    path: str, key: str, block_hash: bytes, flags: int, kv: Sequence[memoryview], act: Sequence[memoryview],
    fsync: bool,
) -> bool:
    """Write a block file (its K/V section `kv`, then its activation section `act`) atomically
    (temporary file, optional fsync, rename). False when a file is already there (another
    instance, or an earlier write, stored the block)."""
    if os.path.exists(path):
        return False
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, flags, len(block_hash), bytes.fromhex(key)[:16], _nbytes(kv), _nbytes(act),
        _crc(block_hash, kv), _crc(block_hash, act),
    )
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            _write_all(fd, [memoryview(header), memoryview(block_hash), *kv, *act])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def _nbytes(segments: Sequence[memoryview]) -> int:
    return sum(s.nbytes for s in segments)


def _write_all(fd: int, views: list[memoryview]) -> None:
    views = [v.cast("B") for v in views]
    while views:
        n = os.writev(fd, views[:512])  # IOV_MAX is 1024 on Linux
        while n and views:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0], n = views[0][n:], 0


def read_block(
    path: str, key: str, block_hash: bytes, flags: int, kv: Sequence[memoryview], act: Sequence[memoryview],
    sections: int = FLAG_KV | FLAG_ACT,
) -> int:
    """Read the `sections` (FLAG_KV, FLAG_ACT) of a block file written with `flags` into `kv` and
    `act` (the host slot's views) and verify them, each by its own checksum; returns the bytes
    read. FileNotFoundError: no such block (a plain miss); Rejected: a file that is there but is
    not this block, whole (what was read into the views is then garbage: the caller drops it)."""
    head_size = _HEADER.size + len(block_hash)
    want_size = head_size + _nbytes(kv) + _nbytes(act)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Rejected("unreadable", f"{path}: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("unreadable", f"{path}: not a regular file")
        size = st.st_size
        if size != want_size:
            raise Rejected("truncated" if size < want_size else "corrupt", f"{path}: {size} bytes, want {want_size}")
        head = bytearray(head_size)
        got = _read_at(fd, path, [memoryview(head)], 0)
        magic, version, file_flags, hash_len, digest, kv_len, act_len, kv_crc, act_crc = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise Rejected("corrupt", f"{path}: not a block file")
        if (version, digest, file_flags, hash_len, kv_len, act_len) != (
            FORMAT_VERSION, bytes.fromhex(key)[:16], flags, len(block_hash), _nbytes(kv), _nbytes(act)
        ) or head[_HEADER.size :] != block_hash:
            raise Rejected("foreign", f"{path}: written for another identity, layout or block")
        for bit, segs, offset, crc in ((FLAG_KV, kv, head_size, kv_crc), (FLAG_ACT, act, head_size + kv_len, act_crc)):
            if sections & bit and segs:
                got += _read_at(fd, path, list(segs), offset)
                if _crc(block_hash, segs) != crc:
                    raise Rejected("corrupt", f"{path}: checksum mismatch")
    except OSError as e:
        raise Rejected("unreadable", f"{path}: {e}") from None
    finally:
        os.close(fd)
    return got


def _read_at(fd: int, path: str, views: list[memoryview], offset: int) -> int:
    """Fill `views` from the file's bytes at `offset`; returns the bytes read."""
    views = [v.cast("B") for v in views]
    got = 0
    while views:
        n = os.preadv(fd, views[:512], offset + got)
        if n == 0:
            raise Rejected("truncated", f"{path}: ended after {offset + got} bytes")
        got += n
        while n and views:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0], n = views[0][n:], 0
    return got


# ------------------------------------------------------------------------------- the directory
@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float


@dataclass
class ScanResult:
    """One pass over the whole directory: every identity's block files."""

    files: list[FileInfo] = field(default_factory=list)
    used_bytes: int = 0
    mine: dict[str, dict[bytes, bool]] = field(default_factory=dict)  # key -> hash -> with activations


def scan(root: str, keys: Iterable[str]) -> ScanResult:
    """All block files under `root` (for the size bound), and those of `keys` by hash. Removes the
    temporary files of writers that died. A folder that vanishes mid-scan is skipped."""
    keys = set(keys)
    out = ScanResult(mine={k: {} for k in keys})
    now = time.time()
    for ident in _entries(root):
        if not ident.is_dir(follow_symlinks=False):
            continue
        own = out.mine.get(ident.name)
        for sub in _entries(ident.path):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for f in _entries(sub.path):
                try:
                    st = f.stat(follow_symlinks=False)
                except OSError:
                    continue
                if f.name.endswith(_TMP_SUFFIX):
                    if now - st.st_mtime > _STALE_TMP_S:
                        _unlink(f.path)
                    continue
                parsed = parse_name(f.name)
                if parsed is None:
                    continue
                out.files.append(FileInfo(f.path, st.st_size, st.st_mtime))
                out.used_bytes += st.st_size
                if own is not None:
                    own[parsed[0]] = own.get(parsed[0], False) or parsed[1]
    return out


def _entries(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def _unlink(path: str) -> bool:
    """POSIX: a reader that has the file open keeps reading the whole file (the inode lives until
    it closes it); one that opens it afterwards gets ENOENT, a plain miss."""
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def evict(files: list[FileInfo], used: int, bound: int) -> tuple[int, int]:
    """Remove the least recently used files until at most LOW_WATERMARK * bound remain; returns
    (files removed, bytes freed). Files already gone (another instance evicted them) count as freed."""
    if used <= bound:
        return 0, 0
    target = int(bound * LOW_WATERMARK)
    removed = freed = 0
    for info in sorted(files, key=lambda f: f.mtime):
        if used - freed <= target:
            break
        removed += _unlink(info.path)
        freed += info.size
    return removed, freed


class StorageIndex:
    """Scheduler side: which blocks the directory holds for this instance's identity (on every
    tensor-parallel rank), answered from memory. A background thread rescans the directory every
    `rescan_s` (other instances' files), and enforces the size bound; `note_write` makes it run
    at once when this instance's writes may have passed the bound."""

    def __init__(self, root: str, keys: Sequence[str], bound: int, rescan_s: float, block_bytes: int) -> None:
        self.root, self.keys, self.bound, self.rescan_s = root, list(keys), bound, rescan_s
        self.block_bytes = block_bytes  # one block's file size over all ranks
        self._blocks: dict[bytes, bool] = {}
        self._lock = threading.Lock()
        self._added: dict[bytes, bool] = {}  # since the running scan started
        self._dropped: set[bytes] = set()
        self.used_bytes = 0
        self._written_since_scan = 0
        self.evicted_files = 0
        self.scans = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """The first scan and every later one run on the thread: start-up never waits for them."""
        self._thread = threading.Thread(target=self._loop, name="partial-kv-storage-scan", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._blocks

    def get(self, block_hash: bytes) -> bool | None:
        """With activations (True/False), or None when the directory does not hold the block."""
        return self._blocks.get(block_hash)

    def prefix_hits(self, hashes: Sequence[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def add(self, block_hash: bytes, has_act: bool) -> None:
        """A block this instance is writing: offered at once (a read waits for its write)."""
        with self._lock:
            self._blocks[block_hash] = self._blocks.get(block_hash, False) or has_act
            self._added[block_hash] = self._blocks[block_hash]
            self._dropped.discard(block_hash)

    def discard(self, hashes: Iterable[bytes]) -> None:
        """Blocks whose read failed: not offered again until a rescan finds them (rewritten)."""
        with self._lock:
            for h in hashes:
                self._blocks.pop(h, None)
                self._added.pop(h, None)
                self._dropped.add(h)

    def note_write(self, blocks: int) -> None:
        self._written_since_scan += blocks * self.block_bytes
        if self.used_bytes + self._written_since_scan > self.bound:
            self._wake.set()

    def rescan(self) -> None:
        with self._lock:
            self._added, self._dropped = {}, set()
        self._written_since_scan = 0
        result = scan(self.root, self.keys)
        removed, freed = evict(result.files, result.used_bytes, self.bound)
        if removed:
            self.evicted_files += removed
            logger.info("partial_kv storage: removed %d least recently used files (%.1f MiB) to stay under "
                        "%.1f MiB", removed, freed / 2**20, self.bound / 2**20)
            result = scan(self.root, self.keys)
        # A block is a hit only where every rank holds its file.
        per_rank = [result.mine[k] for k in self.keys]
        blocks = {h: a for h, a in per_rank[0].items() if all(h in other for other in per_rank[1:])}
        with self._lock:
            blocks.update(self._added)
            for h in self._dropped:
                blocks.pop(h, None)
            self._blocks = blocks
            self._added, self._dropped = {}, set()
        self.used_bytes = result.used_bytes
        self.scans += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.rescan()
            except Exception:  # never take the scheduler down over a scan
                logger.exception("partial_kv storage: scanning %s failed", self.root)
            self._wake.wait(self.rescan_s)
            self._wake.clear()


# ------------------------------------------------------------------------------- worker I/O
@dataclass
class IOStats:
    blocks_read: int = 0
    bytes_read: int = 0
    blocks_written: int = 0
    bytes_written: int = 0
    read_misses: int = 0  # offered by the index, gone when read (evicted, never written)
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_KINDS, 0))
    write_errors: int = 0


class StorageIO:
    """Worker side: block reads into host slots and writes from them, on `threads` I/O threads.

    `segments(slot, with_kv, with_act)` returns the slot's byte views in file order; `host_format`
    describes them (shapes, strides, dtypes) and goes into each file's identity digest, so that a
    file from an instance whose device lays blocks out otherwise is rejected as foreign. A slot that
    a write still reads is not written until that write ends (`wait_slots`); a read of a block
    whose write is in flight waits for that write. Errors never leave this class: a failed read
    is a miss, a failed write is counted and logged once per kind of error."""

    def __init__(
        self, root: str, key: str, segments: Callable[[int, bool, bool], list[memoryview]],
        threads: int = 4, fsync: bool = False, host_format: str = "",
    ) -> None:
        self.root, self.key, self.segments, self.fsync = root, key, segments, fsync
        self.digest_key = identity_key({"folder": key, "host_format": host_format}) if host_format else key
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="partial-kv-storage")
        self._lock = threading.Lock()
        self.stats = IOStats()
        self._slot_writes: dict[int, Future] = {}  # slot -> the newest write reading it
        self._pending: dict[bytes, Future] = {}  # block hash -> its write in flight
        self._logged: set[str] = set()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def take_stats(self) -> IOStats:
        with self._lock:
            stats, self.stats = self.stats, IOStats()
        return stats

    def wait_slots(self, slots: Iterable[int]) -> None:
        """Before anything overwrites these host slots."""
        for slot in slots:
            fut = self._slot_writes.get(slot)
            if fut is not None:
                fut.result()
                if self._slot_writes.get(slot) is fut:
                    del self._slot_writes[slot]

    def write(
        self, block_hash: bytes, slot: int, with_kv: bool, with_act: bool, ready: Callable[[], None] | None = None
    ) -> Future:
        """Write a slot's block once `ready()` returns (the device->host copy into it is done)."""
        kv, act = self.segments(slot, with_kv, False), self.segments(slot, False, with_act)
        flags = FLAG_KV * with_kv | FLAG_ACT * with_act
        path = block_path(self.root, self.key, block_hash, with_act)

        def run() -> None:
            if ready is not None:
                ready()
            try:
                if write_block(path, self.digest_key, block_hash, flags, kv, act, self.fsync):
                    with self._lock:
                        self.stats.blocks_written += 1
                        self.stats.bytes_written += _nbytes(kv) + _nbytes(act)
            except OSError as e:
                with self._lock:
                    self.stats.write_errors += 1
                self._log_once(f"write:{e.errno}", "partial_kv storage: cannot write blocks to %s (%s); serving "
                               "goes on from host memory and recompute, errors are counted", self.root, e)
            finally:
                with self._lock:
                    if self._pending.get(block_hash) is fut:
                        del self._pending[block_hash]

        with self._lock:  # run() ends under the lock: fut is set by then
            fut = self._pool.submit(run)
            self._pending[block_hash] = fut
        self._slot_writes[slot] = fut
        return fut

    def read(
        self, block_hash: bytes, slot: int, with_kv: bool, with_act: bool, sections: int = FLAG_KV | FLAG_ACT
    ) -> Future:
        """Read the `sections` of a block file (written with K/V and activations as `with_kv`,
        `with_act`) into a slot; the future's result is True when the slot holds them, verified."""
        self.wait_slots([slot])
        kv, act = self.segments(slot, with_kv, False), self.segments(slot, False, with_act)
        flags = FLAG_KV * with_kv | FLAG_ACT * with_act
        path = block_path(self.root, self.key, block_hash, with_act)
        with self._lock:
            writing = self._pending.get(block_hash)

        def run() -> bool:
            if writing is not None:
                writing.result()
            try:
                n = read_block(path, self.digest_key, block_hash, flags, kv, act, sections)
            except FileNotFoundError:
                with self._lock:
                    self.stats.read_misses += 1
                return False
            except Rejected as e:
                with self._lock:
                    self.stats.rejected[e.kind] += 1
                self._log_once(f"reject:{e.kind}", "partial_kv storage: rejected a %s block file (%s); "
                               "such files are misses and are removed, their blocks recomputed", e.kind, e)
                if e.kind != "unreadable":  # never served: make room for a good copy
                    _unlink(path)
                return False
            try:
                os.utime(path)  # recently used, for every instance's eviction
            except OSError:
                pass
            with self._lock:
                self.stats.blocks_read += 1
                self.stats.bytes_read += n
            return True

        return self._pool.submit(run)

    def _log_once(self, kind: str, msg: str, *args) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning(msg, *args)


def slot_segments(buffer: torch.Tensor, views: Sequence[torch.Tensor], slot: int) -> list[memoryview]:
    """One slot's bytes in each of `views` (slot-first views into the uint8 `buffer`, each slot one
    dense run of bytes), as memoryviews of `buffer`: reads and writes go straight to the slot."""
    base = buffer.data_ptr()
    raw = memoryview(buffer.numpy())
    out = []
    for v in views:
        nbytes = v[0].numel() * v.element_size()
        start = v.data_ptr() - base + slot * v.stride(0) * v.element_size()
        out.append(raw[start : start + nbytes])
    return out

