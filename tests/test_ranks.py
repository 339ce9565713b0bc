"""Two tensor-parallel ranks as two gloo processes on localhost, no vLLM engine: the worker half
around a CPU `RestoreRuntime` whose recompute is a stub, joined by a real gloo group. What the
engine test (`test_parallel.py`) cannot provoke: a restore failing midway on one rank."""

from __future__ import annotations

import datetime
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYERS, BLOCKS, BS, HEADS, HEAD, HIDDEN = 4, 16, 4, 2, 8, 32
GROUP_TIMEOUT_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(rank: int, size: int):
    """`TensorParallelRanks` over a gloo group of its own (vLLM's TP group is not set up here)."""
    from vllm_partial_kv.ranks import TensorParallelRanks

    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    ranks = object.__new__(TensorParallelRanks)
    ranks.size, ranks.rank = size, rank
    ranks._device_group = dist.new_group(list(range(size)), backend="gloo", timeout=timeout)
    ranks._cpu_group = dist.new_group(list(range(size)), backend="gloo", timeout=timeout)
    ranks.reserve(8 * BS, HIDDEN // size, torch.float32, torch.device("cpu"))
    return ranks


def _connector(rank: int, ranks, fail_layer: int | None):
    """The worker half as register_kv_caches leaves it, with activation shards of 2 ranks; on this
    rank the recompute of layer `fail_layer` raises (as an allocation failing on one GPU would)."""
    from vllm_partial_kv import planner
    from vllm_partial_kv.config import parse_config
    from vllm_partial_kv.metadata import PartialKVMetadata
    from vllm_partial_kv.worker import PartialKVWorker
    from vllm_partial_kv.faults import RestoreFaults
    from vllm_partial_kv.restore import LoadSpec, RestoreRuntime
    from vllm_partial_kv.store import HostPool

    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    kv_caches = {n: torch.zeros(BLOCKS, HEADS, BS, 2 * HEAD) for n in names}
    width = HIDDEN // ranks.size
    acts = {n: torch.zeros(3 * BS + 1, width) for n in names}
    pool = HostPool(8, {n: [t] for n, t in kv_caches.items()}, (BS, width), torch.float32, pin=False)
    rt = RestoreRuntime(kv_caches, BLOCKS, BS, pool, acts, dict.fromkeys(names), 8 * BS,
                        kernel="torch", gather=ranks.gather)
    calls = []

    def recompute(name, x, n, tune=False):
        assert x.shape == (n, HIDDEN)  # whole rows, joined
        calls.append(name)
        if fail_layer is not None and name == names[fail_layer]:
            raise torch.OutOfMemoryError(f"simulated: allocation failed on rank {rank}")

    rt._recompute = recompute
    conn = object.__new__(PartialKVWorker)
    conn.cfg = parse_config({"recompute_ratio": 1.0})
    conn.with_act = conn.recomputes = True
    conn.storage = None
    conn.runtime = rt
    conn._ranks = ranks
    conn._faults = RestoreFaults()
    conn._profiled_kernel = rt.kernel
    conn.profiles = {}
    conn.plan_shape = planner.ModelShape(LAYERS, HIDDEN, HEADS, HEAD, 4, BS, act_shards=ranks.size)
    conn._failed_blocks, conn._loading = set(), {}
    meta = PartialKVMetadata(loads=[LoadSpec([0, 1, 2], [5, 6, 7], 0, 3, req_id="r")])
    return conn, meta, calls


def _one_failing_rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    ranks = _ranks(rank, 2)
    conn, meta, calls = _connector(rank, ranks, fail_layer=1 if rank == 1 else None)
    for step in ("failing", "next"):  # the next step's restore: every rank healthy again
        t0 = time.monotonic()
        conn.start_load_kv(meta, None)
        results[f"{rank}-{step}"] = {"seconds": time.monotonic() - t0, "recomputed": len(calls),
                                     "failed": sorted(conn.get_block_ids_with_load_errors())}
        calls.clear()
        rt = conn.runtime
        rt._recompute = lambda name, x, n, tune=False: calls.append(name)
    dist.destroy_process_group()


def test_a_restore_failing_midway_on_one_rank_fails_on_every_rank_at_once():
    """Rank 1's recompute raises at layer 1 (after the restore began): rank 1 skips its own steps
    but still joins every layer's all-gather, and both ranks then learn of the failure and report
    the step's blocks as load errors, at once (not after the group's timeout). The next restore
    runs normally on both."""
    results = mp.Manager().dict()
    mp.spawn(_one_failing_rank, args=(_free_port(), results), nprocs=2)
    results = dict(results)
    assert results["1-failing"]["recomputed"] == 2  # layers 0 and 1 (which raised), then no more
    assert results["0-failing"]["recomputed"] == LAYERS
    for rank in (0, 1):
        failing, following = results[f"{rank}-failing"], results[f"{rank}-next"]
        assert failing["failed"] == [5, 6, 7] and failing["seconds"] < 5, results
        assert following["failed"] == [] and following["recomputed"] == LAYERS, results


def _fp8_shards(rank: int, port: int, results) -> None:
    """One rank of an fp8 host store with activation shards: store one block's rows, restore it
    with every block recomputed, and keep the rows the recompute got."""
    from vllm_partial_kv.restore import LoadSpec, RestoreRuntime
    from vllm_partial_kv.store import HostPool
    from vllm_partial_kv.store_format import kv_slot_views

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    ranks = _ranks(rank, 2)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    kv_caches = {n: torch.zeros(BLOCKS, HEADS, BS, 2 * HEAD) for n in names}
    width = HIDDEN // 2
    rows = torch.randn(BS, HIDDEN, generator=torch.Generator().manual_seed(0))
    rows[:, HIDDEN - 1] *= 100  # an outlier column in rank 1's shard only: the shards' scales differ
    acts = {n: torch.zeros(3 * BS + 1, width) for n in names}
    for a in acts.values():
        a[:BS] = rows[:, rank * width : (rank + 1) * width]  # capture block 0
    views = kv_slot_views("fp8", {n: [t] for n, t in kv_caches.items()}, torch.float32, (BS, HEADS, HEAD))
    pool = HostPool(8, views, (BS, width), torch.float8_e4m3fn, pin=False, fmt="fp8")
    rt = RestoreRuntime(kv_caches, BLOCKS, BS, pool, acts, dict.fromkeys(names), 8 * BS, kernel="torch",
                        gather=ranks.gather)
    got = []
    rt._recompute = lambda name, x, n, tune=False, **kw: got.append((x.clone(), sorted(kw)))
    rt.store([5], [3], [0])
    rt.load([LoadSpec([3], [5], 0, 1, fmt="fp8")], wait="none")
    results[rank] = {"rows": [x.tolist() for x, _ in got], "kwargs": [kw for _, kw in got],
                     "scales": pool.act_scale[names[0]][3].tolist(), "want": rows.tolist()}
    dist.destroy_process_group()


def test_fp8_activation_shards_are_joined_dequantized():
    """fp8 host store under tensor parallelism: each rank quantizes its own shard of a row with a
    scale of its own, and a restore joins the ranks' dequantized shards into whole rows for the
    recompute (within e4m3's rounding, 2**-4 of each value)."""
    results = mp.Manager().dict()
    mp.spawn(_fp8_shards, args=(_free_port(), results), nprocs=2)
    results = dict(results)
    want = torch.tensor(results[0]["want"])
    assert results[0]["scales"] != results[1]["scales"]
    for rank in (0, 1):
        assert len(results[rank]["rows"]) == LAYERS and results[rank]["kwargs"] == [[]] * LAYERS
        for x in results[rank]["rows"]:
            err = (torch.tensor(x) - want).abs()
            assert (err <= want.abs() * 2**-4 + 1e-6).all() and err.max() > 0
