"""The storage tier in real (in-process, CPU) vLLM engines: one engine writes a directory, a fresh
one restores from it, with the same tokens as an engine without the plugin, also when files are
damaged, foreign or the directory turns read-only."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from vllm_partial_kv import storage

PREFIX, MORE = 256, 64  # tokens: 8 blocks of 32 stored by the first engine, then 2 more turns' worth


def _prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1000, (n,), generator=g).tolist()


def _engine(model, storage_dir: str | None, **extra):
    from conftest import drop_parallel_groups, make_llm
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    gc.collect()
    ensure_kv_transfer_shutdown()
    drop_parallel_groups()
    if storage_dir is None:
        return make_llm(model)
    kv = KVTransferConfig(
        kv_connector="PartialRecomputeConnector", kv_role="kv_both", kv_load_failure_policy="recompute",
        kv_connector_extra_config={"cpu_bytes": 32 << 20, "recompute_ratio": 0.5, "storage_dir": storage_dir,
                                   "storage_rescan_s": 0.2, **extra},
    )
    return make_llm(model, kv_transfer_config=kv)


def _generate(llm, prompts: list[list[int]]) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=8),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _halves(llm):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler, get_kv_transfer_group().worker


def _flush(llm) -> dict:
    """Wait for the writes in flight; the worker's counters since start-up."""
    sched, worker = _halves(llm)
    worker.storage.io.wait_slots(range(worker.runtime.pool.num_slots))
    worker.get_kv_connector_stats()
    sched.storage.index.rescan()
    return worker.totals.data


def _wait_scanned(llm) -> None:
    sched, _ = _halves(llm)
    deadline = time.time() + 30
    while sched.storage.index.scans == 0 and time.time() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def shared_hash_seed():
    """vLLM 0.26 seeds block hashes randomly per engine unless PYTHONHASHSEED is set (README)."""
    from vllm_partial_kv import compat

    with pytest.MonkeyPatch.context() as mp:
        if not compat.block_hashes_reproducible("sha256"):
            mp.setenv("PYTHONHASHSEED", "0")
        yield


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The reference tokens (no plugin) of first turns and of returning turns, and a directory
    the first engine filled with the first turns' blocks (copied per test)."""
    model = tiny_model("llama2")
    first = [_prompt(i, PREFIX + 5) for i in range(3)]
    back = [p + _prompt(100 + i, MORE) for i, p in enumerate(first)]
    plain = _engine(model, None)
    want_first, want_back = _generate(plain, first), _generate(plain, back)
    del plain
    root = tmp_path_factory.mktemp("storage") / "dir"
    writer = _engine(model, str(root))
    assert _generate(writer, first) == want_first
    written = _flush(writer)
    del writer
    assert written["storage_blocks_written"] >= 3 * PREFIX // 32
    return model, root, back, want_back


def _restore_from(model, root: Path, back, **extra):
    llm = _engine(model, str(root), **extra)
    _wait_scanned(llm)
    got = _generate(llm, back)
    totals = _flush(llm)
    sched, _ = _halves(llm)
    return llm, got, totals, sched


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".a", ".k"))


def _sections(root: Path) -> tuple[int, int, int]:
    """(header with hash, K/V section, activation section) bytes, the same in every block file."""
    sizes = set()
    for path in _files(root):
        head = path.read_bytes()[: storage._HEADER.size]
        _, _, flags, hash_len, _, kv, act, _, _ = storage._HEADER.unpack(head)
        assert flags == storage.FLAG_KV | storage.FLAG_ACT and path.suffix == ".a"
        sizes.add((storage._HEADER.size + hash_len, kv, act))
    assert len(sizes) == 1
    return sizes.pop()


@pytest.mark.parametrize("ratio", [0.5, 0.01])  # 0.01: no block recomputed, activations kept
def test_a_fresh_engine_restores_from_the_directory_reading_one_section_per_block(runs, tmp_path, ratio):
    """The split is chosen before the reads: a recomputed block's file gives only its
    activations, a streamed block's only its K/V; the tokens are those of an engine without the
    plugin."""
    model, root, back, want = runs
    d = _copy(root, tmp_path / "d")
    head, kv, act = _sections(d)
    llm, got, totals, sched = _restore_from(model, d, back, recompute_ratio=ratio)
    assert got == want
    blocks, recomputed = totals["storage_blocks_read"], totals["tokens_recomputed"] // 32
    assert blocks >= 3 * (PREFIX // 32 - 1) and totals["tokens_loaded"] > 0
    assert totals["storage_rejected_files"] == 0 and totals["restore_failures"] == 0
    # The fresh engine's host store starts empty: every restored block came from a file.
    assert totals["tokens_loaded"] // 32 == blocks
    assert recomputed == math.floor(ratio * (PREFIX // 32) + 0.5) * 3  # 3 requests of 8 blocks: 12, 0
    assert totals["storage_bytes_read"] == recomputed * (head + act) + (blocks - recomputed) * (head + kv)
    assert totals["storage_bytes_read"] < blocks * (head + kv + act)
    del llm


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "foreign"])
def test_damaged_and_foreign_files_are_rejected_and_recomputed(runs, tmp_path, damage):
    model, root, back, want = runs
    d = _copy(root, tmp_path / "d")
    victims = _files(d)[::3]
    for path in victims:
        data = bytearray(path.read_bytes())
        if damage == "corrupt":  # K/V and activations of some layers
            data[len(data) // 4 : len(data) // 2] = os.urandom(len(data) // 2 - len(data) // 4)
        elif damage == "truncate":
            data = data[: len(data) - 100]
        else:  # the same block written by an instance of another model / layout, under this name
            key = path.parent.parent.name
            other = storage.identity_key({"another": "model"})
            tmp = storage.block_path(str(tmp_path / "other"), other, bytes.fromhex(path.stem), path.suffix == ".a")
            seg = memoryview(bytes(len(data) - storage._HEADER.size - len(bytes.fromhex(path.stem))))
            storage.write_block(tmp, other, bytes.fromhex(path.stem), storage.FLAG_KV | storage.FLAG_ACT, [seg], [],
                                False)
            data = bytearray(Path(tmp).read_bytes())
            assert key != other
        path.write_bytes(bytes(data))
    llm, got, totals, sched = _restore_from(model, d, back)
    assert got == want
    assert totals["storage_rejected_files"] >= 1 and totals["storage_blocks_read"] >= 1
    del llm


def test_a_directory_turned_read_only_mid_run_keeps_serving(runs, tmp_path):
    model, root, back, want = runs
    src = _copy(root, tmp_path / "d")
    ro = tmp_path / "ro"
    ro.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(src), str(ro)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot bind-mount here: {e}")
    try:
        llm = _engine(model, str(ro))
        _wait_scanned(llm)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        fresh = [_prompt(200 + i, PREFIX) for i in range(2)]
        got = _generate(llm, back + fresh)
        totals = _flush(llm)
        assert got[: len(back)] == want
        assert totals["storage_write_errors"] >= 1 and totals["storage_blocks_read"] >= 1
        del llm
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_full_filesystem_keeps_serving_from_host_memory(runs, tmp_path):
    model, root, back, want = runs
    small = tmp_path / "small"
    small.mkdir()
    room = 4 * _files(root)[0].stat().st_size // 4096 * 4096 + 4096  # room for about 4 block files
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(small)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e} (tests/test_storage.py simulates ENOSPC)")
    try:
        llm = _engine(model, str(small))
        got = _generate(llm, back)
        totals = _flush(llm)
        assert got == want
        assert totals["storage_write_errors"] >= 1 and totals["storage_blocks_written"] >= 1
        del llm
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_fp8_store_blocks_come_back_from_the_directory_byte_for_byte(runs, tmp_path, monkeypatch):
    """host_format fp8 through the tier: each section a fresh engine reads into a host slot holds
    exactly the writer's fp8 values and scales (activation rows' scales included: without them a
    recompute from storage scales every row wrongly)."""
    model, _, back, _ = runs
    first = [p[: PREFIX + 5] for p in back]
    root = tmp_path / "fp8"
    writer = _engine(model, str(root), host_format="fp8")
    _generate(writer, first)
    _flush(writer)
    sched, worker = _halves(writer)
    assert worker.runtime.pool.act_scale, "the fp8 store keeps activation scales"

    def section(segments) -> bytes:
        return b"".join(bytes(s) for s in segments)

    io = worker.storage.io
    written = {h: (section(io.segments(e.slot, True, False)), section(io.segments(e.slot, False, True)))
               for h, e in sched.index._entries.items() if e.has_activations}
    assert written
    del writer, sched, worker, io
    read = {}  # block hash -> (K/V, activations) as read into the slot; None: not read
    original = storage.read_block

    def recording(path, key, block_hash, flags, kv, act, sections):
        n = original(path, key, block_hash, flags, kv, act, sections)
        read[block_hash] = tuple(section(segs) if sections & bit else None
                                 for bit, segs in ((storage.FLAG_KV, kv), (storage.FLAG_ACT, act)))
        return n

    monkeypatch.setattr(storage, "read_block", recording)
    llm = _engine(model, str(root), host_format="fp8")
    _wait_scanned(llm)
    _generate(llm, back)
    totals = _flush(llm)
    assert totals["storage_blocks_read"] >= 3 and totals["storage_rejected_files"] == 0
    compared = [0, 0]
    for h, got in read.items():
        for i, (g, w) in enumerate(zip(got, written[h])):
            if g is not None:
                assert g == w
                compared[i] += 1
    assert min(compared) >= 3  # K/V of streamed blocks, activations of recomputed ones
    del llm
