"""fp8 (e4m3) quantization for the host store ("fp8" `host_format`), with the torch reference beside
the Triton kernels' dispatch, as for the recompute.

Blocks are 4-D views [num_blocks, block_size, heads, width] with any strides (vLLM's paged K or V
cache, or an activation capture space seen as one "head" per row). Each (token, head) row gets one
float32 scale, amax / 448: values are stored as round(x / scale), saturated to e4m3's finite range
(as vLLM's own scaled conversions do); an all-zero row gets scale 1. Quantized blocks are contiguous
[n, block_size, heads, width] with scales [n, block_size, heads].

Triton is imported lazily. Its e4m3 conversion needs compute capability 8.9 or newer; older GPUs
(and the CPU without TRITON_INTERPRET) use the torch path, which `describe_path` names at start-up.
"""

from __future__ import annotations

import functools

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE_DTYPE = torch.float32
_BACKENDS = ("auto", "triton", "torch")

__all__ = ["FP8", "FP8_MAX", "SCALE_DTYPE", "quantize_blocks", "dequantize_blocks", "quantize_blocks_torch",
           "dequantize_blocks_torch", "dequantize_rows", "describe_path", "triton_fp8_ok"]


def quantize_blocks_torch(src: torch.Tensor, block_ids: torch.Tensor, out_q: torch.Tensor,
                          out_scale: torch.Tensor) -> None:
    """out_q[i], out_scale[i] = quantized src[block_ids[i]], one scale per (token, head) row."""
    x = src[block_ids.to(src.device)].to(torch.float32)
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    out_q.copy_((x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8))
    out_scale.copy_(scale)


def dequantize_blocks_torch(q: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor) -> None:
    """dst[block_ids[i]] = q[i] * scale[i], in dst's dtype (fp8 cast from float32, once)."""
    dst[block_ids.to(dst.device)] = (q.to(torch.float32) * scale[..., None].to(torch.float32)).to(dst.dtype)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, width] fp8 rows with [T] scales -> [T, width] of dtype (where a path needs plain rows:
    vLLM's own modules, the tensor-parallel all-gather)."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def quantize_blocks(src: torch.Tensor, block_ids: torch.Tensor, out_q: torch.Tensor, out_scale: torch.Tensor,
                    backend: str = "auto") -> None:
    _check(src, block_ids, out_q, out_scale)
    if not len(block_ids):
        return
    if _use_triton(backend, src):
        from .triton_quant import quantize_blocks_triton

        quantize_blocks_triton(src, block_ids, out_q, out_scale)
    else:
        quantize_blocks_torch(src, block_ids, out_q, out_scale)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor,
                      backend: str = "auto") -> None:
    _check(dst, block_ids, q, scale)
    if not len(block_ids):
        return
    if _use_triton(backend, dst):
        from .triton_quant import dequantize_blocks_triton

        dequantize_blocks_triton(q, scale, dst, block_ids)
    else:
        dequantize_blocks_torch(q, scale, dst, block_ids)


def _check(blocks: torch.Tensor, block_ids: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Metadata only (no device sync)."""
    n = block_ids.shape[0]
    if blocks.dim() != 4:
        raise ValueError(f"blocks must be a 4-D [num_blocks, block_size, heads, width] view, got {tuple(blocks.shape)}")
    if q.dtype != FP8 or q.shape != (n, *blocks.shape[1:]) or not q.is_contiguous():
        raise ValueError(f"quantized blocks must be contiguous {FP8} of shape {(n, *blocks.shape[1:])}, "
                         f"got {q.dtype} {tuple(q.shape)}")
    if scale.dtype != SCALE_DTYPE or scale.shape != (n, *blocks.shape[1:3]) or not scale.is_contiguous():
        raise ValueError(f"scales must be contiguous {SCALE_DTYPE} of shape {(n, *blocks.shape[1:3])}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if block_ids.dtype not in (torch.int32, torch.int64) or block_ids.dim() != 1:
        raise ValueError(f"block_ids must be a 1-D int32/int64 tensor, got {block_ids.dtype} {tuple(block_ids.shape)}")


@functools.cache
def triton_fp8_ok(device: torch.device) -> bool:
    """Triton converts to e4m3 on CUDA devices of compute capability 8.9 or newer, and in the
    interpreter; False elsewhere (no triton, older GPUs)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    if device.type != "cuda":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    ok = triton_fp8_ok(t.device)
    if backend == "triton" and not ok:
        raise ValueError(f"backend='triton' cannot convert to e4m3 on {t.device}")
    return ok and (t.is_cuda or backend == "triton")


def describe_path(device: torch.device) -> str:
    """One line for start-up: which code quantizes and dequantizes the fp8 host store here."""
    if device.type == "cuda":
        if triton_fp8_ok(device):
            return "Triton kernels"
        major, minor = torch.cuda.get_device_capability(device)
        return (f"torch casts (slower): Triton has no e4m3 conversion on compute capability {major}.{minor} "
                "(needs 8.9 or newer)")
    return "torch casts (CPU)"
