"""What a host slot holds per layer in each host format (`formats`), for `store.HostPool`; torch only.

"auto", or "fp8" over an fp8 KV cache: the device's K/V blocks as they are (copied as raw bytes).
"fp8" over a 16/32-bit KV cache: e4m3 K, e4m3 V (each [block_size, heads, head]) and their
float32 scales (each [block_size, heads]), contiguous: what `kernels.quant.quantize_blocks` writes.
Activations: rows in the model's dtype, or e4m3 rows with a float32 scale each (HostPool.act_scale).
"""

from __future__ import annotations

import torch

from vllm_partial_kv import formats
from vllm_partial_kv.kernels.quant import FP8, SCALE_DTYPE


def kv_slot_views(fmt: str, block_views: dict[str, list[torch.Tensor]], kv_dtype: torch.dtype,
                  kv_shape: tuple[int, int, int]) -> dict[str, list[torch.Tensor]]:
    """Per layer, the tensors a slot mirrors (slot-first; only shapes, strides and dtypes are
    read): the device block views, or [K values, V values, K scales, V scales] when the format
    quantizes K/V. kv_shape: (block_size, heads, head) of one block of this rank."""
    if not formats.quantizes_kv(fmt, kv_dtype.itemsize):
        return block_views
    values = torch.empty((1, *kv_shape), dtype=FP8, device="meta")
    scales = torch.empty((1, *kv_shape[:2]), dtype=SCALE_DTYPE, device="meta")
    return {name: [values, values, scales, scales] for name in block_views}


def act_dtype(fmt: str, model_dtype: torch.dtype) -> torch.dtype:
    return FP8 if formats.quantizes_activations(fmt) else model_dtype


def slot_bytes(views: list[torch.Tensor]) -> int:
    """Bytes of one slot of these slot-first views."""
    return sum(v[0].numel() * v.element_size() for v in views)
