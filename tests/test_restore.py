"""The data path on real vLLM (in-process): offload, restore through any split, same K/V and
the same greedy tokens as vLLM without the connector."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
import torch

from vllm import SamplingParams

def _native(arch: str, hf_name: str, *rest):
    """`arch` (and `rest`) as a test parameter, skipped where this vLLM serves `hf_name` by its Transformers
    backend (vLLM 0.32 does so for GPT-NeoX and Phi-2; 0.26 has classes of its own for them)."""
    from vllm.model_executor.models.registry import ModelRegistry

    registered = ModelRegistry.models.get(hf_name)
    native = registered is not None and not registered.module_name.endswith(".transformers")
    return pytest.param(arch, *rest, marks=pytest.mark.skipif(not native, reason=f"this vLLM serves {hf_name} by its "
                                                                            "Transformers backend"))


ARCHS = ["llama", "llama2", "opt", "qwen2", "qwen3", "phi3", "stablelm", "gptj", "gpt2", "bloom", "mixtral"]
ON_0_26 = {"gpt_neox": "GPTNeoXForCausalLM", "phi": "PhiForCausalLM"}
LAYOUTS = ("kv+act", "act", "kv")
# Host layout per family in the two per-family tests, rotated rather than crossed (each family
# starts one engine per test and layout): the K/V test gives every family a recompute ("act":
# all of it; "kv+act": 0, half, all), and the multi-turn test's "act" families are "kv+act" in
# the K/V test, so that they also see a restore split between recompute and copy. Layout "kv"
# runs with ratio "auto" on multi-head families, where only the layout keeps activations out.
KV_TEST_LAYOUT = {"llama": "kv+act", "llama2": "act", "opt": "act", "qwen2": "kv+act", "qwen3": "act",
                  "phi3": "kv+act", "stablelm": "act", "gptj": "kv+act", "gpt2": "kv+act", "bloom": "kv+act",
                  "mixtral": "kv+act", "gpt_neox": "act", "phi": "kv+act"}


@pytest.fixture
def make_llm():
    """conftest's tiny-model LLM; on a GPU in bf16 with torch.compile and CUDA graphs on.

    Callers drop their previous LLM first: an in-process engine torn down after the next one
    started would take the process-wide parallel state with it."""
    from conftest import drop_parallel_groups, make_llm as base

    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown
    def make(model, **kwargs):
        gc.collect()
        ensure_kv_transfer_shutdown()  # a failed test may still hold its engine's connector
        drop_parallel_groups()
        if torch.cuda.is_available():
            kwargs = {"dtype": "bfloat16", "enforce_eager": False, **kwargs}
        return base(model, **kwargs)

    yield make
    # Engines without a connector (other test files) must not find this file's one.
    gc.collect()
    ensure_kv_transfer_shutdown()


def _connector_cfg(ratio, cpu_bytes=256 << 20, **extra):
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="PartialRecomputeConnector",
        kv_role="kv_both",
        kv_connector_extra_config={"cpu_bytes": cpu_bytes, "recompute_ratio": ratio, **extra},
    )


def _ratio(layout: str) -> float | str:
    """Half of each restore recomputed. Host layout "kv" accepts only ratio 0 or "auto"; "auto",
    which keeps activations for multi-head models, shows that the layout keeps none."""
    return "auto" if layout == "kv" else 0.5


def _worker():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().worker


def _kv_bytes(model, tokens: int) -> int:
    """GPU KV cache bytes that hold `tokens` tokens of a tiny model (fp32 on CPU, bf16 on GPU)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)  # maps GPT-2's n_head etc. to the common names
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = 2 if torch.cuda.is_available() else 4
    return tokens * cfg.num_hidden_layers * 2 * heads * head * elem


def _prompt(seed: int, n: int, vocab: int = 1000) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(10, vocab, (n,), generator=g).tolist()}


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


class _InFlight:
    """A restore's event, reported done only after a few more polls."""

    def __init__(self, event) -> None:
        self.event, self.polls = event, 4

    def query(self) -> bool:
        self.polls -= 1
        return self.polls < 0 and (self.event is None or self.event.query())


def _slow_restores(runtime) -> None:
    """Asynchronous restores stay in flight for a few more steps than they take."""
    load = runtime.load
    runtime.load = lambda loads, wait: _InFlight(load(loads, wait))


def _scheduler_connector(llm):
    return _scheduler(llm).connector.scheduler


def _fp8_cache_available() -> bool:
    return torch.cuda.is_available() or torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()


_FP8_CACHE = pytest.mark.skipif(not _fp8_cache_available(), reason="vLLM's CPU attention needs AVX-512 or AMX for "
                                                                   "fp8 caches")


@pytest.mark.parametrize("arch,async_load,eager,kv_dtype,layout,host_format", [
    (a, True, True, "auto", KV_TEST_LAYOUT[a], "auto") for a in ARCHS] + [
    _native(arch, hf_name, True, True, "auto", KV_TEST_LAYOUT[arch], "auto") for arch, hf_name in ON_0_26.items()] + [
    ("llama2", False, True, "auto", "kv+act", "auto"),
    ("llama2", False, True, "auto", "act", "auto"),
    ("llama2", True, True, "auto", "kv", "auto"),
    pytest.param("qwen3", True, False, "auto", "kv+act", "auto", id="qwen3-compiled", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="on a GPU every case runs compiled")),
    pytest.param("llama2", True, True, "fp8", "kv+act", "auto", id="llama2-fp8", marks=_FP8_CACHE),
    # The fp8 host store: multi-head K/V and rows, grouped-query with a QKV bias all recomputed
    # (waited for per layer), grouped-query K/V only, and over an fp8 cache (K/V as they are).
    pytest.param("llama2", True, True, "auto", "kv+act", "fp8", id="llama2-fp8-store"),
    pytest.param("qwen2", False, True, "auto", "act", "fp8", id="qwen2-fp8-store-act"),
    pytest.param("llama", True, True, "auto", "kv", "fp8", id="llama-fp8-store-kv"),
    pytest.param("llama2", True, True, "fp8", "kv+act", "fp8", id="llama2-fp8-cache-fp8-store", marks=_FP8_CACHE),
])
def test_restored_kv_equals_original(arch, async_load, eager, kv_dtype, layout, host_format, tiny_model, make_llm):
    """Restored blocks hold the K/V vLLM wrote, for r = 0, middle, n in host layout "kv+act"; in
    "act" the host has no K/V for them, so even at ratio 0 every block is recomputed; "kv" keeps
    no activations and streams. On the CPU the cases run eager, and one under vLLM's
    torch.compile: the capture op must survive it. An fp8 cache (vLLM allocates it as bytes) is
    compared as the fp8 numbers its backend reads. The fp8 host store gives them back within its
    format's rounding (`_restored_kv_error`); over an fp8 cache, streamed K/V are bit-identical."""
    from torch._dynamo.utils import counters

    compiled = {} if eager else {"enforce_eager": False}
    graphs = counters["stats"]["unique_graphs"]
    cfg = _connector_cfg(_ratio(layout), async_load=async_load, host_layout=layout, host_format=host_format)
    llm = make_llm(tiny_model(arch), kv_transfer_config=cfg, kv_cache_dtype=kv_dtype, **compiled)
    assert eager or counters["stats"]["unique_graphs"] > graphs, "Dynamo traced no graph: the model was not compiled"
    worker = _worker()
    runtime = worker.runtime
    assert worker.with_act == (layout != "kv")
    scheduler = _scheduler_connector(llm)
    finished = []  # asynchronous loads the worker reported done, as the scheduler saw them
    update = scheduler.update_connector_output
    scheduler.update_connector_output = lambda out: (finished.extend(out.finished_recving or ()), update(out))
    # A store may still be reading the blocks a restore writes: the step's fence must cover them.
    fenced, unfenced, stored = [], [], []
    handle, load_fn, store = worker.handle_preemptions, runtime.load, runtime.store
    worker.handle_preemptions = lambda meta: (fenced.append(set(meta.new_block_ids)), handle(meta))
    runtime.load = lambda loads, *a: (
        unfenced.extend(b for spec in loads for b in spec.block_ids if b not in fenced[-1]),
        load_fn(loads, *a),
    )[1]
    runtime.store = lambda ids, *a: (stored.extend(ids), store(ids, *a))
    prompt = _prompt(1, 9 * 32 + 5)
    sp = SamplingParams(temperature=0, max_tokens=4)
    first = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    # The K/V vLLM wrote (layout "act" has no host copy of it to compare with).
    original = {n: [v[stored[:9]].clone() for v in runtime.gpu_views[n]] for n in runtime.names}
    # "act": ratio 0 alone shows the forced recompute (any ratio recomputes every block).
    for ratio in (0.0, 0.5, 1.0) if layout == "kv+act" else (0.0,):
        worker.cfg = worker.cfg.__class__(**{**worker.cfg.__dict__, "recompute_ratio": ratio})
        llm.reset_prefix_cache()  # drop the GPU copies; the CPU store keeps them
        again = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert list(again) == list(first)
        (load,) = runtime.last_loads
        assert len(load.block_ids) == 9
        assert load.must_recompute == (9 if layout == "act" else 0)
        assert abs(load.recompute_blocks - (1.0 if layout == "act" else ratio) * 9) <= 0.5
        assert fenced and not unfenced
        if async_load:  # the request waited for its load outside any forward
            assert runtime.last_waited == [] and len(finished) == 1
            assert not scheduler._in_flight and not worker._loading
            finished.clear()
        else:  # vLLM's forward waited for each restored layer just before its attention, in order
            assert runtime.last_waited == runtime.names and runtime.layerwise
            assert finished == []
        worst, tol = _restored_kv_error(runtime, load, kv_dtype, original)
        assert worst < tol, f"ratio {ratio}: relative K/V error {worst}"
        if host_format == "fp8" and kv_dtype == "fp8" and ratio == 0.0:  # stored as they are
            assert worst == 0.0
    # Corrupting one activation row must show up in the recomputed K/V: the check can fail.
    if layout != "kv":
        assert _corrupted_row_shows(llm, runtime, prompt, sp, kv_dtype, original) > 1e-2


def _restored_kv_error(runtime, load, kv_dtype: str, original: dict | None = None) -> tuple[float, float]:
    """Worst relative error of a restore's blocks over all layers against `original` (per layer,
    per K/V view: the blocks in load order) or else their host copies, and the tolerance of the
    cache's dtype (also used by benchmarks/acceptance_checks.py)."""
    worst = 0.0
    for name in runtime.names:
        for i, gpu in enumerate(runtime.gpu_views[name]):
            restored = _numbers(gpu[load.block_ids], kv_dtype).cpu()
            host = original[name][i] if original is not None else runtime.pool.kv[name][i][load.slots]
            expected = _numbers(host, kv_dtype).cpu()
            worst = max(worst, ((restored - expected).norm() / expected.norm()).item())
    dtype = runtime.gpu_views[runtime.names[0]][0].dtype
    if dtype == torch.uint8:
        return worst, 0.1
    if runtime.pool.format == "fp8":
        # e4m3 keeps 3 mantissa bits: rounding moves a value by at most 2**-4 of it (every row's
        # scale puts its largest element at 448, so the rest stay in the normal range), and so a
        # streamed block; recomputed K/V inherit that relative error from their fp8 input rows.
        return worst, 2**-4
    return worst, 1e-3 if dtype == torch.float32 else 1e-2


def _corrupted_row_shows(llm, runtime, prompt: dict, sp, kv_dtype: str, original: dict | None = None) -> float:
    """Adds 1 to the host activation row of the first restored token and restores again (with the
    ratio set to recompute it): how far its recomputed K/V moved from the original (`original`
    as for `_restored_kv_error`, else the host copy)."""
    name = runtime.names[0]
    if runtime.pool.act_scale:  # fp8 rows: double the row through its scale
        runtime.pool.act_scale[name][runtime.last_loads[0].slots[0]] *= 2.0
    else:
        runtime.pool.act[name][runtime.last_loads[0].slots[0]] += 1.0
    llm.reset_prefix_cache()
    llm.generate([prompt], sp, use_tqdm=False)
    (load,) = runtime.last_loads
    gpu = runtime.gpu_views[name][0]
    expected = runtime.pool.kv[name][0][load.slots[0]] if original is None else original[name][0][0]
    diff = _numbers(gpu[load.block_ids[0]], kv_dtype).cpu() - _numbers(expected, kv_dtype).cpu()
    return diff.abs().max().item()


def _numbers(t: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """Cache contents as float64; fp8 caches (uint8 tensors) as the fp8 values they hold."""
    if t.dtype == torch.uint8:
        t = t.view(torch.float8_e5m2 if kv_dtype == "fp8_e5m2" else torch.float8_e4m3fn)
    return t.double()


def _watch_fences(llm) -> dict:
    """Checks every step's fence list against what the step writes: each newly allocated block
    that vLLM's forward or a restore writes must be fenced; prefix-cache hits need not be."""
    from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data

    core = _scheduler(llm)
    connector, seen = core.connector.scheduler, {"unfenced": set(), "skipped": 0}
    build = connector.build_connector_meta

    def checked(scheduler_output):
        meta = build(scheduler_output)
        fence, bs = set(meta.new_block_ids), connector.block_size
        written = {b for spec in meta.loads for b in spec.block_ids}
        for req_id, new_ids, _ in yield_req_data(scheduler_output):
            if new_ids is None:
                continue
            req, new = core.requests[req_id], set(new_ids[0])
            first = req.num_computed_tokens // bs  # still before this step
            last = -(-(req.num_computed_tokens + scheduler_output.num_scheduled_tokens[req_id]) // bs)
            written |= set(core.kv_cache_manager.get_block_ids(req_id)[0][first:last]) & new
            seen["skipped"] += len(new - fence)
        seen["unfenced"] |= written - fence
        return meta

    connector.build_connector_meta = checked
    return seen


_BASELINES: dict[tuple, list] = {}


def _baseline(make_llm, model, run: Callable, *args, **engine) -> list:
    """`run(llm, *args)` on vLLM without the connector, once per model, run, arguments and engine
    settings: the cases of a test parametrized by host layout (and tests with the same
    workload) share one baseline engine."""
    key = (str(model), run.__name__, repr(args), repr(sorted(engine.items())))
    if key not in _BASELINES:
        base = make_llm(model, **engine)
        _BASELINES[key] = run(base, *args)
        del base
    return _BASELINES[key]


def _greedy(llm, prompts: list[dict], sp) -> list:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def _conversations(llm, n_conv: int, turns: int, sp) -> list[list[int]]:
    """Interleaved multi-turn conversations: each turn re-sends the whole history."""
    histories = [_prompt(100 + c, 700)["prompt_token_ids"] for c in range(n_conv)]
    outputs: list[list[int]] = [[] for _ in range(n_conv)]
    for turn in range(turns):
        for c in range(n_conv):
            out = llm.generate([{"prompt_token_ids": histories[c]}], sp, use_tqdm=False)
            tokens = list(out[0].outputs[0].token_ids)
            outputs[c] += tokens
            histories[c] = histories[c] + tokens + _prompt(1000 * turn + c, 40)["prompt_token_ids"]
    return outputs


EVERY_RATIO = (0.0, 0.5, 1.0, "auto")
GQA = ("qwen3", "mixtral")  # auto mode keeps no activations for them


@pytest.mark.parametrize("arch,ratios,layout", [("llama2", EVERY_RATIO, "kv+act"), ("qwen3", EVERY_RATIO, "kv+act"),
                                                ("mixtral", (0.5,), "kv+act"), ("phi3", (0.5,), "act"),
                                                ("stablelm", ("auto",), "kv"), ("gptj", (0.5,), "act"),
                                                ("gpt2", ("auto",), "kv"), ("bloom", (0.5,), "act")]
                         + [_native("gpt_neox", ON_0_26["gpt_neox"], (0.5,), "kv+act"),
                            _native("phi", ON_0_26["phi"], ("auto",), "kv")])
def test_multi_turn_same_tokens_under_eviction(arch, ratios, layout, tiny_model, make_llm):
    """A GPU cache of ~2 conversations forces eviction; later turns restore from the CPU. Every
    family once, in one host layout (rotated: see KV_TEST_LAYOUT), with half of each restore
    recomputed where it keeps activations; two of them at every ratio. In "act" the restores
    recompute what they must. Runs with the capture hooks get a torch.compile cache key of
    their own (vLLM's key leaves out the connector's config: a hooked run must never load a
    graph compiled without the capture op)."""
    sp = SamplingParams(temperature=0, max_tokens=24)
    model = tiny_model(arch)
    small = dict(kv_cache_memory_bytes=_kv_bytes(model, 2048), max_model_len=1024)
    baseline = _baseline(make_llm, model, _conversations, 4, 3, sp, **small)
    keys: dict[bool, set[str]] = {False: set(), True: set()}  # by "capture hooks installed"
    for ratio in ratios:
        llm = make_llm(model, **small, kv_transfer_config=_connector_cfg(ratio, host_layout=layout))
        fences = _watch_fences(llm)
        loads = _watch_loads()
        assert _conversations(llm, 4, 3, sp) == baseline, f"ratio {ratio}"
        assert not fences["unfenced"] and fences["skipped"] > 0, fences
        totals, hooked, key = _worker().totals.data, _worker().with_act, _compile_key(llm)
        del llm
        assert totals["tokens_loaded"] > 0
        # GQA in auto mode keeps no activations at all, nor does layout "kv": plain KV offload.
        assert hooked == (layout != "kv" and ratio != 0.0 and (ratio != "auto" or arch not in GQA))
        keys[hooked].add(key)
        if not hooked:
            assert totals["tokens_recomputed"] == 0, f"ratio {ratio}: {totals}"
        elif ratio != "auto":  # auto on MHA depends on this machine's measured profile
            assert totals["tokens_recomputed"] > 0, f"ratio {ratio}: {totals}"
        assert any(spec.must_recompute for spec in loads) == (layout == "act"), loads
    assert all(len(k) <= 1 for k in keys.values()) and not keys[False] & keys[True], keys


def _watch_loads() -> list:
    """Every LoadSpec the worker restores from now on (the engine's latest connector)."""
    runtime, loads = _worker().runtime, []
    load = runtime.load
    runtime.load = lambda specs, *a: (loads.extend(specs), load(specs, *a))[1]
    return loads


def _compile_key(llm) -> str:
    """The config hash vLLM names the model's torch.compile caches by (AOT and backend), from
    the config the model was built with, in the worker."""

    def key(self) -> str:
        from vllm_partial_kv import compat

        worker = getattr(self, "worker", self)
        # A model class without vLLM's compile decorator (StableLM on 0.26) keeps no config of its own.
        configs = (m.vllm_config for m in worker.model_runner.get_model().modules() if hasattr(m, "vllm_config"))
        return compat.compile_key(next(configs, worker.vllm_config))

    return llm.collective_rpc(key)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_preemption_storm_same_tokens(layout, tiny_model, make_llm):
    """More concurrent sequences than the GPU cache holds: preempted requests resume from the
    CPU store instead of recomputing, with the same tokens, in every host layout ("act": the
    resumed blocks are recomputed, as they must be)."""
    model = tiny_model("llama2")
    # Requests are admitted by prompt size and then grow 3x: running ones get preempted.
    sp = SamplingParams(temperature=0, max_tokens=288)
    prompts = [_prompt(200 + i, 300) for i in range(8)]
    small = dict(kv_cache_memory_bytes=_kv_bytes(model, 1536), max_model_len=1024)
    expected = _baseline(make_llm, model, _greedy, prompts, sp, **small)
    llm = make_llm(model, **small, kv_transfer_config=_connector_cfg(_ratio(layout), host_layout=layout))
    fences = _watch_fences(llm)
    loads = _watch_loads()
    assert _worker().with_act == (layout != "kv")
    # Stores run beside later steps on a GPU: vLLM must fence every reallocated block first.
    runtime, stored, fenced = _worker().runtime, set(), set()
    store, fence = runtime.store, runtime.fence_blocks
    runtime.store = lambda ids, *a: (stored.update(ids), store(ids, *a))
    runtime.fence_blocks = lambda ids: (fenced.update(set(ids) & stored), fence(ids))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    totals = _worker().totals.data
    del llm, runtime
    assert got == expected
    assert totals["tokens_loaded"] > 0 and (totals["tokens_recomputed"] > 0) == (layout != "kv"), totals
    assert any(spec.must_recompute for spec in loads) == (layout == "act"), loads
    assert fenced, "no stored block was seen again before reuse: is handle_preemptions called?"
    assert not fences["unfenced"], fences


@pytest.mark.parametrize("layout", ["kv+act", "act"])
def test_full_store_keeps_serving(layout, tiny_model, make_llm):
    """A CPU store far smaller than the traffic evicts and keeps giving the right tokens; in host
    layout "act" each kind of slot (K/V, activations only) evicts its own."""
    model = tiny_model("llama2")
    sp = SamplingParams(temperature=0, max_tokens=24)
    small = dict(kv_cache_memory_bytes=_kv_bytes(model, 2048), max_model_len=1024)
    baseline = _baseline(make_llm, model, _conversations, 4, 3, sp, **small)
    llm = make_llm(model, **small, kv_transfer_config=_connector_cfg(1.0, cpu_bytes=6 << 20, host_layout=layout))
    runtime, batches = _worker().runtime, []
    store = runtime.store
    # A slot is its number and its kind: "act" numbers activations-only slots apart.
    runtime.store = lambda ids, slots, capture, kv: (batches.append(list(zip(slots, kv))),
                                                     store(ids, slots, capture, kv))
    assert _conversations(llm, 4, 3, sp) == baseline
    scheduler_index = _scheduler_connector(llm).index
    assert scheduler_index.evictions > 0
    # A step storing more blocks than the store has free slots must not evict its own earlier
    # blocks: two copies into one slot in one batch run in no defined order on a GPU.
    assert max(map(len, batches)) > max(scheduler_index.num_slots, scheduler_index.act_slots) // 2
    assert all(len(set(b)) == len(b) for b in batches), [b for b in batches if len(set(b)) < len(b)]
    assert any(not kv for b in batches for _, kv in b) == (layout == "act")


def test_bad_config_is_rejected_at_startup(tiny_model, make_llm):
    with pytest.raises(Exception, match="recompute_ratio"):
        make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(1.5))
    with pytest.raises(Exception, match="max_recompute_tokens=16 is less than one block"):
        make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(0.5, max_recompute_tokens=16))
    with pytest.raises(Exception, match="unknown kv_connector_extra_config"):
        make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(0.5, bogus=1))


def test_no_room_for_the_store_is_a_clear_startup_error(tiny_model, make_llm, monkeypatch):
    """128 MiB free: room for the buffers made at model load (about 50 MiB), not for the 256 MiB
    store allocated once vLLM made its KV cache; 1 MiB: not even for those buffers."""
    from vllm_partial_kv import store

    monkeypatch.setattr(store, "available_bytes", lambda device: 128 << 20)
    with pytest.raises(Exception, match=r"partial_kv needs 0\.2[5-9] GiB of cpu memory .*cpu_bytes"):
        make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(0.5))
    monkeypatch.setattr(store, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(Exception, match=r"partial_kv needs 0\.0[0-9] GiB of .* memory"):
        make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(0.5))


@pytest.mark.parametrize("async_load,policy,layout", [(True, "recompute", "kv+act"), (False, "recompute", "kv+act"),
                                                     (False, "fail", "kv+act"), (True, "recompute", "act"),
                                                     (False, "fail", "act"), (False, "recompute", "kv")])
def test_failed_restore_costs_the_request_not_the_engine(async_load, policy, layout, tiny_model, make_llm):
    """A restore that raises is reported to vLLM as a KV load error: with the "recompute" policy
    vLLM recomputes the blocks and the answer does not change; with "fail" only that request
    fails; the engine keeps serving. The failed entries are dropped (an asynchronous load is not
    retried forever), and so is what the failing step stored after them (computed from
    unrestored K/V), also when vLLM has already failed the request (it does so before it tells
    the connector which blocks failed). In every host layout ("act": the dropped blocks are
    stored again without K/V and the last restore must recompute them)."""
    # Off the GPU (fp32) a non-peaked model, whose tokens depend on every block's K/V; in bf16 its
    # near-ties would flip between runs, so the GPU run checks with the peaked one.
    model = tiny_model("llama2", peaked=torch.cuda.is_available())
    prompt, sp = _prompt(3, 6 * 32 + 7), SamplingParams(temperature=0, max_tokens=8)
    longer = {"prompt_token_ids": prompt["prompt_token_ids"] + _prompt(4, 40)["prompt_token_ids"]}
    expected = _baseline(make_llm, model, _greedy, [prompt, longer], sp)
    cfg = _connector_cfg(_ratio(layout), async_load=async_load, host_layout=layout)
    cfg.kv_load_failure_policy = policy
    llm = make_llm(model, kv_transfer_config=cfg)
    runtime = _worker().runtime
    assert _worker().with_act == (layout != "kv")
    assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected[0]

    def broken(loads, wait="none"):
        raise RuntimeError("injected restore failure")

    runtime.load = broken
    llm.reset_prefix_cache()  # the next turn must restore from the host, and that fails
    for cache in runtime.kv_caches.values():  # so that unrecomputed blocks cannot pass as right
        cache.normal_(0, 10)
    # Restores the prompt's 6 blocks (fails) and, synchronously, computes and stores block 7.
    out = llm.generate([longer], sp, use_tqdm=False)[0].outputs[0]
    if policy == "recompute":
        assert out.token_ids == expected[1]
    else:
        assert out.finish_reason == "error"
    assert _worker().totals.data["restore_failures"] == 1
    del runtime.load  # restores work again
    if policy == "fail":  # the prompt's blocks computed again, on the GPU: only block 7 from the host
        assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected[0]
        assert llm.generate([longer], sp, use_tqdm=False)[0].outputs[0].token_ids == expected[1]
    llm.reset_prefix_cache()
    assert llm.generate([longer], sp, use_tqdm=False)[0].outputs[0].token_ids == expected[1]
    (load,) = runtime.last_loads
    assert len(load.block_ids) == 7 and (load.recompute_blocks > 0) == (layout != "kv")
    assert (load.must_recompute > 0) == (layout == "act")


@pytest.mark.parametrize("layout", ["kv+act", "act"])
def test_restored_blocks_stored_again_keep_no_stale_activations(layout, tiny_model, make_llm):
    """A restore writes K/V, not the blocks' activation rows. If another request later stores
    those GPU blocks again (their host copies evicted meanwhile), it must not keep those rows.
    In host layout "act" they are stored with K/V then, and the new last block without: a
    restore cannot stream it after them (it would have to recompute it), so it restores the
    first six and vLLM computes the seventh."""
    llm = make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(1.0, host_layout=layout))
    runtime = _worker().runtime
    index = _scheduler_connector(llm).index
    sp = SamplingParams(temperature=0, max_tokens=4)
    prompt = _prompt(5, 6 * 32 + 3)
    longer = {"prompt_token_ids": prompt["prompt_token_ids"] + _prompt(6, 40)["prompt_token_ids"]}
    llm.generate([prompt], sp, use_tqdm=False)
    llm.reset_prefix_cache()
    llm.generate([prompt], sp, use_tqdm=False)  # restored from the host into GPU blocks
    for rows in runtime.act_views.values():  # rows a restore never wrote: make them visibly wrong
        rows.normal_(0, 10)
    index.clear()  # host copies gone; the GPU prefix cache still holds the restored blocks
    llm.generate([longer], sp, use_tqdm=False)  # hits them on the GPU and stores them again
    llm.reset_prefix_cache()
    llm.generate([longer], sp, use_tqdm=False)  # restores them from the host
    (load,) = runtime.last_loads
    assert len(load.block_ids) == (7 if layout == "kv+act" else 6) and load.recompute_blocks == 0  # K/V: streamed
    for name in runtime.names:
        for gpu, host in zip(runtime.gpu_views[name], runtime.pool.kv[name]):
            torch.testing.assert_close(gpu[load.block_ids], host[load.slots], rtol=1e-3, atol=1e-3)


def test_connector_reset_empties_the_host_store(tiny_model, make_llm):
    """reset_prefix_cache(reset_connector=True), as after a weight update, drops every host copy,
    as vLLM's own offloading does: the next turn is computed again, not restored, and stored anew."""
    llm = make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(0.5))
    index = _scheduler_connector(llm).index
    sp = SamplingParams(temperature=0, max_tokens=4)
    prompt = _prompt(7, 4 * 32 + 3)
    expected = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    stored = len(index)
    assert stored >= 4 and llm.reset_prefix_cache(reset_connector=True) and len(index) == 0
    assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert _worker().totals.data["tokens_loaded"] == 0 and len(index) == stored


def _run_until_idle(engine, prefix: str, before_step=lambda: None) -> list[int] | None:
    """Steps the engine until it has nothing left to do; the tokens of request `prefix`."""
    got = None
    for _ in range(200):
        before_step()
        for out in engine.step():
            if out.finished and out.request_id.startswith(prefix):
                got = list(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            return got
    raise AssertionError("the engine was still busy after 200 steps")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_async_restore_lets_other_requests_run_and_survives_an_abort(layout, tiny_model, make_llm):
    """While a restore is in flight, its request waits and the others keep decoding; its host
    entries stay pinned until the worker reports the load done, even when the request is
    aborted meanwhile; the restored request then gives the same tokens, in every host layout."""
    from vllm.v1.request import RequestStatus

    llm = make_llm(tiny_model("llama2"), kv_transfer_config=_connector_cfg(_ratio(layout), host_layout=layout))
    worker, scheduler = _worker(), _scheduler_connector(llm)
    engine, runtime = llm.llm_engine, worker.runtime
    assert worker.with_act == (layout != "kv")
    core = _scheduler(llm)
    sp = SamplingParams(temperature=0, max_tokens=6)
    prompt, other = _prompt(7, 6 * 32 + 5), _prompt(8, 40)
    expected = list(llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids)

    _slow_restores(runtime)

    def request(prefix: str):
        return next((r for rid, r in core.requests.items() if rid.startswith(prefix)), None)

    # 1. The other request decodes while the restoring one waits for its load.
    llm.reset_prefix_cache()
    engine.add_request("restoring", prompt, sp)
    engine.add_request("other", other, SamplingParams(temperature=0, max_tokens=40))
    progress = set()

    def observe() -> None:
        waiting = request("restoring")
        if waiting is None or waiting.status != RequestStatus.WAITING_FOR_REMOTE_KVS:
            return
        if waiting.request_id not in core.finished_recving_kv_req_ids:
            assert scheduler._in_flight  # its host entries are pinned until the load is done
        progress.add(request("other").num_output_tokens)

    assert _run_until_idle(engine, "restoring", observe) == expected
    assert len(progress) >= 3, f"the other request did not decode during the restore: {progress}"
    assert runtime.last_loads[0].must_recompute == (6 if layout == "act" else 0)
    assert not scheduler._in_flight and not worker._loading

    # 2. Aborted while its load is in flight: pins and blocks are kept until the load is done.
    llm.reset_prefix_cache()
    engine.add_request("aborted", prompt, sp)
    engine.step()
    assert request("aborted").status == RequestStatus.WAITING_FOR_REMOTE_KVS
    pinned = [e for entries in scheduler._in_flight.values() for e in entries]
    engine.abort_request([request("aborted").request_id])
    assert pinned and all(e.pins > 0 for e in pinned)
    # The engine keeps serving; the next steps report the load done and release everything.
    engine.add_request("after", prompt, sp)
    assert _run_until_idle(engine, "after") == expected
    assert not scheduler._in_flight
    assert all(e.pins == 0 for e in scheduler.index._entries.values())


def test_the_cli_profile_is_the_one_the_server_loads(tiny_model, make_llm, tmp_path, monkeypatch):
    """`vllm-partial-kv profile` (same flags as the server) measures ahead of serving what the
    connector would measure at start-up: the server then finds both profiles and measures nothing."""
    from vllm_partial_kv.cli import main

    monkeypatch.setenv("VLLM_PARTIAL_KV_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama2")
    assert main(["profile", str(model), "--device", "cpu", "--block-size", "32", "--dtype", "float32"]) == 0
    measured = {p: p.stat().st_mtime_ns for p in tmp_path.glob("profile-*.json")}
    assert len(measured) == 2  # idle and busy
    make_llm(model, kv_transfer_config=_connector_cfg("auto"))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("profile-*.json")} == measured
