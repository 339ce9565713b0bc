"""The CUDA restore pipeline's stream ordering, checked without a GPU.

CUDA streams and events are replaced by a vector-clock model of their semantics (work on a stream
runs in issue order; `wait_event` orders later work after the event's record; `wait_stream` after
everything issued so far on the other stream). The runtime's real `_load_pipelined`, `wait_layer`
and `finish_step` run against it, with copies and recomputes logged as operations, and every
read-after-write and write-after-read the restore relies on is checked as a happens-before
relation. The same code runs on the GPU in `test_restore.py`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging

import pytest
import torch

from vllm_partial_kv.restore import LoadSpec, RestoreRuntime
from vllm_partial_kv.store import HostPool

LAYERS, BLOCKS, BS, HEADS, HEAD, HIDDEN, CAPTURE = 4, 16, 4, 2, 8, 32, 3

Clock = dict[int, int]


def _merge(into: Clock, other: Clock) -> None:
    for k, v in other.items():
        into[k] = max(into.get(k, 0), v)


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.clock: Clock = {}

    def query(self) -> bool:
        return False  # the host never sees work finish: every wait must come from ordering

    def elapsed_time(self, end: FakeEvent) -> float:
        return 0.0


class FakeStream:
    _ids = itertools.count()

    def __init__(self, device=None) -> None:
        self.id = next(self._ids)
        self.clock: Clock = {}

    def tick(self) -> Clock:
        self.clock[self.id] = self.clock.get(self.id, 0) + 1
        return dict(self.clock)

    def record_event(self, event: FakeEvent) -> None:
        event.clock = dict(self.clock)

    def wait_event(self, event: FakeEvent) -> None:
        _merge(self.clock, event.clock)

    def wait_stream(self, other: FakeStream) -> None:
        _merge(self.clock, other.clock)


class Timeline:
    """The fake CUDA runtime: a main stream, the current stream, and the operations issued."""

    def __init__(self) -> None:
        self.main = self.current = FakeStream()
        self.ops: list[tuple[tuple, Clock]] = []

    def op(self, *label) -> None:
        self.ops.append((label, self.current.tick()))

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        previous, self.current = self.current, s
        try:
            yield
        finally:
            self.current = previous

    def find(self, *label) -> list[Clock]:
        found = [clock for lab, clock in self.ops if lab == label]
        assert found, f"no operation {label}"
        return found

    def before(self, a: tuple, b: tuple, step: int = -1) -> bool:
        """Whether the `step`-th operation labelled a happens before that labelled b."""
        ca, cb = self.find(*a)[step], self.find(*b)[step]
        return all(cb.get(k, 0) >= v for k, v in ca.items())


def _fake_cuda(monkeypatch) -> Timeline:
    tl = Timeline()
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: tl.current)
    monkeypatch.setattr(torch.cuda, "stream", tl.stream)
    return tl


@pytest.fixture
def rig(monkeypatch):
    tl = _fake_cuda(monkeypatch)

    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    kv_caches = {n: torch.zeros(BLOCKS, HEADS, BS, 2 * HEAD) for n in names}
    acts = {n: torch.zeros(CAPTURE * BS + 1, HIDDEN) for n in names}
    pool = HostPool(8, {n: [t] for n, t in kv_caches.items()}, (BS, HIDDEN), torch.float32, pin=False)
    capture_map = torch.full((BLOCKS,), -1, dtype=torch.int32)
    rt = RestoreRuntime(kv_caches, BLOCKS, BS, pool, acts, dict.fromkeys(names), 8 * BS,
                        capture_map=capture_map)
    rt.cuda = True  # from here on the CUDA path runs against the fake streams
    rt._init_streams()
    rt.staging = [rt.staging[0], rt.staging[0].clone()]
    act_src = {id(t): n for n, t in pool.act.items()}

    def copy(dst, dst_idx, src, src_idx):
        for i, staging in enumerate(rt.staging):
            if dst is staging:
                return tl.op("act", act_src[id(src)], i)
        for name in names:
            if dst is rt.gpu_views[name][0]:
                return tl.op("kv", name)
            if dst is pool.kv[name][0] or dst is pool.act[name]:
                return tl.op("store", name)
        raise AssertionError("copy to an unknown tensor")

    def recompute(name, x, n):
        (slot,) = [i for i, s in enumerate(rt.staging) if s.data_ptr() == x.data_ptr()]
        tl.op("rc", name, slot)

    rt.copy = copy
    rt._recompute = recompute
    rt._write_index = lambda slot_map, positions: tl.op("index")
    return tl, rt, names


def _forward(tl: Timeline, rt: RestoreRuntime, names: list[str], skip: str | None = None) -> None:
    """What vLLM does in a step: attention of each layer behind `wait_for_layer_load`."""
    for name in names:
        if name != skip:
            rt.wait_layer(name)
        tl.op("read", name)
    rt.finish_step()


def _step(
    tl, rt, names, recompute_blocks: int, wait: str = "layers", skip=None,
    slots=(0, 1, 2), new_blocks=(5, 6, 7), store=(9, 3), capture=(9, 0),
) -> None:
    """One step as vLLM drives it: fence and capture map (handle_preemptions), writes into the
    new blocks and the capture op's into the capture block, the restore into its leading new
    blocks, the forward, the store of a block that filled up (from that capture block)."""
    rt.fence_blocks(list(new_blocks))
    rt.set_capture_map([capture[0]], [capture[1]])
    for block in new_blocks:
        tl.op("write", block)
    tl.op("capture", capture[1])
    rt.load([LoadSpec(list(slots), list(new_blocks[:3]), 0, recompute_blocks)], wait)
    _forward(tl, rt, names, skip)
    rt.store([store[0]], [store[1]], [capture[1]])


def test_each_layer_is_read_after_its_own_restore_only(rig):
    tl, rt, names = rig
    _step(tl, rt, names, recompute_blocks=2)
    for i, name in enumerate(names):
        slot = i % 2
        assert tl.before(("index",), ("rc", name, slot))
        assert tl.before(("act", name, slot), ("rc", name, slot))
        assert tl.before(("kv", name), ("read", name))
        assert tl.before(("rc", name, slot), ("read", name))
        if i + 2 < len(names):  # staging slot reused two layers later
            assert tl.before(("rc", name, slot), ("act", names[i + 2], slot))
    # The forward's first layer does not wait for the last layer's restore.
    assert not tl.before(("kv", names[-1]), ("read", names[0]))
    assert not tl.before(("rc", names[-1], 1), ("read", names[0]))
    assert rt.last_waited == names and rt.layerwise


def _after(later: dict, earlier: dict) -> bool:
    return all(later.get(k, 0) >= v for k, v in earlier.items())


def test_next_step_is_ordered_after_this_ones_restore(rig):
    tl, rt, names = rig
    _step(tl, rt, names, recompute_blocks=2)
    _step(tl, rt, names, recompute_blocks=1, new_blocks=(10, 11, 12))
    last = names[-1]
    # The store reads what the forward and the restore wrote.
    assert tl.before(("read", last), ("store", names[0]), step=0)
    assert tl.before(("rc", last, 1), ("store", names[0]), step=0)
    # The index and staging buffers are rewritten only after the last step's recomputes read them.
    second_index = tl.find("index")[1]
    for name, slot in ((names[-2], 0), (last, 1)):
        read = tl.find("rc", name, slot)[0]
        rewrite = tl.find("act", names[slot], slot)[1]
        assert _after(second_index, read) and _after(rewrite, read)


def test_stores_run_beside_the_next_steps(rig):
    tl, rt, names = rig
    _step(tl, rt, names, recompute_blocks=2, store=(9, 3))
    _step(tl, rt, names, recompute_blocks=2, new_blocks=(10, 11, 12), store=(13, 4), capture=(13, 1))
    stored = tl.find("store", names[-1])[0]  # the first step's last store copy
    for name in names:  # neither the next restore nor the next forward waits for it
        assert not _after(tl.find("kv", name)[1], stored)
        assert not _after(tl.find("read", name)[1], stored)


def test_a_reallocated_block_is_written_after_its_store(rig):
    tl, rt, names = rig
    _step(tl, rt, names, recompute_blocks=2, store=(9, 3))
    _step(tl, rt, names, recompute_blocks=2, new_blocks=(10, 9, 12), store=(13, 4))
    stored = tl.find("store", names[-1])[0]
    assert _after(tl.find("write", 9)[0], stored)  # vLLM's write into the block it reallocated
    assert _after(tl.find("kv", names[0])[1], stored)  # and the restore into it


def test_a_capture_block_lent_again_is_written_after_the_store_reading_it(rig):
    """The scheduler lends a capture block again as soon as the store of the block it held is
    issued; the next forward's capture op must not overwrite it before that store read it."""
    tl, rt, names = rig
    _step(tl, rt, names, recompute_blocks=0, store=(9, 3), capture=(9, 1))
    _step(tl, rt, names, recompute_blocks=0, new_blocks=(10, 11, 12), store=(13, 4), capture=(13, 2))
    _step(tl, rt, names, recompute_blocks=0, new_blocks=(14, 15, 0), store=(14, 5), capture=(14, 1))
    first_store, second_store = tl.find("store", names[-1])[1::2][:2]  # K/V, then activations
    assert not _after(tl.find("capture", 2)[0], first_store)  # another capture block: no wait
    assert _after(tl.find("capture", 1)[1], first_store)
    assert not _after(tl.find("capture", 1)[1], second_store)  # only the store that read it
    assert rt.capture_map[14] == 1 and rt.capture_map[9] == 1 and rt.capture_map[13] == 2


def test_a_restore_reads_a_slot_after_its_store(rig):
    tl, rt, names = rig
    _step(tl, rt, names, recompute_blocks=0, store=(9, 3))
    _step(tl, rt, names, recompute_blocks=0, slots=(3, 1, 2), new_blocks=(10, 11, 12))
    stored = tl.find("store", names[-1])[0]
    assert all(_after(tl.find("kv", name)[1], stored) for name in names)


def test_streamed_only_restore_is_waited_per_layer(rig):
    tl, rt, names = rig
    _step(tl, rt, names, recompute_blocks=0)
    assert not [lab for lab, _ in tl.ops if lab[0] in ("act", "rc")]
    for name in names:
        assert tl.before(("kv", name), ("read", name))
    assert not tl.before(("kv", names[-1]), ("read", names[0]))


def test_full_cuda_graph_step_waits_for_the_whole_restore(rig):
    tl, rt, names = rig
    _step(tl, rt, names, recompute_blocks=2, wait="whole")
    assert tl.before(("kv", names[-1]), ("read", names[0]))
    assert tl.before(("rc", names[-1], 1), ("read", names[0]))
    assert rt.last_waited == []


def test_a_skipped_wait_switches_to_whole_restores(rig, caplog):
    tl, rt, names = rig
    with caplog.at_level(logging.WARNING, logger="vllm_partial_kv.restore"):
        _step(tl, rt, names, recompute_blocks=2, skip=names[-1])
    assert not rt.layerwise and "without waiting" in caplog.text
    # What follows that forward (its store into a slot the restore may read, later writes) is
    # still ordered after the whole restore.
    assert tl.before(("kv", names[-1]), ("store", names[0]))
    assert tl.before(("rc", names[-1], 1), ("store", names[0]))
    _step(tl, rt, names, recompute_blocks=2)  # asks for layerwise, gets whole
    assert tl.before(("kv", names[-1]), ("read", names[0]))
    assert tl.before(("rc", names[-1], 1), ("read", names[0]))


def test_an_async_restore_is_waited_for_by_nobody_and_ordered_on_its_own_streams(rig):
    """vLLM keeps the restoring request out of the batch until the returned event completes;
    the forwards of other requests meanwhile do not wait, and the next restore reuses the index
    and staging buffers only after this one's recomputes read them (no forward in between
    orders them)."""
    tl, rt, names = rig
    first = rt.load([LoadSpec([0, 1, 2], [5, 6, 7], 0, 2)], "none")
    _forward(tl, rt, names)  # other requests' step
    assert rt.last_waited == []
    for name in names:
        assert not tl.before(("kv", name), ("read", name))
        assert not tl.before(("rc", name, names.index(name) % 2), ("read", name))
        assert _after(first.clock, tl.find("kv", name)[0])
        assert _after(first.clock, tl.find("rc", name, names.index(name) % 2)[0])
    second = rt.load([LoadSpec([3, 4], [10, 11], 0, 2)], "none")
    assert second is not first
    second_index = tl.find("index")[1]
    for name, slot in ((names[-2], 0), (names[-1], 1)):
        read = tl.find("rc", name, slot)[0]
        assert _after(second_index, read)
        assert _after(tl.find("act", names[slot], slot)[1], read)


def test_whole_restore_unless_the_forward_calls_back():
    """vLLM 0.26's runner V2 starts a full-graph step's loads with no attention metadata and no
    graph mode: the forward will not call back, so the restore must complete before it."""
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode

    from vllm_partial_kv.compat import calls_layer_waits

    def ctx(mode, metadata):
        return SimpleNamespace(cudagraph_runtime_mode=mode, attn_metadata=metadata)

    assert calls_layer_waits(ctx(CUDAGraphMode.PIECEWISE, {"layer": object()}))
    assert calls_layer_waits(ctx(CUDAGraphMode.NONE, {"layer": object()}))
    assert not calls_layer_waits(ctx(CUDAGraphMode.FULL, {"layer": object()}))  # runner V1
    assert not calls_layer_waits(ctx(CUDAGraphMode.NONE, None))  # runner V2, full graph


def test_a_restore_that_fails_midway_is_drained_before_later_writes(rig):
    """The connector reports a failed restore's blocks to vLLM, which rewrites them later: copies
    issued before the failure must not land after that."""
    tl, rt, names = rig
    copy, calls = rt.copy, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:  # layer 1's K/V copy
            raise RuntimeError("injected")
        copy(*args)

    rt.copy = failing
    with pytest.raises(RuntimeError):
        rt.load([LoadSpec([0, 1, 2], [5, 6, 7], 0, 2)])
    rt.copy = copy
    _step(tl, rt, names, recompute_blocks=2, new_blocks=(5, 6, 7))
    rewrite = tl.find("write", 5)[0]
    assert _after(rewrite, tl.find("act", names[1], 1)[0])  # the last copy issued
    assert _after(rewrite, tl.find("rc", names[0], 0)[0])


def test_a_triton_kernel_that_fails_falls_back_to_vllms_modules(monkeypatch, caplog):
    """On a GPU where the kernel cannot compile or launch, the layer is recomputed through vLLM's
    own modules instead, once with a logged traceback, and later restores skip the kernel."""
    from types import SimpleNamespace

    from vllm_partial_kv import kernels

    name, kv_dim = "model.layers.0.self_attn.attn", HEADS * HEAD
    w = torch.randn(2 * kv_dim, HIDDEN)
    written = []
    impl = SimpleNamespace(do_kv_cache_update=lambda attn, k, v, cache, slots: written.append((k, v)))
    spec = SimpleNamespace(
        attn=SimpleNamespace(num_kv_heads=HEADS, head_size=HEAD, impl=impl, kv_cache_dtype="auto"),
        has_dense_weight=True, w_k=w[:kv_dim], w_v=w[kv_dim:], biases=lambda: (None, None),
        k_norm=None, rope=None, project_kv=lambda x: (x @ w[:kv_dim].T, x @ w[kv_dim:].T),
    )
    kv = torch.zeros(BLOCKS, HEADS, BS, 2 * HEAD)
    pool = HostPool(4, {name: [kv]}, (BS, HIDDEN), torch.float32, pin=False)
    acts = {name: torch.zeros(BLOCKS * BS + 1, HIDDEN)}
    rt = RestoreRuntime({name: kv}, BLOCKS, BS, pool, acts, {name: spec}, 8 * BS)
    rt.cuda = True  # the GPU path, with the kernel failing as it would on such a GPU
    launches = []

    def failing(*args, **kwargs):
        launches.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(kernels, "recompute_kv", failing)
    x = torch.randn(BS, HIDDEN)
    with caplog.at_level(logging.ERROR, logger="vllm_partial_kv.restore"):
        rt._recompute(name, x, BS)
    assert launches == [1] and rt.kernel == "torch" and "Triton recompute kernel failed" in caplog.text
    ((k, v),) = written
    torch.testing.assert_close(v.reshape(BS, -1), x @ w[kv_dim:].T)
    rt._recompute(name, x, BS)
    assert launches == [1] and len(written) == 2


def test_start_up_tunes_every_bucket_so_that_restores_never_time(monkeypatch):
    """The Triton recompute's way (one-pass kernel or cuBLAS + epilogue) is timed, which
    synchronizes the device, at start-up for every token bucket a restore can recompute, once per
    shape, through the calls restores make; restores then find theirs tuned and time nothing.
    The kernel runs in the Triton interpreter; the timing is counted instead of run."""
    from types import SimpleNamespace

    from vllm_partial_kv import compat
    from vllm_partial_kv.kernels import triton_recompute

    _fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t)  # no pinned memory without CUDA
    monkeypatch.setattr(triton_recompute, "_modes", {})
    timed = []
    monkeypatch.setattr(triton_recompute, "_median_ms", lambda way: timed.append(way.__name__) or (
        {"fused": 2.0, "split": 1.0}[way.__name__]))  # the interpreter's default is the other way

    names, kv_dim = [f"model.layers.{i}.self_attn.attn" for i in range(2)], HEADS * HEAD
    weights = {n: torch.randn(2 * kv_dim, HIDDEN) for n in names}
    layers = {n: SimpleNamespace(
        attn=SimpleNamespace(num_kv_heads=HEADS, head_size=HEAD, kv_cache_dtype="auto"), has_dense_weight=True,
        hidden_size=HIDDEN, w_k=w[:kv_dim], w_v=w[kv_dim:], biases=lambda: (None, None), k_norm=None, rope=None,
    ) for n, w in weights.items()}
    kv_caches = {n: torch.zeros(BLOCKS, HEADS, BS, 2 * HEAD) for n in names}
    pool = HostPool(8, {n: [t] for n, t in kv_caches.items()}, (BS, HIDDEN), torch.float32, pin=False)
    acts = {n: torch.zeros(BLOCKS * BS + 1, HIDDEN) for n in names}
    rt = RestoreRuntime(kv_caches, BLOCKS, BS, pool, acts, layers, 8 * BS)
    rt.cuda = True  # the GPU path
    rt._init_streams()
    rt.staging = [rt.staging[0], rt.staging[0].clone()]

    rt.tune_recompute()
    buckets = [4, 8, 16, 32]  # restores recompute 1 to 8 blocks of 4 tokens
    assert timed == ["fused", "split"] * len(buckets)  # both layers share each timing
    assert sorted(key[-1] for key in triton_recompute._modes) == buckets
    assert set(triton_recompute._modes.values()) == {"split"} and rt.kernel == "auto"

    serving = []  # what must not happen while serving: a timing, a way not tuned at start-up
    monkeypatch.setattr(triton_recompute, "_median_ms", lambda way: serving.append("timed") or 1.0)
    monkeypatch.setattr(triton_recompute, "_untuned_mode", lambda key: serving.append(key) or "split")
    for n in names:
        pool.act[n].copy_(torch.randn_like(pool.act[n]))
    for blocks in (1, 3, 5, 8):  # 4, 12, 20 and 32 tokens
        targets = list(range(BLOCKS - blocks, BLOCKS))
        rt.load([LoadSpec(list(range(blocks)), targets, 0, blocks)], "none")
        for n, w in weights.items():
            k, v = compat.kv_cache_views(kv_caches[n], BLOCKS)
            x = pool.act[n][:blocks].reshape(-1, HIDDEN)
            torch.testing.assert_close(k[targets].reshape(-1, kv_dim), x @ w[:kv_dim].T)
            torch.testing.assert_close(v[targets].reshape(-1, kv_dim), x @ w[kv_dim:].T)
    assert serving == [] and rt.kernel == "auto"  # and the kernel never failed over to torch


def test_the_shard_join_runs_between_its_layers_copy_and_the_staging_reuse(rig):
    """Under tensor parallelism the compute stream joins the ranks' activation shards before each
    recompute: after its layer's activation copy, before its recompute, and before the copy that
    reuses its staging slot two layers later (a synchronous all-gather orders like an op on the
    current stream)."""
    tl, rt, names = rig

    def gather(x):
        (slot,) = [i for i, s in enumerate(rt.staging) if s.data_ptr() == x.data_ptr()]
        tl.op("gather", slot)
        return x

    rt.gather = gather
    _step(tl, rt, names, recompute_blocks=2)

    def after(later, earlier):
        return all(later.get(k, 0) >= v for k, v in earlier.items())

    for i, name in enumerate(names):
        slot, k = i % 2, i // 2
        joined = tl.find("gather", slot)[k]
        assert after(joined, tl.find("act", name, slot)[0])  # joins what this layer copied
        assert after(tl.find("rc", name, slot)[0], joined)  # the recompute reads the join
        if i + 2 < len(names):  # the staging slot is reused two layers later, after the join
            assert after(tl.find("act", names[i + 2], slot)[0], joined)
