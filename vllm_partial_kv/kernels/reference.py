"""Plain-torch K/V recompute: the CPU production path and the float64 oracle the Triton kernel is
tested against. Readability over speed; the fused kernel is the fast path."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def apply_rope(k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """vLLM's RotaryEmbedding.forward_static on [T, H, D]; dims past rotary_dim pass through."""
    rot_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].to(k.dtype).unsqueeze(1).chunk(2, dim=-1)
    rot, rest = k[..., :rot_dim], k[..., rot_dim:]
    x1, x2 = rot.chunk(2, dim=-1) if is_neox else (rot[..., ::2], rot[..., 1::2])
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rot = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((rot, rest), dim=-1)


def to_cache_dtype(t: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    """fp8 stores t/scale saturated to the finite range, like vLLM's scaled_convert (SATFINITE)."""
    if dtype in FP8_DTYPES:
        fmax = torch.finfo(dtype).max
        t = (t / scale).clamp(-fmax, fmax)
    return t.to(dtype)


def recompute_kv_torch(
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor | None,
    is_neox: bool = True,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    k_norm_eps: float = 1e-6,
    k_scale: float | None = None,
    v_scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    x_scale: torch.Tensor | None = None,
) -> None:
    """Same contract as `recompute_kv`; everything is computed in `compute_dtype`. Inputs are
    assumed validated. The boolean mask on slot_mapping syncs on CUDA: fine for a fallback."""
    keep = slot_mapping >= 0
    x, slots, positions = x[keep].to(compute_dtype), slot_mapping[keep].long(), positions[keep]
    if x_scale is not None:  # fp8 rows of the fp8 host store
        x = x * x_scale[keep].to(compute_dtype)[:, None]
    _, block_size, num_heads, head_size = key_cache.shape

    def project(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        out = torch.nn.functional.linear(x, w.to(compute_dtype), None if b is None else b.to(compute_dtype))
        return out.view(-1, num_heads, head_size)

    k, v = project(w_k, b_k), project(w_v, b_v)
    if k_norm_weight is not None:
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + k_norm_eps) * k_norm_weight.to(compute_dtype)
    if cos_sin_cache is not None:
        k = apply_rope(k, positions, cos_sin_cache, is_neox)
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = to_cache_dtype(k, key_cache.dtype, k_scale)
    value_cache[blocks, offsets] = to_cache_dtype(v, value_cache.dtype, v_scale)
