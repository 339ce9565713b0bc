"""Tensor and pipeline parallelism on vLLM's multi-process and Ray executors (the CPU build runs
one rank per core): every rank offloads and restores its own heads of its own stage's layers,
keeping its 1/TP of the activation columns (restores join the ranks' shards), and `cpu_bytes` is
the total across ranks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

CPU_BYTES = 64 << 20

# One parallel engine (start-up dominates): the baseline conversation runs on it with the host
# lookups switched off, so vLLM computes every block itself, under the same parallel setup.
PARALLEL = textwrap.dedent(
    """
    import json, os, sys
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    def cpu_as_ray_device():
        # vLLM's CPU platform names no Ray device ("current platform cpu does not support ray"):
        # a custom Ray resource stands in for it, in the engine and (as Ray's worker set-up
        # hook) in every Ray worker, so that vLLM's Ray executor places one worker per core.
        import ray
        from vllm.platforms.cpu import CpuPlatform
        from vllm.utils.network_utils import get_open_port
        from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc
        CpuPlatform.ray_device_key = "cpu_core"
        RayWorkerProc.get_node_and_physical_gpu_ids = lambda self: (
            ray.get_runtime_context().get_node_id(), [self._init_kwargs["rank"]])
        if hasattr(RayExecutorV2, "_select_tcpstore_port"):
            # vLLM 0.26 takes port 100 without data parallelism, and the CPU all-reduce names its
            # shared memory after that port and leaves it behind when Ray kills the workers: the
            # next run would fail (EEXIST). A free port, as vLLM 0.32 and the mp executor take.
            RayExecutorV2._select_tcpstore_port = staticmethod(lambda *args: get_open_port())

    def start_ray(tp, pp):
        import ray
        cpu_as_ray_device()
        ray.init(num_cpus=tp * pp, resources={"cpu_core": tp * pp}, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": cpu_as_ray_device})

    def set_ratio(self, ratio):
        from dataclasses import replace
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        worker = get_kv_transfer_group().worker
        worker.cfg = replace(worker.cfg, recompute_ratio=ratio)

    def restored_error(self):
        # Relative error of the last restore's blocks on this rank's paged cache against the
        # K/V the rank offloaded: recomputed and streamed blocks alike.
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        runtime = get_kv_transfer_group().worker.runtime
        (load,) = runtime.last_loads
        worst = 0.0
        for name in runtime.names:
            for gpu, host in zip(runtime.gpu_views[name], runtime.pool.kv[name]):
                restored, original = gpu[load.block_ids].double().cpu(), host[load.slots].double()
                worst = max(worst, ((restored - original).norm() / original.norm()).item())
        return {"blocks": len(load.block_ids), "recomputed": load.recompute_blocks, "error": worst}

    def fail_on_last_rank(self, fail):
        # The documented fault hook, on one rank only: every restore there fails.
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        from vllm.distributed.parallel_state import get_world_group
        from vllm_partial_kv.faults import RestoreFaults
        world = get_world_group()
        last = world.rank_in_group == world.world_size - 1
        get_kv_transfer_group().worker._faults = RestoreFaults(1 if fail and last else None)

    def rank_state(self):
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm_partial_kv import capture
        worker = get_kv_transfer_group().worker
        pool = worker.runtime.pool
        ray = sys.modules.get("ray")
        return {"rank": [get_pp_group().rank_in_group, get_tensor_model_parallel_rank()],
                "ray_actor": bool(ray and ray.is_initialized() and ray.get_runtime_context().get_actor_id()),
                "pid": os.getpid(),
                "layers": sorted(worker.runtime.names), "captured": sorted(capture.layers()),
                "stored": sorted(pool.kv), "totals": worker.totals.data,
                "nbytes": pool.nbytes, "slots": pool.num_slots, "with_act": worker.with_act,
                "shards": worker.shape.act_shards,
                "profiles": {str(busy): p.to_dict() for busy, p in worker.profiles.items()},
                "kv_bytes_per_slot": sum(v[0].numel() * v.element_size() for vs in pool.kv.values() for v in vs),
                "act_bytes_per_slot": sum(a[0].numel() * a.element_size() for a in pool.act.values())}

    def prompt(seed, n):
        import random
        rng = random.Random(seed)
        return [rng.randrange(10, 1000) for _ in range(n)]

    def conversations(llm, n_conv, turns, sp):
        histories = [prompt(100 + c, 500) for c in range(n_conv)]
        outputs = [[] for _ in range(n_conv)]
        for turn in range(turns):
            for c in range(n_conv):
                out = llm.generate([{"prompt_token_ids": histories[c]}], sp, use_tqdm=False)
                tokens = list(out[0].outputs[0].token_ids)
                outputs[c] += tokens
                histories[c] = histories[c] + tokens + prompt(1000 * turn + c, 40)
        return outputs

    if __name__ == "__main__":
        model, cpu_bytes, gpu_bytes, tp, pp, backend = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
        if backend == "ray":
            start_ray(tp, pp)
        engine = dict(dtype="float32", block_size=32, kv_cache_memory_bytes=gpu_bytes, max_model_len=768,
                      seed=0, enforce_eager=True, disable_log_stats=True, tensor_parallel_size=tp,
                      pipeline_parallel_size=pp, distributed_executor_backend=backend)
        if sys.argv[7:] == ["plain"]:  # the same parallel engine without the plugin
            plain = conversations(LLM(model, **engine), 3, 2, SamplingParams(temperature=0, max_tokens=16))
            print("RESULT " + json.dumps({"plain": plain}))
            sys.exit(0)
        llm = LLM(model, **engine,
                  kv_transfer_config=KVTransferConfig(
                      kv_connector="PartialRecomputeConnector", kv_role="kv_both",
                      kv_load_failure_policy="recompute",
                      kv_connector_extra_config={"cpu_bytes": cpu_bytes, "recompute_ratio": "auto"}))
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler
        sp = SamplingParams(temperature=0, max_tokens=16)
        lookup = scheduler.get_num_new_matched_tokens
        scheduler.get_num_new_matched_tokens = lambda request, computed: (0, False)
        baseline = conversations(llm, 3, 2, sp)
        scheduler.get_num_new_matched_tokens = lookup
        assert llm.reset_prefix_cache(reset_connector=True)
        got = conversations(llm, 3, 2, sp)
        kv = {}
        one = {"prompt_token_ids": prompt(7, 9 * 32 + 5)}
        sp8 = SamplingParams(temperature=0, max_tokens=8)
        reference = llm.generate([one], sp8, use_tqdm=False)[0].outputs[0].token_ids
        for ratio in (0.0, 0.5, 1.0):
            llm.collective_rpc(set_ratio, args=(ratio,))
            llm.reset_prefix_cache()  # the GPU copies; the host store keeps the blocks
            llm.generate([one], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
            kv[ratio] = llm.collective_rpc(restored_error)
        # The last rank's restore fails: every rank gives the step's restore up (no rank joins a
        # gather another skips, none keeps K/V the others did not restore), vLLM recomputes.
        before = llm.collective_rpc(rank_state)
        llm.collective_rpc(fail_on_last_rank, args=(True,))
        llm.reset_prefix_cache()
        failed_over = llm.generate([one], sp8, use_tqdm=False)[0].outputs[0].token_ids
        llm.collective_rpc(fail_on_last_rank, args=(False,))
        print("RESULT " + json.dumps({"same": got == baseline, "got": got, "pid": os.getpid(),
                                      "baseline_tokens": sum(map(len, baseline)),
                                      "failed_over_same": list(failed_over) == list(reference),
                                      "scheduler_slots": scheduler.num_slots, "kv": kv,
                                      "before": before, "ranks": llm.collective_rpc(rank_state)}))
        # Now, while Ray is up: at exit Ray's own hook would run first, and vLLM's shutdown would
        # then start a new Ray instance to kill its workers (and leave its agents behind).
        llm.llm_engine.engine_core.shutdown()
    """
)


def _pipeline_parallel_runs() -> bool:
    """vLLM 0.32's CPU model runner fails PP > 1 even without a connector, offline and in the
    OpenAI server alike (`assert self.intermediate_tensors is not None` in the second stage's
    first step); 0.26's runs it."""
    from vllm_partial_kv.compat import vllm_version

    return vllm_version().release < (0, 32)


def _ray_importable() -> bool:
    from importlib.util import find_spec

    return find_spec("ray") is not None


@pytest.mark.spawn
@pytest.mark.parametrize("tp,pp,backend", [
    (2, 1, "mp"),
    pytest.param(2, 1, "ray", marks=pytest.mark.skipif(
        not _ray_importable(), reason="ray is not installed (pip install 'vllm-partial-kv[ray]')")),
    pytest.param(1, 2, "mp", marks=pytest.mark.skipif(
        not _pipeline_parallel_runs(),
        reason="this vLLM's CPU build fails PP=2, offline and served, without the plugin too")),
])
def test_parallel_ranks_restore_their_own_kv(tp, pp, backend, tiny_model, tmp_path, make_llm_tp1):
    """TP=2 or PP=2 on the mp executor, and TP=2 on the Ray executor (workers in Ray actors,
    where the plugin must load from its entry point as in mp's worker processes), in auto mode,
    under forced eviction in multi-turn conversations: the same greedy tokens as vLLM computing
    every block itself (same engine, host lookups off) and, on mp, as the same parallel engine
    without the plugin; every rank plans from the same profiles;
    every rank captures, stores and restores its own stage's layers, recomputing on every rank;
    every rank's restored K/V equal what it offloaded for r = 0, n/2 and n (recomputed from the
    ranks' joined activation shards under TP); a restore that fails on the last rank fails on
    every TP rank and vLLM recomputes (same tokens); and `cpu_bytes` is split across the ranks
    (the same slot count everywhere, half the single rank's K/V and activations per slot)."""
    model = tiny_model("llama2")
    # Per rank: 4 layers (TP) or 2 (PP) x K,V x 2 (TP) or 4 (PP) heads x 64 x fp32 = 4 KiB a token;
    # the GPU cache holds 1024 tokens, under two of the three ~550-token conversations.
    script = tmp_path / "parallel.py"
    script.write_text(PARALLEL)
    # Ray in a sandbox: no usage report, no auth token written to ~/.ray (the dashboard is off
    # in the script's ray.init).
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_PARTIAL_KV_CACHE_DIR": str(tmp_path),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    args = [str(model), str(CPU_BYTES), str(1024 * 4096), str(tp), str(pp), backend]
    returncode, stdout, stderr = _run_in_own_process_group([sys.executable, str(script), *args], env, 600)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert returncode == 0 and lines, stderr[-5000:]
    result = json.loads(lines[-1][7:])
    assert result["same"] and result["baseline_tokens"] == 3 * 2 * 16
    if backend == "mp":  # and the same as the same parallel engine without the plugin
        returncode, stdout, stderr = _run_in_own_process_group(  # no plugin loaded at all
            [sys.executable, str(script), *args, "plain"], {**env, "VLLM_PLUGINS": "none"}, 600)
        plain = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert returncode == 0 and plain, stderr[-5000:]
        assert json.loads(plain[-1][7:])["plain"] == result["got"]
    assert result["failed_over_same"]
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    before = sorted(result["before"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [[p, t] for p in range(pp) for t in range(tp)]
    assert all(r["ray_actor"] == (backend == "ray") and r["pid"] != result["pid"] for r in ranks), ranks
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    for rank, was in zip(ranks, before):
        stage = layers[rank["rank"][0] * 4 // pp : (rank["rank"][0] + 1) * 4 // pp]
        assert rank["layers"] == rank["captured"] == rank["stored"] == stage, rank
        assert rank["with_act"] and rank["shards"] == tp
        # Auto mode: every rank plans from rank 0's profiles (under TP with the shard join's
        # rate, measured on the group), so all pick the same splits.
        assert rank["profiles"] == ranks[0]["profiles"] and len(rank["profiles"]) == 2
        assert all((p["gather_bytes_per_s"] > 0) == (tp > 1) for p in rank["profiles"].values())
        assert rank["totals"]["tokens_loaded"] > 0 and rank["totals"]["tokens_recomputed"] > 0, rank
        assert rank["slots"] == result["scheduler_slots"]
        # Every rank restored the same blocks the same way.
        assert was["totals"] == before[0]["totals"] | {"restore_seconds": was["totals"]["restore_seconds"]}
        # The last rank's restore failed: under TP every rank gave it up, restoring nothing (with
        # PP the other stage restored its own layers, and vLLM rewrote them).
        failed = tp > 1 or rank is ranks[-1]
        assert rank["totals"]["restore_failures"] == was["totals"]["restore_failures"] + failed
        if failed:
            assert rank["totals"]["tokens_loaded"] == was["totals"]["tokens_loaded"]
    for ratio, per_rank in result["kv"].items():
        for kv in per_rank:
            assert kv["blocks"] == 9 and abs(kv["recomputed"] - float(ratio) * 9) <= 0.5, (ratio, kv)
            assert kv["error"] < 1e-3, (ratio, kv)
    # cpu_bytes is the total: each rank's store is half the single-rank store for it, and each
    # slot holds half the single rank's K/V (its heads, or its stage's layers).
    tp1 = make_llm_tp1(model, CPU_BYTES)
    for rank in ranks:  # TP: its heads' K/V and its shard of the activation columns
        assert rank["kv_bytes_per_slot"] * 2 == tp1["kv_bytes_per_slot"]
        assert rank["act_bytes_per_slot"] * 2 == tp1["act_bytes_per_slot"] > 0
        slot_bytes = rank["nbytes"] // rank["slots"]
        assert CPU_BYTES // 2 - slot_bytes < rank["nbytes"] <= CPU_BYTES // 2
        assert abs(rank["nbytes"] - tp1["nbytes"] / 2) < slot_bytes


def _run_in_own_process_group(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """Run argv, then kill whatever it left in its process group: Ray's daemons join the
    driver's group and outlive a driver that failed (or timed out) before shutting Ray down."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, stdout, stderr


@pytest.fixture
def make_llm_tp1():
    """The single-rank store for the same cpu_bytes, in-process."""
    import gc

    from conftest import make_llm

    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    def make(model, cpu_bytes: int) -> dict:
        gc.collect()
        ensure_kv_transfer_shutdown()
        llm = make_llm(model, kv_transfer_config=KVTransferConfig(
            kv_connector="PartialRecomputeConnector", kv_role="kv_both",
            kv_connector_extra_config={"cpu_bytes": cpu_bytes, "recompute_ratio": 0.5}))
        pool = get_kv_transfer_group().worker.runtime.pool
        state = {"nbytes": pool.nbytes, "slots": pool.num_slots,
                 "kv_bytes_per_slot": sum(v[0].numel() * v.element_size() for vs in pool.kv.values() for v in vs),
                 "act_bytes_per_slot": sum(a[0].numel() * a.element_size() for a in pool.act.values())}
        del llm, pool
        return state

    yield make
    gc.collect()
    ensure_kv_transfer_shutdown()


@pytest.mark.parametrize("layout", ["kv+act", "act"])
@pytest.mark.parametrize("tp,stages", [(1, [4]), (2, [4]), (1, [3, 2]), (2, [2, 1, 2])])
def test_cpu_bytes_is_the_total_over_ranks(tp, stages, layout):
    """Every rank keeps every slot for its own heads and its own pipeline stage's layers. The
    scheduler sees stage 0's layers, each worker its own: all count the same slots, even with
    uneven stages, and all ranks' stores together stay within cpu_bytes."""
    from types import SimpleNamespace

    from vllm_partial_kv.deployment import over_ranks
    from vllm_partial_kv.store import slots_for_layout

    cpu_bytes, kv_layer, act_layer = 100 << 20, 4096 // tp, 3000  # one layer's block, per rank
    config = SimpleNamespace(
        model_config=SimpleNamespace(get_total_num_hidden_layers=lambda: sum(stages)),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp),
    )
    slots = {
        slots_for_layout(cpu_bytes, over_ranks(config, kv_layer * n, n), over_ranks(config, act_layer * n, n), layout)
        for n in stages
    }
    assert len(slots) == 1
    ((kv_slots, act_slots),) = slots
    act_slots = act_slots if layout == "act" else kv_slots
    total = tp * sum((kv_slots * kv_layer + act_slots * act_layer) * n for n in stages)
    assert cpu_bytes - tp * sum(stages) * (kv_layer + act_layer) < total <= cpu_bytes


def test_auto_mode_keeps_activation_shards_of_multi_head_models(tiny_model, tmp_path):
    """A 7B multi-head model under TP=2 on 80 GB GPUs: a rank's shard of an activation row is
    half of its heads' K/V (whole rows would be as large, and auto mode would keep none), so
    auto mode keeps activations, and the buffers made at model load take <= 3% of its KV cache's memory."""
    from test_memory import _gpu_sized_config

    from vllm_partial_kv.deployment import activations_wanted, device_bytes, kv_block_bound, model_shape

    config = _gpu_sized_config(tiny_model, tmp_path, tensor_parallel_size=2)
    shape = model_shape(config)
    assert shape.act_shards == 2 and shape.num_kv_heads == 16
    assert 2 * shape.act_bytes_per_token == shape.kv_bytes_per_token == 2 * 2048 * 2
    assert activations_wanted(config)
    assert device_bytes(config) + 4 * kv_block_bound(config, 80 << 30) <= 0.03 * (60 << 30)


def test_every_stage_counts_its_own_layers_and_plans_with_one_shape(tiny_model, tmp_path, monkeypatch):
    """32 layers over 3 pipeline stages (vLLM splits them 11, 11, 10, or as the user's partition
    says): each stage's shape counts
    its own layers (what its slots hold and its restores move), while every stage plans a
    restore with one shape (the largest stage's), so all stages split it the same way."""
    from test_memory import _gpu_sized_config

    from vllm_partial_kv.deployment import model_shape, planning_shape

    config = _gpu_sized_config(tiny_model, tmp_path, pipeline_parallel_size=3)

    def per_stage() -> tuple[list[int], set]:
        layers, plans = [], set()
        for rank in range(3):
            config.parallel_config.rank = rank
            layers.append(model_shape(config).num_layers)
            plans.add(planning_shape(config))
        return layers, plans

    layers, plans = per_stage()
    assert layers == [11, 11, 10] and len(plans) == 1 and plans.pop().num_layers == 11
    import vllm.envs

    # The user's own partition (vllm.envs may cache what it read: its attribute too).
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "8,20,4")
    monkeypatch.setattr(vllm.envs, "VLLM_PP_LAYER_PARTITION", "8,20,4", raising=False)
    layers, plans = per_stage()
    assert layers == [8, 20, 4] and len(plans) == 1 and plans.pop().num_layers == 20
