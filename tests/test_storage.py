"""The storage tier's files, index and I/O threads, without vLLM (temporary directories; a tmpfs
and a read-only bind mount where the test runs as root, a simulated error otherwise)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vllm_partial_kv import storage
from vllm_partial_kv.storage import (
    FLAG_ACT, FLAG_KV, Rejected, StorageIndex, StorageIO, block_path, identity_key, read_block, scan,
    slot_segments, write_block,
)

KEY = identity_key({"model": "tiny", "block_size": 16, "tp_rank": 0})
OTHER = identity_key({"model": "other", "block_size": 16, "tp_rank": 0})


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


class Pool:
    """A host pool's shape: per layer a K view, a V view and an activation view, slot-first in one buffer."""

    def __init__(self, slots: int, seed: int = 0, layers: int = 2) -> None:
        kv, act = 64, 32  # elements per slot
        self.buffer = torch.zeros(slots * layers * (2 * kv + act) * 2, dtype=torch.uint8)
        g = torch.Generator().manual_seed(seed)
        self.buffer.copy_(torch.randint(0, 256, self.buffer.shape, generator=g, dtype=torch.uint8))
        self.kv, self.act, off = [], [], 0
        for _ in range(layers):
            for _ in range(2):
                self.kv.append(self.buffer[off : off + slots * kv * 2].view(torch.bfloat16).view(slots, 8, 8))
                off += slots * kv * 2
            self.act.append(self.buffer[off : off + slots * act * 2].view(torch.float16).view(slots, act))
            off += slots * act * 2

    def segments(self, slot: int, with_kv: bool, with_act: bool) -> list[memoryview]:
        return slot_segments(self.buffer, self.kv * with_kv + self.act * with_act, slot)

    def sections(self, slot: int) -> tuple[list[memoryview], list[memoryview]]:
        """A slot's K/V section and activation section."""
        return self.segments(slot, True, False), self.segments(slot, False, True)

    def slot_bytes(self, slot: int, with_kv: bool = True, with_act: bool = True) -> bytes:
        return b"".join(bytes(s) for s in self.segments(slot, with_kv, with_act))


def _write(root: str, pool: Pool, slot: int, block_hash: bytes, key: str = KEY) -> str:
    path = block_path(root, key, block_hash, True)
    write_block(path, key, block_hash, FLAG_KV | FLAG_ACT, *pool.sections(slot), fsync=False)
    return path


def _read(root: str, pool: Pool, slot: int, block_hash: bytes, sections: int = FLAG_KV | FLAG_ACT) -> int:
    return read_block(block_path(root, KEY, block_hash, True), KEY, block_hash, FLAG_KV | FLAG_ACT,
                      *pool.sections(slot), sections)


def test_a_block_round_trips_through_its_file_into_another_slot(tmp_path):
    src, dst = Pool(4, seed=1), Pool(4, seed=2)
    path = _write(str(tmp_path), src, 2, h(7))
    assert Path(path).parent.parent.name == KEY and Path(path).name == h(7).hex() + ".a"
    assert not _write_is_needed(str(tmp_path), src, 2, h(7))  # already there: not written again
    n = _read(str(tmp_path), dst, 1, h(7))
    assert dst.slot_bytes(1) == src.slot_bytes(2) and n == os.path.getsize(path)
    assert dst.slot_bytes(0) != src.slot_bytes(2)  # only the slot read into changed
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]  # no temporary left


@pytest.mark.parametrize("damaged", [FLAG_KV, FLAG_ACT])
def test_each_section_is_read_and_verified_alone(tmp_path, damaged):
    """A restore reads the activations of a block it recomputes, the K/V of one it streams: each
    read checks its own section's checksum only, and a damaged section fails only its reads."""
    src, root = Pool(2, seed=1), str(tmp_path)
    path = _write(root, src, 0, h(1))
    head = storage._HEADER.size + len(h(1))
    kv_len, act_len = len(src.slot_bytes(0, True, False)), len(src.slot_bytes(0, False, True))
    assert os.path.getsize(path) == head + kv_len + act_len
    for section, with_kv, with_act, length in ((FLAG_KV, True, False, kv_len), (FLAG_ACT, False, True, act_len)):
        dst = Pool(2, seed=2)
        other = dst.slot_bytes(1, with_act, with_kv)  # the section not read stays as it was
        assert _read(root, dst, 1, h(1), section) == head + length
        assert dst.slot_bytes(1, with_kv, with_act) == src.slot_bytes(0, with_kv, with_act)
        assert dst.slot_bytes(1, with_act, with_kv) == other
    data = bytearray(Path(path).read_bytes())
    data[head + 3 if damaged == FLAG_KV else len(data) - 3] ^= 0x01
    Path(path).write_bytes(bytes(data))
    intact = FLAG_ACT if damaged == FLAG_KV else FLAG_KV
    _read(root, Pool(2), 1, h(1), intact)
    for sections in (damaged, FLAG_KV | FLAG_ACT):
        with pytest.raises(Rejected) as e:
            _read(root, Pool(2), 1, h(1), sections)
        assert e.value.kind == "corrupt"


def test_storage_io_counts_the_bytes_of_the_sections_it_read(tmp_path):
    src, dst, root = Pool(4, seed=1), Pool(4, seed=2), str(tmp_path)
    _write(root, src, 0, h(1))
    io = StorageIO(root, KEY, dst.segments, threads=2)
    try:
        assert io.read(h(1), 2, True, True, FLAG_ACT).result() is True
        assert dst.slot_bytes(2, False, True) == src.slot_bytes(0, False, True)
        stats = io.take_stats()
        assert stats.blocks_read == 1
        assert stats.bytes_read == storage._HEADER.size + len(h(1)) + len(src.slot_bytes(0, False, True))
    finally:
        io.close()


def _write_is_needed(root, pool, slot, block_hash) -> bool:
    return write_block(block_path(root, KEY, block_hash, True), KEY, block_hash, FLAG_KV | FLAG_ACT,
                       *pool.sections(slot), fsync=True)


def _damage(path: str, how: str) -> None:
    data = bytearray(Path(path).read_bytes())
    if how == "flip":
        data[-5] ^= 0x10
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "extend":
        data += b"\0"
    elif how == "garbage":
        data = bytearray(os.urandom(len(data)))
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("how,kind", [("flip", "corrupt"), ("truncate", "truncated"), ("extend", "corrupt"),
                                      ("garbage", "corrupt")])
def test_a_damaged_file_is_rejected_never_served(tmp_path, how, kind):
    pool = Pool(2)
    _damage(_write(str(tmp_path), pool, 0, h(1)), how)
    with pytest.raises(Rejected) as e:
        _read(str(tmp_path), Pool(2), 1, h(1))
    assert e.value.kind == kind


def test_foreign_files_under_this_name_are_rejected(tmp_path):
    pool, root = Pool(2), str(tmp_path)
    # Another identity's file of the same block, copied to this identity's name.
    other = block_path(root, OTHER, h(1), True)
    write_block(other, OTHER, h(1), FLAG_KV | FLAG_ACT, *pool.sections(0), fsync=False)
    mine = block_path(root, KEY, h(1), True)
    os.makedirs(os.path.dirname(mine))
    os.link(other, mine)
    # Another block's file under this block's name.
    _write(root, pool, 0, h(2))
    os.makedirs(os.path.dirname(block_path(root, KEY, h(3), True)))
    os.link(block_path(root, KEY, h(2), True), block_path(root, KEY, h(3), True))
    for block in (h(1), h(3)):
        with pytest.raises(Rejected) as e:
            _read(root, Pool(2), 1, block)
        assert e.value.kind == "foreign"
    # The same block written with activations, read as a K/V-only block of the same size: flags differ.
    with pytest.raises(Rejected) as e:
        read_block(block_path(root, KEY, h(2), True), KEY, h(2), FLAG_KV, *pool.sections(1))
    assert e.value.kind == "foreign"


def test_an_unreadable_file_is_rejected(tmp_path):
    os.makedirs(block_path(str(tmp_path), KEY, h(1), True))  # a folder where the file should be
    with pytest.raises(Rejected) as e:
        _read(str(tmp_path), Pool(2), 0, h(1))
    assert e.value.kind == "unreadable"


def test_storage_io_counts_misses_and_rejects_and_removes_bad_files(tmp_path, caplog):
    root, pool = str(tmp_path), Pool(4)
    io = StorageIO(root, KEY, pool.segments, threads=2)
    try:
        assert io.write(h(1), 0, True, True).result() is None
        assert io.write(h(2), 1, True, True).result() is None
        io.write(h(1), 0, True, True).result()  # already there: not counted again
        _damage(block_path(root, KEY, h(2), True), "flip")
        dst = Pool(4, seed=9)
        io2 = StorageIO(root, KEY, dst.segments, threads=2)
        assert io2.read(h(1), 3, True, True).result() is True
        assert dst.slot_bytes(3) == pool.slot_bytes(0)
        assert io2.read(h(2), 2, True, True).result() is False
        assert io2.read(h(2), 2, True, True).result() is False  # removed: now a plain miss
        assert io2.read(h(5), 2, True, True).result() is False
        s, s2 = io.take_stats(), io2.take_stats()
        assert (s.blocks_written, s.bytes_written) == (2, 2 * len(pool.slot_bytes(0)))
        assert (s2.blocks_read, s2.read_misses, s2.rejected["corrupt"]) == (1, 2, 1)
        assert s2.bytes_read == os.path.getsize(block_path(root, KEY, h(1), True))
        assert io2.take_stats().blocks_read == 0
        assert sum("rejected a corrupt" in r.getMessage() for r in caplog.records) == 1
        io2.close()
    finally:
        io.close()


def test_a_read_waits_for_the_write_of_its_block_and_a_slot_for_the_write_reading_it(tmp_path):
    root, pool = str(tmp_path), Pool(2)
    io = StorageIO(root, KEY, pool.segments, threads=2)
    gate = threading.Event()
    try:
        before = pool.slot_bytes(0)
        write = io.write(h(1), 0, True, True, ready=gate.wait)  # the device copy is not done yet
        read = io.read(h(1), 1, True, True)
        time.sleep(0.05)
        assert not read.done() and not write.done()
        gate.set()
        assert read.result() is True and pool.slot_bytes(1) == before
        io.wait_slots([0])
        assert write.done()
    finally:
        io.close()


# ------------------------------------------------------------------------------- several writers
WIDE = 256  # layers of the several-writer tests' blocks (~160 KiB): a write is not one instant


def _writer(root: str, seed: int, blocks: int, bound: int | None, start) -> None:
    pool = Pool(blocks, seed=0, layers=WIDE)  # same content for the same blocks in every writer
    io = StorageIO(root, KEY if seed < 100 else OTHER, pool.segments, threads=4)
    index = StorageIndex(root, [KEY], bound or 1 << 40, 3600, len(pool.slot_bytes(0)))
    start.wait()
    offset = 0 if bound is None else seed * blocks
    for i in range(blocks):
        io.write(h(offset + i), i, True, True)
        if bound is not None and i % 8 == 7:
            io.wait_slots(range(blocks))
            index.rescan()
    io.close()


def _reader(root: str, blocks: int, start, stop, seen) -> None:
    """Reads every block over and over while the writers run: each read finds no file or a whole one."""
    dst = Pool(1, seed=7, layers=WIDE)
    start.wait()
    while not stop.is_set():
        for i in range(blocks):
            try:
                _read(root, dst, 0, h(i))
                seen["whole"] += 1
            except FileNotFoundError:
                pass
            except Rejected as e:
                seen[e.kind] = seen.get(e.kind, 0) + 1


def _run_writers(root: str, seeds: list[int], blocks: int, bound: int | None) -> dict:
    ctx = mp.get_context("fork")
    start, stop = ctx.Event(), ctx.Event()
    seen = ctx.Manager().dict(whole=0)
    procs = [ctx.Process(target=_writer, args=(root, s, blocks, bound, start)) for s in seeds]
    reader = ctx.Process(target=_reader, args=(root, blocks, start, stop, seen))
    for p in [*procs, reader]:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    stop.set()
    reader.join(60)
    return dict(seen)


def test_two_writers_of_the_same_blocks_leave_one_valid_copy_each(tmp_path):
    root = str(tmp_path)
    seen = _run_writers(root, [1, 2], 64, None)
    assert set(seen) == {"whole"}, seen  # no reader ever saw a partial file
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 64 and not [p for p in files if p.name.endswith(".tmp")]
    pool, dst = Pool(64, seed=0, layers=WIDE), Pool(1, seed=5, layers=WIDE)
    for i in range(64):
        _read(root, dst, 0, h(i))
        assert dst.slot_bytes(0) == pool.slot_bytes(i)


def test_the_size_bound_holds_with_two_writers_and_evicts_least_recently_used(tmp_path):
    root = str(tmp_path)
    file_bytes = os.path.getsize(_write(root, Pool(1, layers=WIDE), 0, h(10**6)))
    os.utime(block_path(root, KEY, h(10**6), True), (time.time() + 3600,) * 2)  # recently read: kept
    bound = 40 * file_bytes
    _run_writers(root, [1, 2, 100], 48, bound)  # two instances of this identity and one of another
    index = StorageIndex(root, [KEY], bound, 3600, file_bytes)
    index.rescan()
    assert index.used_bytes <= bound
    assert h(10**6) in index  # the recently read file outlived 3 x 48 newer writes
    assert sum(1 for _ in tmp_path.rglob("*.a")) <= 40


def test_the_index_learns_other_instances_files_by_rescan_and_requires_every_rank(tmp_path):
    root, pool = str(tmp_path), Pool(4)
    rank1 = identity_key({"model": "tiny", "block_size": 16, "tp_rank": 1})
    index = StorageIndex(root, [KEY, rank1], 1 << 30, 0.02, 1)
    index.start()
    try:
        for i in range(3):
            _write(root, pool, i, h(i))
        write_block(block_path(root, rank1, h(0), False), rank1, h(0), FLAG_KV, pool.segments(0, True, False), [],
                    False)
        write_block(block_path(root, rank1, h(1), True), rank1, h(1), FLAG_KV | FLAG_ACT, *pool.sections(1), False)
        deadline = time.time() + 10
        while index.prefix_hits([h(0), h(1), h(2)]) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert index.prefix_hits([h(0), h(1), h(2)]) == 2  # block 2 is missing on rank 1
        assert index.get(h(1)) is True and index.get(h(2)) is None
        index.add(h(2), False)
        assert index.prefix_hits([h(0), h(1), h(2)]) == 3
        index.discard([h(0)])
        assert index.prefix_hits([h(0), h(1)]) == 0
    finally:
        index.close()


def test_scan_removes_stale_temporary_files_only(tmp_path):
    path = Path(block_path(str(tmp_path), KEY, h(1), True))
    path.parent.mkdir(parents=True)
    stale, fresh = path.with_name(path.name + ".x.tmp"), path.with_name(path.name + ".y.tmp")
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - 2 * storage._STALE_TMP_S
    os.utime(stale, (old, old))
    result = scan(str(tmp_path), [KEY])
    assert not stale.exists() and fresh.exists() and result.files == []


# ------------------------------------------------------------------------------- a failing directory
@contextmanager
def _mounted(args: list[str], path: Path):
    path.mkdir(exist_ok=True)
    try:
        subprocess.run(["mount", *args, str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount here ({e}); test_*_simulated covers the same path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill_then_read(root: str, caplog) -> None:
    pool = Pool(64)
    io = StorageIO(root, KEY, pool.segments, threads=2)
    try:
        for i in range(64):
            io.write(h(i), i, True, True)
        io.wait_slots(range(64))
        stats = io.take_stats()
        assert stats.write_errors > 0 and stats.blocks_written < 64
        assert sum("cannot write blocks" in r.getMessage() for r in caplog.records) == 1  # said once
        assert not [p for p in Path(root).rglob("*.tmp")]  # a failed write leaves no temporary
        hits = [io.read(h(i), 0, True, True).result() for i in range(64)]  # what did fit is whole
        assert sum(hits) == stats.blocks_written and io.take_stats().rejected == stats.rejected
    finally:
        io.close()


def test_a_full_filesystem_counts_write_errors_and_keeps_what_fit(tmp_path, caplog):
    with _mounted(["-t", "tmpfs", "-o", "size=64k", "tmpfs"], tmp_path / "small") as root:
        _fill_then_read(str(root), caplog)


def test_a_full_filesystem_simulated(tmp_path, caplog, monkeypatch):
    real = os.writev
    written = {"n": 0}

    def writev(fd, views):
        written["n"] += 1
        if written["n"] > 5:
            raise OSError(28, "No space left on device")
        return real(fd, views)

    monkeypatch.setattr(storage.os, "writev", writev)
    _fill_then_read(str(tmp_path), caplog)


def test_a_directory_turned_read_only_keeps_reads_and_counts_write_errors(tmp_path, caplog):
    src = tmp_path / "dir"
    src.mkdir()
    pool = Pool(8)
    _write(str(src), pool, 0, h(0))
    with _mounted(["--bind", str(src)], tmp_path / "ro") as ro:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        io = StorageIO(str(ro), KEY, pool.segments, threads=2)
        try:
            for i in range(1, 4):
                io.write(h(i), i, True, True)
            io.wait_slots(range(8))
            assert io.read(h(0), 5, True, True).result() is True  # utime fails: still a hit
            stats = io.take_stats()
            assert (stats.write_errors, stats.blocks_read) == (3, 1)
            assert sum("cannot write blocks" in r.getMessage() for r in caplog.records) == 1
        finally:
            io.close()


def test_a_directory_that_disappears_counts_write_errors_and_misses(tmp_path):
    root = tmp_path / "gone"
    pool = Pool(4)
    io = StorageIO(str(root), KEY, pool.segments, threads=1)
    try:
        io.write(h(0), 0, True, True).result()
        subprocess.run(["rm", "-rf", str(root)], check=True)
        root.write_text("not a directory any more")
        io.write(h(1), 1, True, True).result()
        assert io.read(h(0), 2, True, True).result() is False
        stats = io.take_stats()
        assert stats.write_errors == 1 and stats.blocks_written == 1
        assert stats.rejected["unreadable"] + stats.read_misses == 1
    finally:
        io.close()


def test_the_storage_read_rate_is_measured_once_then_cached(tmp_path, monkeypatch):
    from vllm_partial_kv import profiler

    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    calls = []
    real = profiler.measure_storage
    monkeypatch.setattr(profiler, "measure_storage", lambda *a, **k: calls.append(a) or real(*a, total_bytes=1 << 20, **k))
    bw, latency = profiler.load_or_measure_storage(data, 64 << 10, cache_dir=cache)
    assert bw > 0 and latency >= 0 and list(data.iterdir()) == []  # probe files removed
    assert profiler.load_or_measure_storage(data, 64 << 10, cache_dir=cache) == (bw, latency)
    assert len(calls) == 1
    profiler.load_or_measure_storage(data, 32 << 10, cache_dir=cache)  # another block size
    assert len(calls) == 2


def test_storage_config_keys_are_validated():
    from vllm_partial_kv.config import ConfigError, parse_config

    cfg = parse_config({"storage_dir": "/mnt/kv", "storage_bytes": "1e9", "storage_rescan_s": 0.5,
                        "storage_io_threads": 8, "storage_fsync": True})
    assert (cfg.storage_dir, cfg.storage_bytes, cfg.storage_rescan_s, cfg.storage_io_threads, cfg.storage_fsync) == (
        "/mnt/kv", 10**9, 0.5, 8, True)
    assert parse_config({}).storage_dir is None and parse_config({"storage_dir": None}).storage_dir is None
    for bad, name in [({"storage_dir": ""}, "storage_dir"), ({"storage_bytes": -1}, "storage_bytes"),
                      ({"storage_rescan_s": 0}, "storage_rescan_s"), ({"storage_fsync": "yes"}, "storage_fsync"),
                      ({"storage_io_threads": 0}, "storage_io_threads"),
                      ({"storage_dir": "/x", "async_load": False}, "async_load")]:
        with pytest.raises(ConfigError, match=name):
            parse_config(bad)


def test_the_throughput_benchmark_runs(tmp_path):
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "storage.py"
    out = subprocess.run([sys.executable, str(script), "--dir", str(tmp_path), "--block-mib", "0.25",
                          "--total-mib", "4", "--repeats", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "read:  plain" in out.stdout and "ratio" in out.stdout and list(tmp_path.iterdir()) == []


def test_block_hashes_are_shared_across_processes_with_a_shared_seed(monkeypatch):
    from vllm_partial_kv import compat

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert compat.block_hashes_reproducible("xxhash") is False  # random per process without a seed
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert compat.block_hashes_reproducible("xxhash") is True


def _bare_scheduler(tmp_path, slots: int):
    """The scheduler half around a real BlockIndex and StorageIndex, blocks of 4 tokens, no engine."""
    from test_memory import _scheduler_half

    from vllm_partial_kv.storage_tier import SchedulerTier
    from vllm_partial_kv.store import BlockIndex

    conn = _scheduler_half("kv+act", 64)
    conn.index, conn.with_act, conn._to_load, conn.layout = BlockIndex(slots), True, [], "kv+act"
    conn._in_flight, conn._restored, conn._load_steps, conn._steps = {}, {}, [], 0
    tier = SchedulerTier.__new__(SchedulerTier)
    tier.index = StorageIndex(str(tmp_path), [KEY], 1 << 30, 3600, 1)
    tier.filling, tier._filling, tier._fetch_loads, tier._fetch_blocks, tier._partial = {}, set(), {}, {}, {}
    tier.hit_blocks = tier.missed_lookups = 0
    conn.storage = tier
    return conn


def _request(name: str, hashes: list[bytes]):
    from types import SimpleNamespace

    return SimpleNamespace(request_id=name, block_hashes=hashes, num_tokens=4 * len(hashes) + 1)


def test_a_host_miss_continues_on_storage_and_a_block_being_read_makes_others_wait(tmp_path):
    from types import SimpleNamespace

    conn = _bare_scheduler(tmp_path, slots=8)
    hashes = [h(i) for i in range(5)]
    for b in hashes[:2]:
        conn.index.allocate(b, has_activations=True)
    for b in hashes[2:4]:
        conn.storage.index.add(b, True)
    first = _request("a", hashes)
    assert conn.get_num_new_matched_tokens(first, 0) == (16, True)  # 2 from the host, 2 from storage
    conn.update_state_after_alloc(first, SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13, 14],)), 16)
    fetch = conn.reqs["a"].fetch
    assert [f.block_hash for f in fetch] == hashes[2:4] and all(f.slot >= 0 and f.with_act for f in fetch)
    assert conn.storage.hit_blocks == 2 and conn.storage.missed_lookups == 1
    # Another request with the same prefix waits until the read ends. The worker read one section
    # of each file into the slots: the host store drops them, and the second reads the files again.
    second = _request("b", hashes[:4] + [h(9)])
    assert conn.get_num_new_matched_tokens(second, 0) == (None, False)
    conn.update_connector_output(SimpleNamespace(finished_recving={"a"}, invalid_block_ids=set()))
    assert hashes[2] not in conn.index and hashes[1] in conn.index
    assert conn.get_num_new_matched_tokens(second, 0) == (16, True)
    assert conn._matched["b"][2] == [True, True]  # from storage


def test_storage_blocks_are_offered_only_as_far_as_free_host_slots_go(tmp_path):
    conn = _bare_scheduler(tmp_path, slots=3)
    hashes = [h(i) for i in range(6)]
    conn.index.allocate(hashes[0], has_activations=True)
    for b in hashes[1:]:
        conn.storage.index.add(b, True)
    assert conn.get_num_new_matched_tokens(_request("a", hashes), 0)[0] == 4 * 3  # 1 host + 2 slots' worth


def test_a_file_from_a_device_that_lays_blocks_out_otherwise_is_foreign(tmp_path):
    """Same identity folder, same sizes, but K/V in another element order (another attention
    backend): the host format is part of each file's digest."""
    pool = Pool(2)
    nhd = StorageIO(str(tmp_path), KEY, pool.segments, 1, host_format="[((8, 8), (8, 1), 'bf16')]")
    hnd = StorageIO(str(tmp_path), KEY, pool.segments, 1, host_format="[((8, 8), (1, 8), 'bf16')]")
    try:
        nhd.write(h(1), 0, True, True).result()
        assert hnd.read(h(1), 1, True, True).result() is False
        assert hnd.take_stats().rejected["foreign"] == 1
        nhd.write(h(2), 0, True, True).result()
        assert nhd.read(h(2), 1, True, True).result() is True
    finally:
        nhd.close()
        hnd.close()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_the_storage_tier_refuses_parallel_workers_at_start_up(tp, pp):
    """Each rank would start its restore when its own reads finish, out of step with the other
    ranks' joins: start-up stops, naming the keys, instead of hanging later."""
    from types import SimpleNamespace

    from vllm_partial_kv.config import ConfigError, parse_config
    from vllm_partial_kv.deployment import check_storage_parallelism

    config = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp))
    with pytest.raises(ConfigError, match="storage_dir: the storage tier runs with tensor_parallel_size"):
        check_storage_parallelism(config, parse_config({"storage_dir": "/tmp/x"}))
    check_storage_parallelism(config, parse_config({}))  # without the tier: any parallelism
    single = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))
    check_storage_parallelism(single, parse_config({"storage_dir": "/tmp/x"}))
