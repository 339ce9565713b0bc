"""Memory: the capture space and restore staging are sized by the batch, never by the KV cache;
when the capture space runs out, blocks are stored without activations and restores stream them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vllm import SamplingParams

from test_restore import _connector_cfg, _prompt, _scheduler_connector, _worker, make_llm  # noqa: F401


def _gpu_sized_config(tiny_model, tmp_path, **engine):
    """A 7B multi-head (Llama-2) shape, as vLLM configures it, from a config.json alone."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    model = tmp_path / "llama2-7b-shape"
    shutil.copytree(tiny_model("llama2"), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, head_dim=128)
    (model / "config.json").write_text(json.dumps(cfg))
    kv = KVTransferConfig(kv_connector="PartialRecomputeConnector", kv_role="kv_both",
                          kv_connector_extra_config={"recompute_ratio": "auto"})
    config = EngineArgs(model=str(model), kv_transfer_config=kv, dtype="bfloat16", **engine).create_engine_config()
    config.cache_config.block_size = 16  # vLLM's GPU default (the CPU build asks for 128)
    config.cache_config.kv_cache_memory_bytes = None  # sized from gpu_memory_utilization
    return config


@pytest.mark.parametrize("max_num_seqs,max_num_batched_tokens", [(1024, 16384), (1024, 8192), (256, 2048)])
def test_buffers_take_under_3_percent_of_a_gpu_budget(tiny_model, tmp_path, max_num_seqs, max_num_batched_tokens):
    """vLLM's GPU defaults (H100/H200: 1024 sequences, 16384 or 8192 tokens; others: 256 and
    2048) for a 7B multi-head model on an 80 GB GPU: about 56 GiB left for the KV cache after
    the weights and vLLM's activation peak. What the plugin makes at model load (counted by vLLM's
    profiling, so the KV cache gets the rest) takes under 3% of it, the map from KV block to
    capture block, sized for the whole device, included; the KV budget does not change it."""
    from vllm_partial_kv.deployment import activations_wanted, device_bytes, kv_block_bound

    config = _gpu_sized_config(tiny_model, tmp_path, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens)
    assert activations_wanted(config)
    made = device_bytes(config) + 4 * kv_block_bound(config, 80 << 30)
    assert made <= 0.03 * (56 << 30), made / (56 << 30)


def _extra_and_kv_bytes() -> tuple[int, int]:
    """The runtime's device buffers but the map from KV block to capture block, and the KV cache."""
    runtime = _worker().runtime
    kv = sum(t.numel() * t.element_size() for t in runtime.kv_caches.values())
    assert runtime.capture_map.numel() >= runtime.num_gpu_blocks
    return runtime.extra_device_bytes - 4 * runtime.capture_map.numel(), kv


def test_capture_and_staging_do_not_grow_with_the_kv_cache(tiny_model, make_llm, monkeypatch):  # noqa: F811
    """On the CPU build, the KV cache sized by VLLM_CPU_KVCACHE_SPACE (1 GiB) and 4x smaller: the
    capture space and the restore staging stay at most 5% of the larger cache, and the same in
    both (the map, 4 bytes per KV block it can hold, aside)."""
    model = tiny_model("llama2")
    cfg = _connector_cfg(0.5, cpu_bytes=16 << 20)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = make_llm(model, kv_cache_memory_bytes=None, kv_transfer_config=cfg)
    extra, kv = _extra_and_kv_bytes()
    del llm
    assert kv == 1 << 30 and extra <= 0.05 * kv, extra / kv
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    llm = make_llm(model, kv_cache_memory_bytes=kv // 4, kv_transfer_config=cfg)
    small_extra, small_kv = _extra_and_kv_bytes()
    del llm
    assert small_kv == kv // 4 and extra == small_extra


@pytest.mark.parametrize("layout", ["kv+act", "act"])
def test_exhausted_capture_space_stores_kv_only_and_keeps_the_tokens(layout, tiny_model, make_llm):  # noqa: F811
    """More running sequences than the capture space has blocks (2): blocks that found none are
    stored without activations (and counted), restores recompute only the leading blocks that
    have them and stream the rest, and the greedy tokens are vLLM's own. In host layout "act"
    the blocks with activations are stored without K/V: their restores must recompute them."""
    model = tiny_model("llama2")
    sp = SamplingParams(temperature=0, max_tokens=40)
    prompts = [_prompt(300 + i, 4 * 32 + 10) for i in range(4)]
    expected = [o.outputs[0].token_ids for o in make_llm(model).generate(prompts, sp, use_tqdm=False)]
    llm = make_llm(model, kv_transfer_config=_connector_cfg(1.0, capture_tokens=64, host_layout=layout))
    scheduler, worker = _scheduler_connector(llm), _worker()
    assert scheduler.capture.num_blocks == 2 and worker.runtime.act_views[worker.runtime.names[0]].shape[0] == 2
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == expected
    assert scheduler.capture.num_free == 2  # every capture block given back
    llm.reset_prefix_cache()  # the next round restores from the host
    loads = []
    load = worker.runtime.load
    worker.runtime.load = lambda specs, *a: (loads.extend(specs), load(specs, *a))[1]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == expected
    totals = worker.totals.data
    assert totals["blocks_stored_without_activations"] > 0 and totals["tokens_recomputed"] > 0, totals
    # Some restores recompute their leading captured blocks only; others stream everything.
    assert any(0 < spec.recompute_blocks < len(spec.block_ids) for spec in loads) or (
        any(spec.recompute_blocks == 0 for spec in loads) and any(spec.recompute_blocks for spec in loads)
    ), [(spec.recompute_blocks, len(spec.block_ids)) for spec in loads]
    index = scheduler.index
    assert all(not index.get(h).has_kv for h in list(index._entries) if index.get(h).has_activations) == (
        layout == "act")
    if layout == "kv+act":  # every restored block holds the K/V vLLM computed (on the host)
        runtime = worker.runtime
        for name in runtime.names:
            for gpu, host in zip(runtime.gpu_views[name], runtime.pool.kv[name]):
                for spec in loads:
                    torch.testing.assert_close(gpu[spec.block_ids], host[spec.slots], rtol=1e-3, atol=1e-3)
    else:  # nothing to stream for activations-only blocks: each restore recomputes all of them
        assert all(spec.recompute_blocks == spec.must_recompute for spec in loads)
    del llm


@pytest.mark.parametrize("arch", ["llama2", "qwen3"])
def test_host_layouts_hold_the_same_kv(arch, tiny_model, make_llm):  # noqa: F811
    """Each host layout restores the K/V vLLM wrote (compared with the K/V the GPU held before
    the restore) and gives vLLM's greedy tokens. In "act" the planner's ratio (0.5) cannot apply:
    blocks without K/V on the host must all be recomputed."""
    model = tiny_model(arch)
    sp = SamplingParams(temperature=0, max_tokens=4)
    prompt = _prompt(11, 6 * 32 + 5)
    expected = make_llm(model).generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    for layout in ("kv+act", "act", "kv"):
        llm = make_llm(model, kv_transfer_config=_connector_cfg({"kv+act": 1.0, "act": 0.5, "kv": 0.0}[layout], host_layout=layout))
        runtime, stored = _worker().runtime, []
        store = runtime.store
        runtime.store = lambda ids, *a: (stored.extend(ids), store(ids, *a))
        assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected
        before = {n: [v[stored[:6]].clone() for v in runtime.gpu_views[n]] for n in runtime.names}
        llm.reset_prefix_cache()
        for cache in runtime.kv_caches.values():
            cache.zero_()
        assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected, layout
        (load,) = runtime.last_loads
        assert len(load.block_ids) == 6 and load.recompute_blocks == (6 if layout != "kv" else 0), layout
        for name in runtime.names:
            for gpu, original in zip(runtime.gpu_views[name], before[name]):
                torch.testing.assert_close(gpu[load.block_ids], original, rtol=1e-3, atol=1e-3)
        del llm, runtime


def test_capture_blocks_go_to_blocks_filled_from_their_first_token():
    """A block gets a capture block only in the step that writes its first token (one started
    without keeps none: its earlier rows are gone), keeps it while it fills, and gives it back
    once its store is issued; every block the step writes is in the map, -1 without one."""
    from types import SimpleNamespace

    from vllm_partial_kv.capture_space import CaptureSpace
    from vllm_partial_kv.config import PartialKVConfig
    from vllm_partial_kv.metadata import PartialKVMetadata
    from vllm_partial_kv.scheduler import PartialKVScheduler, _Request

    conn = SimpleNamespace(with_act=True, block_size=4, cfg=PartialKVConfig(), capture=CaptureSpace(2))
    req = SimpleNamespace(num_computed_tokens=6, num_prompt_tokens=20)
    state = _Request(req, block_ids=[10, 11, 12, 13, 14, 15])

    def step(tokens: int) -> PartialKVMetadata:
        meta = PartialKVMetadata()
        out = SimpleNamespace(num_scheduled_tokens={"r": tokens})
        PartialKVScheduler._map_capture(conn, "r", state, out, meta)
        req.num_computed_tokens += tokens
        return meta

    meta = step(7)  # tokens 6..12: block 1 (started before), 2 and 3 (start now)
    assert meta.capture_block_ids == [11, 12, 13] and meta.capture_blocks == [-1, 0, 1]
    assert state.capture == {2: 0, 3: 1}
    PartialKVScheduler._give_back_capture(conn, state, below=3)  # block 2 stored
    meta = step(4)  # tokens 13..16: block 3 continues, block 4 starts
    assert meta.capture_block_ids == [13, 14] and meta.capture_blocks == [1, 0]
    meta = step(4)  # tokens 17..20: all lent, so block 5, started now, gets none
    assert meta.capture_block_ids == [14, 15] and meta.capture_blocks == [0, -1]
    PartialKVScheduler._give_back_capture(conn, state, below=4)  # block 3 stored
    meta = step(2)  # block 5 continues: still none (its first token's rows are gone)
    assert meta.capture_blocks == [-1] and conn.capture.num_free == 1
    PartialKVScheduler._give_back_capture(conn, state)  # finished or preempted
    assert conn.capture.num_free == 2 and not state.capture


def test_activations_only_layout_holds_more_tokens():
    """At equal cpu_bytes, for a multi-head model (activations half the K/V): "act" holds at least
    1.9x the blocks of "kv", "kv+act" two thirds of them; each kind of slot evicts its own."""
    from vllm_partial_kv.store import BlockIndex, slots_for_layout

    kv_block, act_block, cpu_bytes = 2 * 4 * 64 * 4 * 32 * 4, 256 * 4 * 32 * 4, 64 << 20
    kv_only = sum(slots_for_layout(cpu_bytes, kv_block, act_block, "kv"))
    assert sum(slots_for_layout(cpu_bytes, kv_block, act_block, "act")) >= 1.9 * kv_only
    assert sum(slots_for_layout(cpu_bytes, kv_block, act_block, "kv+act")) == kv_only * 2 // 3
    index = BlockIndex(1, act_slots=2)
    assert [index.allocate(b"a", True), index.allocate(b"b", True), index.allocate(b"k", False)] == [0, 1, 0]
    assert index.allocate(b"c", True) == 0 and b"a" not in index and b"k" in index  # its own kind
    assert not index.get(b"c").has_kv and index.get(b"k").has_kv


def test_host_layout_is_validated():
    from vllm_partial_kv.config import ConfigError, parse_config

    assert parse_config({}).host_layout == "kv+act"
    assert parse_config({"host_layout": "kv"}).wants_activations is False
    with pytest.raises(ConfigError, match="host_layout must be one of"):
        parse_config({"host_layout": "kv-act"})
    # A fixed ratio the layout cannot serve stops start-up, both ways, naming both keys.
    with pytest.raises(ConfigError, match="host_layout \"kv\" keeps no activations.*recompute_ratio 0.5 cannot"):
        parse_config({"host_layout": "kv", "recompute_ratio": 0.5})
    with pytest.raises(ConfigError, match="host_layout \"act\" keeps activations .*recompute_ratio 0.0 cannot"):
        parse_config({"host_layout": "act", "recompute_ratio": 0})
    assert parse_config({"host_layout": "act", "recompute_ratio": "auto"}).wants_activations is None
    assert parse_config({"host_layout": "kv", "recompute_ratio": 0}).wants_activations is False



def _scheduler_half(layout: str, max_recompute_tokens: int):
    """The connector's scheduler half around a real BlockIndex (room for every block of the test:
    nothing is evicted), blocks of 4 tokens, without an engine."""
    from vllm_partial_kv.config import PartialKVConfig
    from vllm_partial_kv.scheduler import PartialKVScheduler, RestoreBreaker
    from vllm_partial_kv.store import BlockIndex

    conn = PartialKVScheduler.__new__(PartialKVScheduler)
    conn.cfg = PartialKVConfig(max_recompute_tokens=max_recompute_tokens, host_layout=layout)
    conn.block_size, conn._forced_blocks, conn._matched, conn.reqs = 4, 0, {}, {}
    conn.breaker = RestoreBreaker()
    conn.index = BlockIndex(32, act_slots=32 if layout == "act" else 0)
    return conn


def _offered(conn, *stored: str) -> tuple[int, list[bytes]]:
    """Stores blocks ("a": with activations, "k": without) under fresh hashes and asks the
    scheduler half, as vLLM does for a new request of those blocks and one more token: how many
    blocks it offers to restore, and the hashes."""
    from types import SimpleNamespace

    hashes = [f"{len(conn.index)}-{i}".encode() for i in range(len(stored))]
    for h, kind in zip(hashes, stored):
        conn.index.allocate(h, has_activations=kind == "a")
    request = SimpleNamespace(request_id=hashes[0], block_hashes=hashes, num_tokens=4 * len(stored) + 1)
    tokens, _ = conn.get_num_new_matched_tokens(request, 0)
    return tokens // 4, hashes


def test_activations_only_blocks_are_restored_only_as_a_leading_run_within_staging():
    """A restore recomputes its first r blocks and streams the rest, so blocks stored without K/V
    (host layout "act") can only be served as its leading run: the hit ends at one that follows
    a block with K/V, and at the one past what this step's staging (max_recompute_tokens, over
    all restores the step offers) can recompute. Those blocks are then vLLM's to compute."""
    from vllm_partial_kv.scheduler import _leading_with_act

    conn = _scheduler_half("act", max_recompute_tokens=3 * 4)
    hits, hashes = _offered(conn, "a", "a", "k", "a", "k")
    assert hits == 3 and conn._forced_blocks == 2  # streams block 2; cannot stream block 3
    # The restore's LoadSpec: its two activations-only blocks must be recomputed.
    entries = conn.index.pin(hashes[:hits])
    assert _leading_with_act(entries, without_kv=True) == 2 and _leading_with_act(entries) == 2
    assert _offered(conn, "k", "a", "a")[0] == 1  # a K/V-only block first: nothing more to stream
    assert _offered(conn, "a", "a", "a")[0] == 1  # staging: 3 blocks in all, 2 offered already
    assert _offered(conn, "a")[0] == 0 and conn._forced_blocks == 3
    conn._forced_blocks = 0  # build_connector_meta: the next step has the whole staging again
    assert _offered(conn, "a", "a", "a", "a")[0] == 3
    # "kv+act" keeps the K/V of every block: any split can be streamed, nothing is forced.
    conn = _scheduler_half("kv+act", max_recompute_tokens=4)
    assert _offered(conn, "k", "a", "a", "k", "a")[0] == 5 and conn._forced_blocks == 0


def test_restore_in_act_layout_stops_where_it_could_neither_stream_nor_recompute(tiny_model, make_llm):  # noqa: F811
    """End to end, host layout "act" with staging for 2 blocks: six activations-only blocks are
    restored as far as staging recomputes (2) and vLLM computes the rest; a block stored again
    with K/V in front of activations-only ones is restored alone (streamed). Both give the
    tokens of the run that computed everything, and the restored blocks hold its K/V."""
    llm = make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(
        1.0, host_layout="act", max_recompute_tokens=2 * 32))
    index, runtime = _scheduler_connector(llm).index, _worker().runtime
    allocated, stored = [], []  # block hashes, GPU blocks: in the order they are stored
    allocate, store = index.allocate, runtime.store
    index.allocate = lambda h, with_act: (allocated.append(h), allocate(h, with_act))[1]
    runtime.store = lambda ids, *a: (stored.extend(ids), store(ids, *a))
    sp = SamplingParams(temperature=0, max_tokens=4)
    prompt = _prompt(21, 6 * 32 + 5)
    first = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    original = {n: [v[stored[:6]].clone() for v in runtime.gpu_views[n]] for n in runtime.names}

    def restore(blocks: int, recomputed: int) -> None:
        llm.reset_prefix_cache()
        assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == first
        (load,) = runtime.last_loads
        assert (len(load.block_ids), load.recompute_blocks, load.must_recompute) == (blocks, recomputed, recomputed)
        for name in runtime.names:
            for gpu, kv in zip(runtime.gpu_views[name], original[name]):
                torch.testing.assert_close(gpu[load.block_ids], kv[:blocks], rtol=1e-3, atol=1e-3)

    restore(blocks=2, recomputed=2)
    index.discard(allocated[:1])
    llm.generate([prompt], sp, use_tqdm=False)  # hits the GPU cache, stores block 0 again: K/V only
    assert index.get(allocated[-1]).has_kv and not index.get(allocated[1]).has_kv and allocated[-1] == allocated[0]
    restore(blocks=1, recomputed=0)
    del llm
