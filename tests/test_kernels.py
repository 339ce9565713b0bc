"""recompute_kv (Triton and torch backends) against a float64 oracle, on every cache layout the
callers pass. Without CUDA the Triton kernel runs in the interpreter on tiny shapes; the `gpu`
cases run the compiled kernel at real layer shapes."""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, replace

import pytest
import torch

from vllm_partial_kv.kernels import recompute_kv, recompute_kv_torch, triton_recompute  # TRITON_INTERPRET: conftest
from vllm_partial_kv.kernels.reference import FP8_DTYPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = 7.0  # exactly representable in every cache dtype, far outside the written values
MAX_POSITION = 2048
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass(frozen=True)
class Case:
    T: int
    hidden: int
    heads: int
    head_size: int
    block_size: int = 16
    layout: str = "flash"  # flash | flashinfer | cpu
    rope: str | None = "neox"  # neox | gptj | None
    rotary_dim: int | None = None  # None: head_size
    bias: bool = False
    knorm: bool = False
    dtype: torch.dtype = torch.float32
    cache_dtype: torch.dtype | None = None  # None: dtype
    q_heads: int = 0  # > 0: w_k / w_v are row slices of a merged QKV weight with padded rows
    skip_every: int = 0  # > 0: every n-th slot is -1
    x_padded: bool = False  # x is a column slice (row stride != hidden)
    index_dtype: torch.dtype = torch.int64  # of slot_mapping and positions
    x_fp8: bool = False  # x holds fp8 rows with one scale each (the fp8 host store), outlier channels


def make_caches(case: Case, num_blocks: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V views exactly as the attention backends lay them out, poisoned with SENTINEL."""
    bs, h, d = case.block_size, case.heads, case.head_size
    if case.layout == "flash":
        kv = torch.full((2, num_blocks, bs, h, d), SENTINEL, dtype=dtype, device=DEVICE)
        return kv[0], kv[1]
    if case.layout == "flashinfer":
        kv = torch.full((num_blocks, 2, bs, h, d), SENTINEL, dtype=dtype, device=DEVICE)
        return kv[:, 0], kv[:, 1]
    kv = torch.full((num_blocks, h, bs, 2 * d), SENTINEL, dtype=dtype, device=DEVICE)
    return kv[..., :d].permute(0, 2, 1, 3), kv[..., d:].permute(0, 2, 1, 3)


def cos_sin_cache(rotary_dim: int, dtype: torch.dtype) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.outer(torch.arange(MAX_POSITION, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=dtype, device=DEVICE)


def make_inputs(case: Case, seed: int) -> dict:
    """Fresh random inputs; K and V come out O(1) so SENTINEL never collides with a written value."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(case.dtype).to(DEVICE)

    kv_dim, hidden = case.heads * case.head_size, case.hidden
    x = randn(case.T, hidden + 16)[:, :hidden] if case.x_padded else randn(case.T, hidden)
    if case.q_heads:
        q_dim = case.q_heads * case.head_size
        w_qkv = randn(q_dim + 2 * kv_dim, hidden + 8, scale=hidden**-0.5)
        w_k, w_v = w_qkv[q_dim:q_dim + kv_dim, :hidden], w_qkv[q_dim + kv_dim:, :hidden]
    else:
        w_k, w_v = randn(kv_dim, hidden, scale=hidden**-0.5), randn(kv_dim, hidden, scale=hidden**-0.5)
    num_blocks = -(-case.T // case.block_size) + 3
    slots = torch.randperm(num_blocks * case.block_size, generator=g)[: case.T]
    if case.skip_every:
        slots[:: case.skip_every] = -1
    rotary_dim = case.rotary_dim or case.head_size
    extra = {}
    if case.x_fp8:  # activations as the store keeps them: real LLM inputs have channels 100x the rest
        x = x.double()
        x[:, :: max(1, hidden // 4)] *= 100
        scale = x.abs().amax(1).clamp(min=1e-12) / 448
        extra["x_scale"] = scale.float()
        x = (x / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return dict(
        x=x, w_k=w_k, w_v=w_v, **extra,
        slot_mapping=slots.to(DEVICE, case.index_dtype),
        positions=torch.randint(0, MAX_POSITION, (case.T,), generator=g).to(DEVICE, case.index_dtype),
        cos_sin_cache=cos_sin_cache(rotary_dim, case.dtype) if case.rope else None,
        is_neox=case.rope != "gptj",
        b_k=randn(kv_dim, scale=0.5) if case.bias else None,
        b_v=randn(kv_dim, scale=0.5) if case.bias else None,
        k_norm_weight=(1 + randn(case.head_size, scale=0.1)) if case.knorm else None,
        num_blocks=num_blocks,
    )


def check(case: Case, backend: str, seed: int) -> None:
    inputs = make_inputs(case, seed)
    num_blocks = inputs.pop("num_blocks")
    cache_dtype = case.cache_dtype or case.dtype
    fp8 = cache_dtype in FP8_DTYPES
    scale = 0.5 if fp8 else None
    key_cache, value_cache = make_caches(case, num_blocks, cache_dtype)
    recompute_kv(**inputs, key_cache=key_cache, value_cache=value_cache, k_scale=scale, v_scale=scale,
                 backend=backend)

    ref_k, ref_v = make_caches(replace(case, layout="flash"), num_blocks, torch.float64)
    recompute_kv_torch(**inputs, key_cache=ref_k, value_cache=ref_v, compute_dtype=torch.float64)

    slots = inputs["slot_mapping"].long()
    slots = slots[slots >= 0]
    written = torch.zeros(num_blocks, case.block_size, dtype=torch.bool, device=DEVICE)
    written[slots // case.block_size, slots % case.block_size] = True
    wide = (case.dtype, cache_dtype) == (torch.float32, torch.float32)
    tol = 0.1 if fp8 else 1e-3 if wide else 1e-2
    for name, out, ref in (("K", key_cache, ref_k), ("V", value_cache, ref_v)):
        untouched = out[~written].double()
        changed = (untouched != SENTINEL).sum().item()
        assert changed == 0, f"{name}: {changed} values outside the target slots changed"
        if not written.any():
            continue
        got, want = out[written].double() * (scale or 1.0), ref[written]
        rel = ((got - want).norm() / want.norm()).item()
        assert rel <= tol, f"{name}: rel error {rel:.2e} > {tol}"
        row_rel = (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
        assert row_rel.max() <= 4 * tol, f"{name}: slot with rel error {row_rel.max():.2e} (missed write?)"


CASES = {
    "mha_neox_fp32_ragged_hidden": Case(T=37, hidden=160, heads=4, head_size=64),
    "gqa_gptj_bf16_flashinfer_merged": Case(T=50, hidden=256, heads=2, head_size=128, block_size=32,
                                            layout="flashinfer", rope="gptj", dtype=torch.bfloat16, q_heads=8),
    "partial_neox_bias_fp16_cpu_skip": Case(T=23, hidden=64, heads=2, head_size=64, rotary_dim=32, layout="cpu",
                                            bias=True, dtype=torch.float16, skip_every=3, index_dtype=torch.int32),
    "partial_gptj_knorm_fp32_to_bf16": Case(T=17, hidden=128, heads=2, head_size=128, rotary_dim=64,
                                            block_size=32, rope="gptj", knorm=True, cache_dtype=torch.bfloat16),
    "opt_norope_bias_t1_cpu": Case(T=1, hidden=128, heads=4, head_size=64, layout="cpu", rope=None, bias=True,
                                   dtype=torch.bfloat16),
    "qwen3_knorm_bf16_ragged_tile": Case(T=65, hidden=128, heads=2, head_size=128, layout="flashinfer",
                                         knorm=True, dtype=torch.bfloat16, q_heads=4, x_padded=True, skip_every=7,
                                         index_dtype=torch.int32),
    "head256_fp32": Case(T=9, hidden=64, heads=1, head_size=256),
    "head80_padded_partial_neox_knorm": Case(T=20, hidden=64, heads=2, head_size=80, rotary_dim=40, knorm=True,
                                             dtype=torch.bfloat16, layout="cpu"),
    "fp8_cache": Case(T=30, hidden=128, heads=2, head_size=64, dtype=torch.bfloat16, cache_dtype=torch.float8_e4m3fn),
    "fp8_rows_gqa_bf16_merged": Case(T=40, hidden=128, heads=2, head_size=64, dtype=torch.bfloat16, q_heads=4,
                                     x_fp8=True, skip_every=5),
    "fp8_rows_fp16_bias_cpu_to_fp32": Case(T=19, hidden=96, heads=2, head_size=64, layout="cpu", bias=True,
                                           dtype=torch.float16, cache_dtype=torch.float32, x_fp8=True),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str, backend: str) -> None:
    check(CASES[name], backend, seed=zlib.crc32(name.encode()))


def force_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Run the one-pass kernel ("fused") or cuBLAS + the kernel's epilogue ("split"), untimed."""
    launcher = functools.partial(triton_recompute.recompute_kv_triton, mode=mode)
    monkeypatch.setattr(triton_recompute, "recompute_kv_triton", launcher)


def force_config(monkeypatch: pytest.MonkeyPatch, **config) -> None:
    """Launch one given config of the one-pass kernel instead of autotuning (or the interpreter's fixed config)."""
    force_mode(monkeypatch, "fused")
    fixed = triton_recompute._fixed_config
    monkeypatch.setattr(triton_recompute, "_fixed_config", lambda *a: {**fixed(*a), **config})
    monkeypatch.setattr(triton_recompute, "TUNE_MIN_T", 1 << 62)


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.heads % 2 == 0])
def test_two_heads_per_program(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tile of two adjacent KV heads (tuning candidates for large T) on every case it divides."""
    force_config(monkeypatch, HEADS=2)
    check(CASES[name], "triton", seed=zlib.crc32(name.encode()) + 1)


@pytest.mark.parametrize("rows", [triton_recompute.SPLIT_ROWS, 16], ids=["one_gemm", "chunks_of_16"])
@pytest.mark.parametrize("name", list(CASES))
def test_cublas_projection_then_epilogue(name: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split path: torch's GEMM (one for merged-QKV slices, two otherwise) into a workspace, then
    the kernel with PROJECTED set; the workspace is reused for each chunk of `rows` tokens."""
    force_mode(monkeypatch, "split")
    monkeypatch.setattr(triton_recompute, "SPLIT_ROWS", rows)
    check(CASES[name], "triton", seed=zlib.crc32(name.encode()) + 7)


def test_merged_weight_is_one_view_only_when_v_follows_k() -> None:
    w = torch.randn(3 * 64, 32)
    merged = triton_recompute._merged_weight(w[64:128], w[128:])
    assert merged is not None and merged.data_ptr() == w[64:].data_ptr() and torch.equal(merged, w[64:])
    assert triton_recompute._merged_weight(w[128:], w[64:128]) is None  # V before K
    assert triton_recompute._merged_weight(w[:64], w[128:]) is None  # a gap
    assert triton_recompute._merged_weight(w[64:128].clone(), w[128:].clone()) is None  # two tensors


def test_tune_mode_times_each_way_and_keeps_the_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton.testing

    calls = []

    def way(name: str):
        return lambda: calls.append(name)

    fused, split = way("fused"), way("split")
    ms = {fused: 2.0, split: 1.5}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: ms[fn])
    monkeypatch.setattr(triton_recompute, "_modes", {})
    assert triton_recompute._tune_mode(("a", 4096), fused, split) == "split"
    assert calls == ["fused", "split"]  # compiled (and tuned) before timing
    ms[fused] = 1.0
    assert triton_recompute._tune_mode(("a", 8192), fused, split) == "fused"
    assert triton_recompute._modes == {("a", 4096): "split", ("a", 8192): "fused"}


def test_tune_mode_leaves_out_a_way_that_fails(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import triton.testing

    def broken() -> None:
        raise RuntimeError("does not compile here")

    works = lambda: None  # noqa: E731
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: 1.0)
    monkeypatch.setattr(triton_recompute, "_modes", {})
    assert triton_recompute._tune_mode(("b", 1), broken, works) == "split"
    assert triton_recompute._tune_mode(("b", 2), works, broken) == "fused"
    assert "recompute by the one-pass kernel failed" in caplog.text and "does not compile here" in caplog.text
    with pytest.raises(RuntimeError, match="both ways"):
        triton_recompute._tune_mode(("b", 4), broken, broken)


def tma_applies(case: Case) -> bool:
    """What `_tma_eligible` asks of these cases (their strides and bases are all 16-byte aligned)."""
    return case.head_size & (case.head_size - 1) == 0 and not (case.rope == "neox" and case.rotary_dim)


@pytest.mark.parametrize("name, heads", [(name, heads) for name, case in CASES.items() if tma_applies(case)
                                         for heads in (1, 2) if case.heads % heads == 0])
def test_tma_loads(name: str, heads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor-descriptor loads: the zero fill past T and past hidden stands in for the load masks."""
    force_config(monkeypatch, HEADS=heads, TMA=True)
    check(CASES[name], "triton", seed=zlib.crc32(name.encode()) + heads + 1)


def prune_args(**overrides) -> dict:
    """What the autotuner hands `_prune` for a bf16, head-128 layer whose operands allow TMA."""
    return {"x_ptr": torch.empty(0, dtype=torch.bfloat16), "wk_ptr": torch.empty(0, dtype=torch.bfloat16),
            "HEAD_PAD": 128, "num_kv_heads": 8, "t_bucket": 1 << 16,
            "tma_ok": 1, **overrides}


def test_prune_keeps_tma_only_when_eligible() -> None:
    configs = triton_recompute.TUNE_CONFIGS
    assert any(c.kwargs["TMA"] for c in triton_recompute._prune(configs, prune_args()))
    kept = triton_recompute._prune(configs, prune_args(tma_ok=0))
    assert kept and not any(c.kwargs["TMA"] for c in kept)


def _unaligned(rows: int, cols: int) -> torch.Tensor:
    return torch.empty(1 + rows * cols, dtype=torch.bfloat16)[1:].view(rows, cols)  # base 2 bytes off


@pytest.mark.parametrize("change, eligible", [
    ({}, True),
    ({"x": torch.empty(8, 1028, dtype=torch.bfloat16)[:, :1024]}, False),  # row stride of 2056 bytes
    ({"w_v": _unaligned(1024, 1024)}, False),
    ({"head_size": 80}, False),  # padded head (to 128): a program's weight rows are not one box
    ({"rotary_dim": 64}, False),  # partial neox: weight rows loaded permuted
    ({"rotary_dim": 64, "is_neox": False}, True),  # partial GPT-J rotates in place
    ({"rotary_dim": 0}, True),
], ids=["aligned", "x_stride", "w_base", "padded_head", "partial_neox", "partial_gptj", "no_rope"])
def test_tma_eligibility(change: dict, eligible: bool) -> None:
    w = torch.empty(2048, 1024, dtype=torch.bfloat16)
    args = {"x": torch.empty(8, 1024, dtype=torch.bfloat16), "w_k": w[:1024], "w_v": w[1024:], "head_size": 128,
            "head_pad": 128, "rotary_dim": 128, "is_neox": True, **change}
    assert triton_recompute._tma_eligible(**args) is eligible


@pytest.mark.parametrize("rotary_dim, eligible", [(128, 1), (64, 0)])
def test_launcher_tells_the_autotuner_whether_tma_applies(rotary_dim: int, eligible: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`tma_ok` is an autotuning key: a tuned TMA pick must never be reused for operands it cannot load."""
    launches = []
    names = triton_recompute._recompute_kv_kernel.arg_names

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append(dict(zip(names, args)))

    monkeypatch.setattr(triton_recompute, "_tuned_kernel", Recorder())
    monkeypatch.setattr(triton_recompute, "INTERPRET", False)
    case = Case(T=triton_recompute.TUNE_MIN_T, hidden=64, heads=2, head_size=128, rotary_dim=rotary_dim,
                dtype=torch.bfloat16)
    inputs = make_inputs(case, seed=0)
    key_cache, value_cache = make_caches(case, inputs.pop("num_blocks"), torch.bfloat16)
    triton_recompute.recompute_kv_triton(**inputs, key_cache=key_cache, value_cache=value_cache, k_norm_eps=1e-6,
                                         k_scale=None, v_scale=None, mode="fused")
    assert [launch["tma_ok"] for launch in launches] == [eligible]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_slots_skipped_and_empty_input_write_nothing(backend: str) -> None:
    case = Case(T=5, hidden=64, heads=1, head_size=64, skip_every=1)
    check(case, backend, seed=1)
    check(replace(case, T=0, skip_every=0), backend, seed=2)


def _good_args(**overrides) -> dict:
    inputs = make_inputs(Case(T=4, hidden=64, heads=2, head_size=64, dtype=torch.bfloat16), seed=3)
    key_cache, value_cache = make_caches(Case(T=4, hidden=64, heads=2, head_size=64), inputs.pop("num_blocks"),
                                         torch.bfloat16)
    return {**inputs, "key_cache": key_cache, "value_cache": value_cache, **overrides}


@pytest.mark.parametrize("bad, match", [
    (lambda a: {"x": a["x"].float()}, "w_k dtype"),
    (lambda a: {"x": a["x"][:, :32]}, "w_k must be"),
    (lambda a: {"w_v": a["w_v"][:64]}, "w_v must be"),
    (lambda a: {"value_cache": a["value_cache"][:1]}, "value_cache shape"),
    (lambda a: {"key_cache": a["key_cache"].flatten(0, 1)}, "4-D"),
    (lambda a: {"slot_mapping": a["slot_mapping"][:2]}, "slot_mapping must be"),
    (lambda a: {"positions": a["positions"].float()}, "positions must be"),
    (lambda a: {"cos_sin_cache": a["cos_sin_cache"][:, :63]}, "rotary_dim"),
    (lambda a: {"k_norm_weight": torch.ones(32, dtype=torch.bfloat16, device=DEVICE)}, "k_norm_weight"),
    (lambda a: {"b_k": torch.ones(3, dtype=torch.bfloat16, device=DEVICE)}, "b_k"),
    (lambda a: {"key_cache": a["key_cache"].to(torch.int8), "value_cache": a["value_cache"].to(torch.int8)},
     "unsupported cache dtype"),
    (lambda a: {"key_cache": a["key_cache"].to(torch.float8_e4m3fn),
                "value_cache": a["value_cache"].to(torch.float8_e4m3fn)}, "needs k_scale"),
    (lambda a: {"k_scale": 0.5}, "not fp8"),
    (lambda a: {"k_scale": torch.tensor(1.0)}, "Python float"),
    (lambda a: {"value_cache": a["value_cache"].transpose(0, 1).contiguous().transpose(0, 1), "backend": "triton"},
     "equal strides"),
    (lambda a: {"backend": "cuda"}, "backend must be"),
    (lambda a: {"x_scale": torch.ones(4, device=DEVICE)}, "float8_e4m3fn"),
    (lambda a: {"x": a["x"].to(torch.float8_e4m3fn), "x_scale": torch.ones(4, dtype=torch.float64, device=DEVICE)},
     "x_scale must be"),
])
def test_bad_input_raises(bad, match: str) -> None:
    args = _good_args()
    with pytest.raises(ValueError, match=match):
        recompute_kv(**{**args, **bad(args)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs CUDA"):
        recompute_kv(**_good_args(backend="triton"))


GPU_CASES = {
    "mha7b_t1": Case(T=1, hidden=4096, heads=32, head_size=128, dtype=torch.bfloat16),
    "gqa8b_t4097_flashinfer": Case(T=4097, hidden=4096, heads=8, head_size=128, layout="flashinfer",
                                   dtype=torch.bfloat16, q_heads=32, skip_every=5),
    "mha7b_t16384": Case(T=16384, hidden=4096, heads=32, head_size=128, dtype=torch.bfloat16),
    "qwen3_knorm_gptj_bias_t3000": Case(T=3000, hidden=4096, heads=8, head_size=128, knorm=True, bias=True,
                                        rope="gptj", dtype=torch.bfloat16, block_size=32),
    "fp8_t2048": Case(T=2048, hidden=4096, heads=8, head_size=128, dtype=torch.bfloat16,
                      cache_dtype=torch.float8_e4m3fn),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", [None, "fused", "split"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_real_shapes(name: str, mode: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways and the pick timed between them (as at start-up)."""
    launcher = functools.partial(triton_recompute.recompute_kv_triton, mode=mode, tune=True)
    monkeypatch.setattr(triton_recompute, "recompute_kv_triton", launcher)
    check(GPU_CASES[name], "triton", seed=zlib.crc32(name.encode()))


EVERY_CONFIG_CASE = Case(T=1000, hidden=1024, heads=8, head_size=128, layout="flashinfer", bias=True, knorm=True,
                         dtype=torch.bfloat16, q_heads=16, skip_every=9)
KEPT_CONFIGS = triton_recompute._prune(triton_recompute.TUNE_CONFIGS,
                                       prune_args(num_kv_heads=EVERY_CONFIG_CASE.heads))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("index", range(len(KEPT_CONFIGS)))
def test_gpu_every_tuning_config(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The autotuner only returns its fastest config; each one it may pick must be right."""
    config = KEPT_CONFIGS[index]
    force_config(monkeypatch, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    check(EVERY_CONFIG_CASE, "triton", seed=index)


def test_every_tuning_config_survives_pruning_for_head_128() -> None:
    """Keeps the GPU test above honest: the shape it runs prunes nothing away."""
    assert len(KEPT_CONFIGS) == len(triton_recompute.TUNE_CONFIGS)
