"""Recompute K/V of a token range from a layer's stored input activations straight into vLLM's paged
KV cache. Triton is imported lazily so this package stays importable without it (and without vLLM)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .reference import FP8_DTYPES, recompute_kv_torch

__all__ = ["recompute_kv", "recompute_kv_torch", "SPLIT_ROWS"]

# Tokens per cuBLAS GEMM when the Triton path projects with cuBLAS and runs only its epilogue: bounds
# the GEMM's output workspace (SPLIT_ROWS x 2 x kv_dim) while keeping the GEMM near full speed.
SPLIT_ROWS = 4096

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CACHE_DTYPES = _INPUT_DTYPES + FP8_DTYPES
_INDEX_DTYPES = (torch.int32, torch.int64)
_BACKENDS = ("auto", "triton", "torch")


def recompute_kv(
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
    backend: str = "auto",
    tune: bool = False,
    x_scale: torch.Tensor | None = None,
) -> None:
    """key_cache[slot] = rope(knorm(x @ w_k.T + b_k)), value_cache[slot] = x @ w_v.T + b_v, per row of x.

    x: [T, hidden]; w_k, w_v: [num_kv_heads * head_size, hidden] (row-slice views of a merged QKV
    weight are fine); caches: 4-D views [num_blocks, block_size, num_kv_heads, head_size] with any
    strides; slot_mapping: [T], slot < 0 skips the row; positions: [T]; cos_sin_cache: vLLM's
    [max_position, rotary_dim] cat(cos, sin) table or None. Scales apply to fp8 caches only.
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    tune (Triton): time its two ways for this shape and token bucket if not done yet, which
    synchronizes the device: for start-up (the runtime, the profiler), never while serving.
    x_scale: [T] float32 when x holds fp8 (e4m3) rows of the fp8 host store: row t stands for
    x[t] * x_scale[t]. The scale factors out of the projection, so the kernel multiplies the GEMM's
    fp32 result by it (before the bias); the fp8 rows enter the GEMM cast, exactly, to the weights'
    dtype.
    """
    args = (x, w_k, w_v, key_cache, value_cache, slot_mapping, positions, cos_sin_cache, is_neox,
            b_k, b_v, k_norm_weight, k_norm_eps, k_scale, v_scale)
    use_triton = _pick_triton(backend, x)
    _validate(*args, for_triton=use_triton, x_scale=x_scale)
    if x.shape[0] == 0:
        return
    if use_triton:
        from .triton_recompute import recompute_kv_triton

        recompute_kv_triton(*args, tune=tune, x_scale=x_scale)
    else:
        recompute_kv_torch(*args, x_scale=x_scale)


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pick_triton(backend: str, x: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and _has_triton()
    if not _has_triton():
        raise ValueError("backend='triton' needs the triton package")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    return True


def _validate(x, w_k, w_v, key_cache, value_cache, slot_mapping, positions, cos_sin_cache, is_neox,
              b_k, b_v, k_norm_weight, k_norm_eps, k_scale, v_scale, *, for_triton: bool,
              x_scale: torch.Tensor | None = None) -> None:
    """Shape/dtype/device checks on metadata only (no device sync); messages are built only on failure
    because this runs once per layer per restore."""
    named = (("x", x), ("w_k", w_k), ("w_v", w_v), ("key_cache", key_cache), ("value_cache", value_cache),
             ("slot_mapping", slot_mapping), ("positions", positions), ("cos_sin_cache", cos_sin_cache),
             ("b_k", b_k), ("b_v", b_v), ("k_norm_weight", k_norm_weight), ("x_scale", x_scale))
    for name, t in named:
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")

    if x_scale is not None:
        if x.dim() != 2 or x.dtype != torch.float8_e4m3fn:
            raise ValueError(f"x with x_scale must be [T, hidden] of float8_e4m3fn, got {tuple(x.shape)} {x.dtype}")
        if x_scale.shape != x.shape[:1] or x_scale.dtype != torch.float32 or not x_scale.is_contiguous():
            raise ValueError(f"x_scale must be a contiguous float32 [{x.shape[0]}], got {tuple(x_scale.shape)} "
                             f"{x_scale.dtype}")
    elif x.dim() != 2 or x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"x must be [T, hidden] of {_INPUT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    T, hidden = x.shape
    w_dtype = x.dtype if x_scale is None else w_k.dtype
    if key_cache.dim() != 4:
        raise ValueError("key_cache must be a 4-D [num_blocks, block_size, num_kv_heads, head_size] view, "
                         f"got shape {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache shape/dtype {tuple(value_cache.shape)} {value_cache.dtype} != key_cache "
                         f"{tuple(key_cache.shape)} {key_cache.dtype}")
    if key_cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"unsupported cache dtype {key_cache.dtype}; supported: {_CACHE_DTYPES}")
    head_size = key_cache.shape[3]
    kv_dim = key_cache.shape[2] * head_size

    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if w.shape != (kv_dim, hidden):
            raise ValueError(f"{name} must be [{kv_dim}, {hidden}] (num_kv_heads*head_size, hidden), "
                             f"got {tuple(w.shape)}")
        if w.dtype != w_dtype or w.dtype not in _INPUT_DTYPES:
            raise ValueError(f"{name} dtype {w.dtype} != x dtype {w_dtype}")
    for name, idx in (("slot_mapping", slot_mapping), ("positions", positions)):
        if idx.shape != (T,) or idx.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be [{T}] int32/int64, got {tuple(idx.shape)} {idx.dtype}")
    for name, b in (("b_k", b_k), ("b_v", b_v)):
        if b is not None and b.shape != (kv_dim,):
            raise ValueError(f"{name} must be [{kv_dim}], got {tuple(b.shape)}")
    if k_norm_weight is not None and k_norm_weight.shape != (head_size,):
        raise ValueError(f"k_norm_weight must be [{head_size}], got {tuple(k_norm_weight.shape)}")
    if cos_sin_cache is not None:
        rot = cos_sin_cache.shape[-1]
        if cos_sin_cache.dim() != 2 or not cos_sin_cache.is_floating_point():
            raise ValueError(f"cos_sin_cache must be a float [max_position, rotary_dim] table, "
                             f"got {tuple(cos_sin_cache.shape)} {cos_sin_cache.dtype}")
        if rot % 2 or not 0 < rot <= head_size:
            raise ValueError(f"rotary_dim {rot} must be even and in (0, {head_size}]")

    fp8 = key_cache.dtype in FP8_DTYPES
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None and not (isinstance(s, (int, float)) and s > 0):
            raise ValueError(f"{name} must be a positive Python float (a tensor would force a device sync), got {s!r}")
        if fp8 and s is None:
            raise ValueError(f"fp8 cache ({key_cache.dtype}) needs {name}")
        if not fp8 and s not in (None, 1.0):
            raise ValueError(f"{name}={s} given but the cache is {key_cache.dtype}, not fp8")

    if for_triton:
        if value_cache.stride() != key_cache.stride():
            raise ValueError(f"triton needs key_cache and value_cache with equal strides (every vLLM layout has "
                             f"them), got {key_cache.stride()} and {value_cache.stride()}")
        for name, t in (("x", x), ("w_k", w_k), ("w_v", w_v), ("cos_sin_cache", cos_sin_cache)):
            if t is not None and t.stride(-1) != 1:
                raise ValueError(f"{name} needs unit stride in its last dim for triton")
        for name, t in (("slot_mapping", slot_mapping), ("positions", positions), ("b_k", b_k),
                        ("b_v", b_v), ("k_norm_weight", k_norm_weight)):
            if t is not None and not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous for triton")
