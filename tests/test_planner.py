"""Cost model and split choice, on synthetic profiles (no torch, no vLLM)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_partial_kv.planner import (
    ModelShape,
    Profile,
    RestoreRequest,
    forward_seconds,
    plan_split,
    restore_time,
)

MHA_7B = ModelShape(num_layers=32, hidden_size=4096, num_kv_heads=32, head_size=128, dtype_bytes=2, block_size=16)
GQA_8B = ModelShape(num_layers=32, hidden_size=4096, num_kv_heads=8, head_size=128, dtype_bytes=2, block_size=16)
POINTS = (256, 1024, 4096, 16384)


def kv_proj_flop(shape: ModelShape, tokens: int) -> float:
    return 4.0 * tokens * shape.hidden_size * shape.num_kv_heads * shape.head_size


def gpu_profile(shape: ModelShape, bw: float, flops_at, latency: float = 5e-6, busy: float = 1.0) -> Profile:
    return Profile(bw, tuple((t, kv_proj_flop(shape, t) / flops_at(t)) for t in POINTS), latency, busy)


def h100(shape: ModelShape) -> Profile:
    """54.5 GB/s pinned H2D; ~750 TFLOP/s from 4k tokens, slower for small GEMMs."""
    return gpu_profile(shape, 54.5e9, lambda t: 750e12 if t >= 4096 else 400e12 if t >= 1024 else 150e12)


def slow_gpu(shape: ModelShape, busy: float = 1.0) -> Profile:
    return gpu_profile(shape, 25e9, lambda t: 30e12, busy=busy)


def cost(shape: ModelShape, profile: Profile, requests, recompute_blocks: int, forward_s: float = 0.0) -> float:
    total = sum(q.num_blocks for q in requests)
    bs = shape.block_size
    return restore_time(shape, profile, recompute_blocks * bs, (total - recompute_blocks) * bs, forward_s)


def brute_force(shape, profile, requests, max_recompute_tokens=None, forward_s: float = 0.0) -> float:
    limit = sum(q.max_recompute_blocks for q in requests)
    if max_recompute_tokens is not None:
        limit = min(limit, max_recompute_tokens // shape.block_size)
    return min(cost(shape, profile, requests, r, forward_s) for r in range(limit + 1))


def naive_restore_time(
    shape: ModelShape, profile: Profile, rc_tokens: int, stream_tokens: int, forward_s: float = 0.0
) -> float:
    """The recurrence without the periodic shortcut, layer by layer."""
    t_x = profile.copy_seconds(rc_tokens * shape.act_bytes_per_token)
    t_kv = profile.copy_seconds(stream_tokens * shape.kv_bytes_per_token)
    t_c = profile.busy_factor * profile.recompute_seconds(rc_tokens)
    copy_end, rc, fw = 0.0, [0.0, 0.0], 0.0
    for _ in range(shape.num_layers):
        x_end = max(copy_end, rc[-2]) + t_x
        copy_end = x_end + t_kv
        rc.append(max(fw, x_end) + t_c)
        fw = max(rc[-1], copy_end) + forward_s
    return fw


# ------------------------------------------------------------------------------------ the model
def test_bytes_per_token():
    assert MHA_7B.act_bytes_per_token == 8192 and MHA_7B.kv_bytes_per_token == 16384
    assert GQA_8B.kv_bytes_per_token == 4096 < GQA_8B.act_bytes_per_token


def test_activation_shards_split_the_rows_bytes():
    """Under TP=2 a rank copies half of each activation row and receives the other half."""
    tp2 = dataclasses.replace(MHA_7B, num_kv_heads=16, act_shards=2)
    assert tp2.act_bytes_per_token == 4096 == tp2.kv_bytes_per_token // 2
    assert tp2.gather_bytes_per_token == 4096 and MHA_7B.gather_bytes_per_token == 0
    with pytest.raises(ValueError):
        dataclasses.replace(MHA_7B, act_shards=3)  # 4096 columns do not split in three


def test_joining_shards_costs_the_recompute_its_gather():
    """t_c = busy * recompute + gather per layer: a slow gather leaves little worth recomputing
    (only what hides behind the streamed copies); a free one (or none measured) leaves the split
    as with whole rows."""
    tp2 = dataclasses.replace(MHA_7B, num_kv_heads=16, act_shards=2)
    fast = h100(tp2)
    reqs = [RestoreRequest(1024, 1024)]
    (r_free,) = plan_split(tp2, fast, reqs)
    assert r_free > 0.8 * 1024
    shape = ModelShape(3, 2, 1, 1, 1, 1, act_shards=2)  # 1 byte of X per token and rank, 1 gathered
    by_hand = Profile(1.0, ((2, 10.0),), gather_bytes_per_s=0.5, gather_latency_s=1.0)
    assert restore_time(shape, by_hand, 2, 0) == pytest.approx(2 + 3 * (10 + 1 + 2 / 0.5))
    nvlink = dataclasses.replace(fast, gather_bytes_per_s=400e9, gather_latency_s=20e-6)
    (r_nvlink,) = plan_split(tp2, nvlink, reqs)
    assert 0 < r_nvlink <= r_free
    slow = dataclasses.replace(fast, gather_bytes_per_s=1e9)
    (r_slow,) = plan_split(tp2, slow, reqs)
    assert r_slow < 0.1 * 1024 and cost(tp2, slow, reqs, r_slow) < cost(tp2, slow, reqs, 512)


def test_recompute_curve_interpolates_and_extrapolates():
    p = Profile(1e9, ((200, 3.0), (100, 1.0)))
    assert p.recompute_points == ((100, 1.0), (200, 3.0))
    assert p.recompute_seconds(0) == 0.0
    assert p.recompute_seconds(50) == pytest.approx(0.5)
    assert p.recompute_seconds(150) == pytest.approx(2.0)
    assert p.recompute_seconds(400) == pytest.approx(6.0)  # 3 s / 200 tokens past the last point
    assert Profile(1e9, ((100, 2.0), (200, 1.0))).recompute_seconds(200) == 2.0  # noise made monotone
    assert Profile(1e9).recompute_seconds(1) == math.inf


def test_restore_time_by_hand():
    """1 byte/token of X, 2 of K/V, 1 B/s: t_x = 2, t_kv = 2, t_c = 10 per layer, 3 layers.
    x0 2, kv0 4, c0 12 | x1 6, kv1 8, c1 22 | x2 waits for c0 (slot 0): 14, kv2 16, c2 32."""
    shape = ModelShape(3, 1, 1, 1, 1, 1)
    profile = Profile(1.0, ((2, 10.0),))
    assert restore_time(shape, profile, 2, 1) == pytest.approx(32.0)
    assert restore_time(shape, profile, 0, 1) == pytest.approx(6.0)
    assert restore_time(shape, profile, 0, 0) == 0.0


def test_restore_time_with_the_steps_own_forward_by_hand():
    """As above with f = 5 per layer after each layer's restore, sharing the compute units:
    c0 12, f0 17 | x1 6, c1 waits for f0: 27, f1 32 | x2 14, c2 42, f2 47."""
    shape = ModelShape(3, 1, 1, 1, 1, 1)
    profile = Profile(1.0, ((2, 10.0),))
    assert restore_time(shape, profile, 2, 1, forward_s=5.0) == pytest.approx(47.0)
    # Streamed only: the copies (6 per layer) set the pace, the forward trails by one layer.
    assert restore_time(shape, profile, 0, 3, forward_s=5.0) == pytest.approx(23.0)
    assert restore_time(shape, profile, 0, 0, forward_s=5.0) == pytest.approx(15.0)


def test_forward_seconds_scale_the_measured_projection_rate():
    profile = Profile(1.0, ((100, 1.0),))
    assert forward_seconds(dataclasses.replace(MHA_7B, forward_ratio=6.0), profile, 50) == pytest.approx(3.0)
    assert forward_seconds(MHA_7B, profile, 50) == 0.0  # ratio unknown
    assert forward_seconds(dataclasses.replace(MHA_7B, forward_ratio=6.0), profile, 0) == 0.0
    with pytest.raises(ValueError, match="forward_ratio"):
        dataclasses.replace(MHA_7B, forward_ratio=-1.0)


def test_streaming_only_is_layers_times_copy():
    p = h100(MHA_7B)
    expected = MHA_7B.num_layers * (p.copy_latency_s + 16384 * MHA_7B.kv_bytes_per_token / p.h2d_bytes_per_s)
    assert restore_time(MHA_7B, p, 0, 16384) == pytest.approx(expected)


@settings(max_examples=300, deadline=None)
@given(
    layers=st.integers(1, 96),
    kv_heads=st.integers(1, 64),
    bw=st.floats(1e8, 1e12),
    latency=st.sampled_from([0.0, 5e-6, 1e-3]),
    ns_per_token=st.floats(1e-3, 1e5),
    busy=st.floats(1.0, 4.0),
    rc=st.integers(0, 50_000),
    stream=st.integers(0, 50_000),
    forward_s=st.sampled_from([0.0, 1e-6, 1e-4, 1e-2]),
)
def test_restore_time_matches_layer_by_layer(layers, kv_heads, bw, latency, ns_per_token, busy, rc, stream, forward_s):
    shape = ModelShape(layers, 4096, kv_heads, 128, 2, 16)
    profile = Profile(bw, ((1024, 1024 * ns_per_token * 1e-9),), latency, busy)
    expected = naive_restore_time(shape, profile, rc, stream, forward_s)
    assert restore_time(shape, profile, rc, stream, forward_s) == pytest.approx(expected, rel=1e-9)


# -------------------------------------------------------------------------------- auto split
def test_mha_on_h100_recomputes_nearly_everything():
    reqs = [RestoreRequest(1024, 1024)]
    (r,) = plan_split(MHA_7B, h100(MHA_7B), reqs)
    assert r > 0.9 * 1024
    assert cost(MHA_7B, h100(MHA_7B), reqs, 0) / cost(MHA_7B, h100(MHA_7B), reqs, r) > 1.8  # ~ 2x fewer bytes


@pytest.mark.parametrize("profile_of", [h100, slow_gpu])
def test_gqa_never_recomputes(profile_of):
    reqs = [RestoreRequest(1024, 1024), RestoreRequest(3, 2), RestoreRequest(500, 100)]
    assert plan_split(GQA_8B, profile_of(GQA_8B), reqs) == [0, 0, 0]
    free = Profile(54.5e9, ((16, 1e-30),))  # even free recompute loses: X is bigger than K+V
    assert plan_split(GQA_8B, free, reqs) == [0, 0, 0]


@pytest.mark.parametrize("profile_of", [h100, slow_gpu])
def test_an_fp8_cache_makes_mha_stream_only(profile_of):
    """An fp8 cache halves K/V bytes: a multi-head model's activations are then as large as its
    K/V, so recomputing them cannot move fewer bytes (the profile is the bf16 model's)."""
    fp8 = dataclasses.replace(MHA_7B, kv_dtype_bytes=1)
    assert fp8.kv_bytes_per_token == fp8.act_bytes_per_token == 8192
    reqs = [RestoreRequest(1024, 1024), RestoreRequest(5, 5)]
    assert plan_split(fp8, profile_of(MHA_7B), reqs) == [0, 0]
    assert plan_split(fp8, profile_of(MHA_7B), reqs, ratio=0.5) == [512, 3]  # a fixed ratio is honoured


def test_without_overlap_the_costs_add_up():
    """The CPU runtime copies, then recomputes, layer after layer: there recompute pays only if it
    costs less than the copy it saves, which the overlapped pipeline's model would not see."""
    overlapped = slow_gpu(MHA_7B)
    serial = dataclasses.replace(overlapped, overlap=False)
    reqs = [RestoreRequest(256, 256)]
    (r,) = plan_split(MHA_7B, overlapped, reqs)
    assert r > 0
    t_x = serial.copy_seconds(r * 16 * MHA_7B.act_bytes_per_token)
    t_kv = serial.copy_seconds((256 - r) * 16 * MHA_7B.kv_bytes_per_token)
    t_c = serial.recompute_seconds(r * 16)
    assert restore_time(MHA_7B, serial, r * 16, (256 - r) * 16) == pytest.approx(32 * (t_x + t_kv + t_c))
    assert plan_split(MHA_7B, serial, reqs) == [0]  # 2.2 ns/token of recompute saves 0.3 ns of copy
    fast = dataclasses.replace(serial, recompute_points=((4096, 4096 * 1e-11),))  # 0.01 ns/token
    assert plan_split(MHA_7B, fast, reqs) == [256]


def test_slow_gpu_split_matches_closed_form():
    """x* = k / (c + k - a) from PAPER.md, per token per layer."""
    profile = slow_gpu(MHA_7B)
    a = MHA_7B.act_bytes_per_token / profile.h2d_bytes_per_s
    k = MHA_7B.kv_bytes_per_token / profile.h2d_bytes_per_s
    c = kv_proj_flop(MHA_7B, 1) / 30e12
    (r,) = plan_split(MHA_7B, profile, [RestoreRequest(1024, 1024)])
    assert 0.2 < k / (c + k - a) < 0.3
    assert r / 1024 == pytest.approx(k / (c + k - a), abs=0.02)


@pytest.mark.parametrize("blocks", [1, 7, 64, 81, 1000])
@pytest.mark.parametrize("layers", [1, 2, 32])
@pytest.mark.parametrize("profile_of", [h100, slow_gpu])
def test_split_is_the_exact_optimum_on_smooth_profiles(profile_of, layers, blocks):
    """Few layers put the optimum away from the copy/recompute balance point: the search must find it."""
    shape = dataclasses.replace(MHA_7B, num_layers=layers)
    reqs = [RestoreRequest(blocks, blocks)]
    (r,) = plan_split(shape, profile_of(shape), reqs)
    assert cost(shape, profile_of(shape), reqs, r) == pytest.approx(brute_force(shape, profile_of(shape), reqs))


def test_a_heavy_forward_in_the_same_step_recomputes_less():
    """The step's own forward waits per layer and competes with the recompute for the GPU."""
    reqs = [RestoreRequest(1024, 1024)]
    shape = dataclasses.replace(MHA_7B, forward_ratio=6.0)
    profile = h100(shape)
    alone = plan_split(shape, profile, reqs)[0]
    assert plan_split(shape, profile, reqs, forward_s=forward_seconds(shape, profile, 16)) == [alone]
    prefill = forward_seconds(shape, profile, 8192)  # an 8k-token prefill shares the step
    (r,) = plan_split(shape, profile, reqs, forward_s=prefill)
    assert r < 0.9 * alone
    assert cost(shape, profile, reqs, r, prefill) == pytest.approx(brute_force(shape, profile, reqs, forward_s=prefill))


def test_busy_gpu_recomputes_less():
    reqs = [RestoreRequest(1024, 1024)]
    idle = plan_split(MHA_7B, slow_gpu(MHA_7B), reqs)[0]
    busy = plan_split(MHA_7B, slow_gpu(MHA_7B, busy=3.0), reqs)[0]
    assert 0 < busy < idle


def test_auto_split_respects_stored_activations_and_order():
    reqs = [RestoreRequest(100, 10), RestoreRequest(100, 0), RestoreRequest(100, 100)]
    assert plan_split(MHA_7B, h100(MHA_7B), reqs) == [10, 0, 100]


def test_budget_caps_total_recompute_tokens():
    reqs = [RestoreRequest(100, 100), RestoreRequest(100, 100)]
    p = h100(MHA_7B)
    assert plan_split(MHA_7B, p, reqs, max_recompute_tokens=160 * 16) == [100, 60]
    assert plan_split(MHA_7B, p, reqs, max_recompute_tokens=10 * 16 - 1) == [9, 0]  # whole blocks only
    assert plan_split(MHA_7B, p, reqs, max_recompute_tokens=15) == [0, 0]
    with pytest.raises(ValueError):
        plan_split(MHA_7B, p, reqs, max_recompute_tokens=-1)


def test_edge_cases():
    p = h100(MHA_7B)
    assert plan_split(MHA_7B, p, []) == []
    assert plan_split(MHA_7B, p, [], ratio=0.5) == []
    assert plan_split(MHA_7B, p, [RestoreRequest(0, 0)]) == [0]  # less than one block to restore
    assert plan_split(MHA_7B, p, [RestoreRequest(1, 1)]) == [1]
    assert plan_split(MHA_7B, p, [RestoreRequest(5, 0), RestoreRequest(0, 0)]) == [0, 0]
    with pytest.raises(ValueError):
        RestoreRequest(2, 3)
    with pytest.raises(ValueError):
        RestoreRequest(-1, 0)
    with pytest.raises(ValueError):
        plan_split(MHA_7B, None, [RestoreRequest(2, 2)])


def test_no_bandwidth_recomputes_all_it_can():
    reqs = [RestoreRequest(10, 4), RestoreRequest(10, 10)]
    no_copy = Profile(0.0, ((256, 1e-4),))
    assert plan_split(MHA_7B, no_copy, reqs) == [4, 10]
    assert plan_split(GQA_8B, no_copy, reqs) == [4, 10]
    assert plan_split(MHA_7B, no_copy, reqs, max_recompute_tokens=5 * 16) == [4, 1]
    assert plan_split(MHA_7B, Profile(0.0), reqs) == [0, 0]  # neither works: nothing to gain
    assert Profile.from_dict({"recompute_points": [[256, 1e-4]]}).h2d_bytes_per_s == 0.0


def test_recompute_throughput_extremes():
    reqs = [RestoreRequest(64, 64)]
    assert plan_split(MHA_7B, Profile(54.5e9), reqs) == [0]  # no points: cannot recompute
    assert plan_split(MHA_7B, Profile(54.5e9, ((256, math.inf),)), reqs) == [0]
    unusable = Profile(54.5e9, ((256, math.inf), (4096, math.inf)))
    assert unusable.recompute_seconds(2048) == math.inf and plan_split(MHA_7B, unusable, reqs) == [0]
    assert plan_split(MHA_7B, Profile(54.5e9, ((256, 0.0),)), reqs) == [64]
    assert plan_split(MHA_7B, Profile(54.5e9, ((256, 1e3),)), reqs) == [0]  # absurdly slow


def test_planner_is_fast():
    reqs = [RestoreRequest(8192, 8192)] * 64
    for profile in (h100(MHA_7B), slow_gpu(MHA_7B)):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            plan_split(MHA_7B, profile, reqs)
            times.append(time.perf_counter() - start)
        assert statistics.median(times) < 20e-3


@st.composite
def scenarios(draw):
    shape = ModelShape(
        num_layers=draw(st.integers(1, 80)),
        hidden_size=64 * draw(st.integers(1, 128)),
        num_kv_heads=draw(st.integers(1, 64)),
        head_size=draw(st.sampled_from([64, 128, 256])),
        dtype_bytes=draw(st.sampled_from([1, 2, 4])),
        block_size=draw(st.sampled_from([1, 16, 32])),
    )
    tokens = draw(st.lists(st.integers(1, 40_000), min_size=1, max_size=5, unique=True))
    profile = Profile(
        h2d_bytes_per_s=draw(st.floats(1e8, 1e12)),
        recompute_points=tuple((t, t * draw(st.floats(1e-11, 1e-5))) for t in tokens),
        copy_latency_s=draw(st.sampled_from([0.0, 2e-6, 1e-4])),
        busy_factor=draw(st.floats(1.0, 4.0)),
        overlap=draw(st.sampled_from([True, True, False])),
    )
    sizes = draw(st.lists(st.integers(0, 200), max_size=6))
    requests = [RestoreRequest(n, draw(st.integers(0, n))) for n in sizes]
    budget = draw(st.none() | st.integers(0, 4000))
    forward_s = draw(st.sampled_from([0.0, 0.0, 1e-5, 1e-3]))
    return shape, profile, requests, budget, forward_s


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_auto_split_near_brute_force_and_never_slower_than_streaming(scenario):
    shape, profile, requests, budget, forward_s = scenario
    split = plan_split(shape, profile, requests, max_recompute_tokens=budget, forward_s=forward_s)
    assert len(split) == len(requests)
    assert all(0 <= r <= q.max_recompute_blocks for r, q in zip(split, requests))
    if budget is not None:
        assert sum(split) * shape.block_size <= budget
    chosen = cost(shape, profile, requests, sum(split), forward_s)
    assert chosen <= cost(shape, profile, requests, 0, forward_s)
    assert chosen <= 1.05 * brute_force(shape, profile, requests, budget, forward_s)


# ------------------------------------------------------------------------------- fixed ratio
def test_fixed_ratio_is_honoured_and_clipped():
    reqs = [RestoreRequest(10, 10), RestoreRequest(3, 3), RestoreRequest(10, 2), RestoreRequest(0, 0)]
    assert plan_split(MHA_7B, None, reqs, ratio=0.5) == [5, 2, 2, 0]  # 1.5 rounds up
    assert plan_split(MHA_7B, None, reqs, ratio=0.0) == [0, 0, 0, 0]
    assert plan_split(MHA_7B, None, reqs, ratio=1.0) == [10, 3, 2, 0]
    assert plan_split(MHA_7B, None, reqs, ratio=1.0, max_recompute_tokens=12 * 16) == [10, 2, 0, 0]
    assert plan_split(GQA_8B, h100(GQA_8B), reqs, ratio=0.5) == [5, 2, 2, 0]  # forced even if it loses
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            plan_split(MHA_7B, None, reqs, ratio=bad)


def test_profile_round_trips_through_json():
    p = Profile(54.5e9, ((256, 1e-5), (4096, 1e-4)), 4e-6, 1.5, "NVIDIA H100", gather_bytes_per_s=3e11,
                gather_latency_s=2e-5)
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError):
        Profile(1e9, gather_bytes_per_s=math.inf)
    with pytest.raises(ValueError):
        Profile(-1.0)
    with pytest.raises(ValueError):
        Profile(1e9, ((0, 1.0),))
    with pytest.raises(ValueError):
        Profile(1e9, ((16, math.nan),))


def test_blocks_from_a_slower_link_are_recomputed_more():
    """The storage tier: the slower the link a restore's blocks come over, the more of it the
    split recomputes; a link faster than the host's changes nothing."""
    profile = slow_gpu(MHA_7B)
    requests = [RestoreRequest(256, 256)]
    host = plan_split(MHA_7B, profile, requests)[0]
    splits = [plan_split(MHA_7B, profile.through_link(bw, 50e-6), requests)[0] for bw in (12e9, 6e9, 3e9, 1e9)]
    assert host < splits[0] and splits == sorted(splits) and splits[0] < splits[-1]
    assert profile.through_link(100e9) == profile
    nvme = profile.through_link(3e9, 50e-6)
    assert (nvme.h2d_bytes_per_s, nvme.copy_latency_s) == (3e9, 50e-6)
    # On the slow link, the chosen split is the best the model offers, and beats streaming everything.
    best = cost(MHA_7B, nvme, requests, splits[2])
    assert best == pytest.approx(brute_force(MHA_7B, nvme, requests)) and best < cost(MHA_7B, nvme, requests, 0)
    with pytest.raises(ValueError):
        profile.through_link(0)
