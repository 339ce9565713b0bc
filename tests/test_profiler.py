"""Profiler on the CPU: measurement with the real kernel entry point, the disk cache, the summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch

from vllm_partial_kv import profiler
from vllm_partial_kv.planner import ModelShape, Profile, RestoreRequest, plan_split

try:
    from vllm_partial_kv.kernels import recompute_kv
except ImportError:  # the kernel package not there yet: a stand-in with the same signature
    def recompute_kv(x, w_k, w_v, key_cache, value_cache, slot_mapping, positions, cos_sin_cache, is_neox=True):
        _, block_size, heads, head = key_cache.shape
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
        key_cache[blocks, offsets] = (x @ w_k.T).view(-1, heads, head)
        value_cache[blocks, offsets] = (x @ w_v.T).view(-1, heads, head)

TINY = ModelShape(num_layers=2, hidden_size=256, num_kv_heads=4, head_size=64, dtype_bytes=4, block_size=16)
CPU = torch.device("cpu")


class Recording:
    """Wraps the kernel and checks every call gets the documented arguments."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __call__(self, x, w_k, w_v, key_cache, value_cache, slot_mapping, positions, cos_sin_cache, **kw):
        t = x.shape[0]
        assert x.shape == (t, TINY.hidden_size) and x.dtype == torch.float32
        assert key_cache.shape[1:] == (TINY.block_size, TINY.num_kv_heads, TINY.head_size)
        assert key_cache.shape[0] * TINY.block_size >= t
        assert slot_mapping.shape == positions.shape == (t,)
        assert cos_sin_cache.shape[1] == TINY.head_size and cos_sin_cache.shape[0] >= t
        self.tokens.append(t)
        recompute_kv(x, w_k, w_v, key_cache, value_cache, slot_mapping, positions, cos_sin_cache, **kw)


def test_measure_profile_on_cpu():
    fn = Recording()
    p = profiler.measure_profile(TINY, device="cpu", recompute_fn=fn, dtype=torch.float32,
                                 token_counts=(64, 256, 16, 64))
    assert [t for t, _ in p.recompute_points] == [16, 64, 256]
    assert set(fn.tokens) == {16, 64, 256}
    assert all(s > 0 for _, s in p.recompute_points)
    assert 0 < p.h2d_bytes_per_s < math.inf and p.copy_latency_s >= 0 and p.busy_factor == 1.0
    assert p.device and not p.overlap  # the CPU runtime copies, then recomputes
    assert len(plan_split(TINY, p, [RestoreRequest(8, 8)])) == 1


def test_measure_gather_fits_the_collective_it_is_given():
    """The shard join is timed like the copy (one block, then the largest call a restore makes)
    through the function given: here a stand-in for two ranks that doubles the columns."""
    shape = dataclasses.replace(TINY, act_shards=2)
    widths = []

    def gather(shard: torch.Tensor) -> torch.Tensor:
        widths.append(shard.shape[1])
        return torch.cat([shard, shard], dim=1)

    bw, latency = profiler.measure_gather(shape, gather, device="cpu", dtype=torch.float32, max_tokens=256)
    assert set(widths) == {TINY.hidden_size // 2} and len(widths) == 2 * (1 + 5)  # warm-up + repeats
    assert 0 < bw < math.inf and latency >= 0
    # Never more rows than a restore joins (what the join's buffers hold), one block at least.
    rows = []
    gather_rows = lambda shard: rows.append(shard.shape[0]) or gather(shard)  # noqa: E731
    profiler.measure_gather(shape, gather_rows, device="cpu", dtype=torch.float32, max_tokens=48)
    assert max(rows) == 48
    rows.clear()
    assert profiler.measure_gather(shape, gather_rows, device="cpu", dtype=torch.float32,
                                   max_tokens=TINY.block_size)[1] == 0.0
    assert set(rows) == {TINY.block_size}


def test_measure_profile_under_load():
    p = profiler.measure_profile(TINY, device="cpu", recompute_fn=recompute_kv, dtype=torch.float32,
                                 token_counts=(32, 128), with_load=True)
    assert 1.0 <= p.busy_factor < math.inf


def test_cpu_token_counts_are_capped_but_whole_blocks():
    big = ModelShape(80, 8192, 64, 128, 2, 16)
    counts = profiler._cpu_token_counts(big, profiler.DEFAULT_TOKEN_COUNTS)
    flop_per_token = 4 * 8192 * 64 * 128
    assert counts == sorted(set(counts)) and min(counts) >= big.block_size
    assert max(counts) <= max(big.block_size, profiler._CPU_MAX_FLOP / flop_per_token)
    assert profiler._cpu_token_counts(TINY, (16, 64)) == [16, 64]  # small enough: unchanged


# ------------------------------------------------------------------------------------- the cache
class FakeMeasure:
    """Stands in for measure_profile so the cache tests are fast and can count measurements."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, shape, **kwargs) -> Profile:
        self.calls += 1
        return Profile(1e9 * self.calls, ((16, 1e-5 * shape.num_layers),), 1e-6, device="fake")


@pytest.fixture
def fake(monkeypatch) -> FakeMeasure:
    fake = FakeMeasure()
    monkeypatch.setattr(profiler, "measure_profile", fake)
    return fake


def load(cache_dir, shape=TINY, dtype=torch.float32, **kw) -> Profile:
    return profiler.load_or_measure(shape, device=CPU, recompute_fn=recompute_kv, dtype=dtype,
                                    cache_dir=cache_dir, **kw)


def test_cache_round_trip(tmp_path, fake, caplog):
    caplog.set_level(logging.INFO, logger=profiler.__name__)
    first = load(tmp_path)
    assert fake.calls == 1 and "measured" in caplog.text
    (path,) = tmp_path.glob("*.json")
    caplog.clear()
    assert load(tmp_path) == first
    assert fake.calls == 1 and "loaded" in caplog.text
    assert load(tmp_path, refresh=True) != first and fake.calls == 2
    assert load(tmp_path).h2d_bytes_per_s == 2e9  # the refreshed one was saved


def test_key_changes_with_shape_dtype_backend_and_version(tmp_path, fake, monkeypatch):
    load(tmp_path)
    load(tmp_path, shape=dataclasses.replace(TINY, kv_dtype_bytes=1))  # an fp8 cache copies less
    load(tmp_path, dtype=torch.bfloat16)
    load(tmp_path, with_load=True)  # the busy-GPU profile is a measurement of its own
    load(tmp_path, kernel="torch")  # another recompute backend
    assert fake.calls == 5 and len(list(tmp_path.glob("*.json"))) == 5
    load(tmp_path)
    load(tmp_path, with_load=True)
    # What the model adds to the measurement (the server's layer count and forward work, which
    # `vllm-partial-kv profile` also knows) is no reason to measure again.
    load(tmp_path, shape=dataclasses.replace(TINY, num_layers=40, forward_ratio=5.0))
    assert fake.calls == 5
    monkeypatch.setattr(profiler, "__version__", "99.0")  # a new plugin version re-measures
    load(tmp_path)
    assert fake.calls == 6


def test_corrupt_cache_is_measured_again(tmp_path, fake, caplog):
    load(tmp_path)
    (path,) = tmp_path.glob("*.json")
    key = json.loads(path.read_text())["key"]
    bad_profile = json.dumps({"key": key, "profile": {"h2d_bytes_per_s": -5}})
    for garbage in ("{not json", "[]", bad_profile, json.dumps({"key": key, "profile": []})):
        path.write_text(garbage)
        with caplog.at_level(logging.WARNING, logger=profiler.__name__):
            load(tmp_path)
        assert "re-measuring" in caplog.text
        caplog.clear()
        assert Profile.from_dict(json.loads(path.read_text())["profile"])  # repaired on disk
    assert fake.calls == 5


def test_default_cache_dir_from_environment(tmp_path, fake, monkeypatch):
    monkeypatch.setenv(profiler.CACHE_DIR_ENV, str(tmp_path / "env"))
    load(None)
    assert len(list((tmp_path / "env").glob("*.json"))) == 1


def test_unwritable_cache_still_returns_a_profile(tmp_path, fake, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger=profiler.__name__):
        assert load(blocker / "sub").device == "fake"
    assert "cannot save" in caplog.text


# ----------------------------------------------------------------------------------- the summary
def test_format_profile():
    shape = ModelShape(32, 4096, 32, 128, 2, 16)
    fast = Profile(54.5e9, ((256, 2e-6), (4096, 2e-5)), 5e-6, device="NVIDIA H100")
    text = profiler.format_profile(fast, shape)
    assert "NVIDIA H100" in text and "54.5 GB/s" in text and "4096 tokens" in text
    assert "16384-token restore" in text and "(100%)" in text
    assert "restore" not in profiler.format_profile(fast)
    assert "recompute disabled" in profiler.format_profile(Profile(1e9), shape)
