"""The fp8 host store's numbers: block quantize/dequantize kernels (Triton under TRITON_INTERPRET,
and torch) against a float64 reference on every cache layout, and the accuracy of K/V restored from
the fp8 store against vLLM's own fp8 KV cache (per-tensor scale 1.0, its default without
checkpoint scales) on the same tensors."""

from __future__ import annotations

import functools

import pytest
import torch

from test_kernels import DEVICE, SENTINEL, Case, make_caches
from vllm_partial_kv.kernels import recompute_kv
from vllm_partial_kv.kernels.quant import (
    FP8, FP8_MAX, dequantize_blocks, dequantize_rows, describe_path, quantize_blocks,
)
from vllm_partial_kv.kernels.reference import to_cache_dtype


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: (e4m3 values as float64, scales) per row of the last dim."""
    x = x.double()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, (amax / FP8_MAX).float().double(), torch.ones_like(amax))
    return (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).double(), scale


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout,dtype,heads,head", [
    ("flash", torch.bfloat16, 2, 64), ("flashinfer", torch.float16, 4, 80), ("cpu", torch.float32, 1, 128),
])
def test_blocks_round_trip_through_fp8(backend: str, layout: str, dtype: torch.dtype, heads: int, head: int) -> None:
    case = Case(T=1, hidden=64, heads=heads, head_size=head, layout=layout)
    g = torch.Generator().manual_seed(heads * head)
    src_k, _ = make_caches(case, 6, dtype)
    values = torch.randn(src_k.shape, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, heads)[:, None]
    values[2, 3] = 0  # an all-zero row of every head: scale 1, values 0
    src_k.copy_(values.to(dtype))
    ids = torch.tensor([4, 2, 0], device=DEVICE)
    q = torch.empty(3, *src_k.shape[1:], dtype=FP8, device=DEVICE)
    scale = torch.empty(3, *src_k.shape[1:3], device=DEVICE)
    quantize_blocks(src_k, ids, q, scale, backend=backend)

    want_q, want_scale = reference_quantize(src_k[ids])
    assert torch.equal(scale.double(), want_scale)
    assert torch.equal(q.double(), want_q)
    assert (scale[1, 3] == 1).all() and (q[1, 3].double() == 0).all()

    dst, _ = make_caches(case, 6, dtype)
    dequantize_blocks(q, scale, dst, ids, backend=backend)
    untouched = [b for b in range(6) if b not in (4, 2, 0)]
    assert (dst[untouched].double() == SENTINEL).all()
    want = (want_q.float() * want_scale.float()[..., None]).to(dtype)  # float32 products, as both paths
    if backend == "triton" and DEVICE == "cpu":  # the interpreter truncates float32 to bf16/fp16: 1 ulp
        torch.testing.assert_close(dst[ids], want, rtol=torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(dst[ids], want)


def test_activation_rows_quantize_per_token() -> None:
    """A capture space [blocks, block_size, width] is quantized as one "head" per row."""
    x = torch.randn(4, 16, 96, dtype=torch.float64)
    x[..., ::32] *= 100
    q = torch.empty(2, 16, 1, 96, dtype=FP8)
    scale = torch.empty(2, 16, 1)
    quantize_blocks(x.float().unsqueeze(2), torch.tensor([3, 1]), q, scale, backend="triton")
    want_q, want_scale = reference_quantize(x.float()[[3, 1]])
    assert torch.equal(q.squeeze(2).double(), want_q) and torch.equal(scale.squeeze(2).double(), want_scale)
    rows = dequantize_rows(q.view(32, 96), scale.view(32), torch.float32)
    assert torch.equal(rows, (want_q.float() * want_scale.float()[..., None]).view(32, 96))


def test_bad_shapes_raise() -> None:
    src = torch.zeros(4, 16, 2, 64)
    with pytest.raises(ValueError, match="quantized blocks"):
        quantize_blocks(src, torch.tensor([0]), torch.empty(1, 16, 2, 64), torch.empty(1, 16, 2))
    with pytest.raises(ValueError, match="scales"):
        quantize_blocks(src, torch.tensor([0]), torch.empty(1, 16, 2, 64, dtype=FP8), torch.empty(1, 16, 2, 1))


def test_start_up_names_the_path() -> None:
    assert describe_path(torch.device("cpu")) == "torch casts (CPU)"


# ------------------------------------------------------------------ accuracy against vLLM's fp8 cache
def vllm_fp8(t: torch.Tensor) -> torch.Tensor:
    """vLLM's fp8 KV cache with its default per-tensor scale 1.0 (scaled_convert, saturating)."""
    return to_cache_dtype(t.float(), FP8, 1.0).float()


def streamed(t: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """[T, heads, head] K or V through the store: quantized from paged blocks of 16, dequantized back."""
    T, heads, head = t.shape
    blocks = t.float().view(T // 16, 16, heads, head)
    ids = torch.arange(T // 16)
    q = torch.empty(blocks.shape, dtype=FP8)
    scale = torch.empty(blocks.shape[:3])
    quantize_blocks(blocks, ids, q, scale, backend=backend)
    out = torch.empty_like(blocks)
    dequantize_blocks(q, scale, out, ids, backend=backend)
    return out.view_as(t)


def recomputed(x: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, heads: int, head: int,
               b_k=None, b_v=None) -> tuple[torch.Tensor, torch.Tensor]:
    """K (before RoPE: a rotation, it keeps every error's norm) and V recomputed from the fp8 rows
    of x, as the store keeps them, by the recompute kernel."""
    T = x.shape[0]
    q = torch.empty(1, T, 1, x.shape[1], dtype=FP8)
    scale = torch.empty(1, T, 1)
    quantize_blocks(x.float().view(1, T, 1, -1), torch.tensor([0]), q, scale)
    k = torch.empty(T // 16, 16, heads, head)
    v = torch.empty_like(k)
    recompute_kv(q.view(T, -1), w_k.float(), w_v.float(), k, v, torch.arange(T), torch.arange(T), None,
                 b_k=b_k, b_v=b_v, x_scale=scale.view(T))
    return k.view(T, heads, head), v.view(T, heads, head)


def rel_err(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Relative RMS error over all (approximation, exact) pairs together."""
    err = sum(((a.double() - b.double()) ** 2).sum() for a, b in pairs)
    return (err / sum((b.double() ** 2).sum() for _, b in pairs)).sqrt().item()


@functools.cache
def tiny_model_tensors(arch: str, tmp_root: str) -> list[dict]:
    """Per layer of a tiny random model after a 320-token forward (transformers, float32): the
    K/V-projection input x, K before RoPE and V, and the projection's weights."""
    from transformers import AutoModelForCausalLM

    from vllm_partial_kv.tiny_models import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(f"{tmp_root}/{arch}", arch), dtype=torch.float32)
    inputs: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0][0].detach()))
    with torch.no_grad():
        model(torch.randint(10, 1000, (1, 320), generator=torch.Generator().manual_seed(0)))
        out = []
        for i, layer in enumerate(layers):
            attn, x = layer.self_attn, inputs[i]
            heads, head = attn.k_proj.out_features // attn.head_dim, attn.head_dim
            out.append(dict(x=x, heads=heads, head=head, w_k=attn.k_proj.weight, w_v=attn.v_proj.weight,
                            b_k=attn.k_proj.bias, b_v=attn.v_proj.bias,
                            k=attn.k_proj(x).view(-1, heads, head), v=attn.v_proj(x).view(-1, heads, head)))
    return out


@pytest.mark.parametrize("arch", ["llama", "llama2", "qwen2"])  # grouped-query, multi-head, QKV bias
def test_restored_kv_is_no_worse_than_vllms_fp8_cache_on_tiny_models(arch: str, tmp_path_factory) -> None:
    layers = tiny_model_tensors(arch, str(tmp_path_factory.mktemp("fp8_models")))
    for kind in ("k", "v"):
        native = rel_err([(vllm_fp8(t[kind]), t[kind]) for t in layers])
        stream = rel_err([(streamed(t[kind]), t[kind]) for t in layers])
        rc = rel_err([(recomputed(t["x"], t["w_k"], t["w_v"], t["heads"], t["head"], t["b_k"], t["b_v"])[kind == "v"],
                       t[kind]) for t in layers])
        assert 0 < stream < native and 0 < rc < native, (arch, kind, stream, rc, native)


def test_recompute_from_activations_with_outlier_channels_is_no_worse_than_vllms_fp8_cache() -> None:
    """Real LLM activations have a few channels ~100x the rest; one scale per token covers them."""
    g = torch.Generator().manual_seed(1)
    T, hidden, heads, head = 512, 512, 4, 64
    x = torch.randn(T, hidden, generator=g)
    x[:, torch.randperm(hidden, generator=g)[:6]] *= 100
    w_k, w_v = (torch.randn(heads * head, hidden, generator=g) * hidden**-0.5 for _ in range(2))
    k, v = (x.double() @ w.double().T for w in (w_k, w_v))
    rk, rv = recomputed(x, w_k, w_v, heads, head)
    for exact, rc in ((k, rk), (v, rv)):
        exact = exact.view(T, heads, head)
        native = rel_err([(vllm_fp8(exact), exact)])
        assert 0 < rel_err([(rc, exact)]) < native
        assert 0 < rel_err([(streamed(exact.float()), exact)]) < native
