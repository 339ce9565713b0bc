"""The host store's number format: what a stored block's K/V and activations are kept as, and so
how many bytes a token costs on the host and on the PCIe link.

"auto" keeps the KV cache's own dtype for K/V and the model's dtype for activations: lossless.
"fp8" keeps e4m3 values with float32 scales, quantized on the GPU before the copy to the host and
dequantized on the GPU after the copy back:
  - K/V with one scale per token and head (finer than the single per-tensor scale of vLLM's own
    fp8 KV cache); a KV cache that is already fp8 is stored as it is (no second quantization);
  - activations with one scale per token, as FP8-dynamic (W8A8) checkpoints quantize the input
    of every QKV projection.
A block's scales live in its own slot, beside its values, and a store holds one format only, so a
block is never read in a format other than the one it was written in.

Pure Python (no torch, no vLLM): the planner and the scheduler size slots from it every step.
"""

from __future__ import annotations

HOST_FORMATS = ("auto", "fp8")
SCALE_BYTES = 4  # float32: one per (token, head) of K and of V, one per activation row
FP8_BYTES = 1


def quantizes_kv(fmt: str, kv_dtype_bytes: int) -> bool:
    """K/V are quantized on the way to the host: an fp8 store over a 16- or 32-bit KV cache."""
    return fmt == "fp8" and kv_dtype_bytes > FP8_BYTES


def quantizes_activations(fmt: str) -> bool:
    return fmt == "fp8"


def kv_bytes_per_token(fmt: str, num_kv_heads: int, head_size: int, kv_dtype_bytes: int) -> int:
    """Host (and link) bytes of one token's K and V in one layer."""
    if quantizes_kv(fmt, kv_dtype_bytes):
        return 2 * num_kv_heads * (head_size * FP8_BYTES + SCALE_BYTES)
    return 2 * num_kv_heads * head_size * kv_dtype_bytes


def act_bytes_per_token(fmt: str, width: int, dtype_bytes: int) -> int:
    """Host (and link) bytes of one token's activation row (`width` columns) in one layer."""
    if quantizes_activations(fmt):
        return width * FP8_BYTES + SCALE_BYTES
    return width * dtype_bytes

