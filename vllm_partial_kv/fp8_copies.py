"""The fp8 host store's copies (host_format "fp8", `formats`), for `restore.RestoreRuntime`.

A store quantizes on the device (K/V per token and head, activation rows per token) into a staging
buffer and copies that to the host slots, so the link and the host carry fp8 and scales; a restore
copies slots into a staging buffer and dequantizes K/V from it straight into vLLM's paged blocks
(activations stay fp8: the recompute reads them with their scales). Blocks go CHUNK_TOKENS at a time,
so each staging buffer has a fixed size; the store stream and the restore's copy stream each have
their own, and reuse it in their own order, so nothing waits on another stream for it.
"""

from __future__ import annotations

import torch

from vllm_partial_kv import compat
from vllm_partial_kv.kernels.quant import FP8, SCALE_DTYPE, dequantize_blocks, quantize_blocks

CHUNK_TOKENS = 4096
"""Tokens per quantize/dequantize chunk: 33 MiB of fp8 K/V staging per stream for a multi-head 7B
layer, 8 MiB for a grouped-query 8B one."""


def staging_bytes(block_size: int, kv_shape: tuple[int, int] | None, act_width: int | None) -> int:
    """Device bytes of the staging `Fp8Copies` allocates: K/V for stores and for restores when they
    are quantized (kv_shape: (heads, head)), activation rows for stores."""
    tokens = max(1, CHUNK_TOKENS // block_size) * block_size
    total = 0
    if kv_shape is not None:
        total += 2 * tokens * 2 * kv_shape[0] * (kv_shape[1] * FP8.itemsize + SCALE_DTYPE.itemsize)
    if act_width is not None:
        total += tokens * (act_width * FP8.itemsize + SCALE_DTYPE.itemsize)
    return total


class Fp8Copies:
    """Quantized stores and restores of K/V (when `quantize_kv`) and stores of activations."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int, block_size: int, quantize_kv: bool,
                 act_width: int | None, copy, device: torch.device) -> None:
        self.copy = copy
        self.device = device
        self.chunk = max(1, CHUNK_TOKENS // block_size)
        self.kv = {n: compat.kv_cache_views(t, num_blocks) for n, t in kv_caches.items()} if quantize_kv else {}
        self._staging: dict[str, list[torch.Tensor]] = {}
        for role in ("store", "load"):
            bufs = []
            if self.kv:
                shape = (self.chunk, *next(iter(self.kv.values()))[0].shape[1:])
                bufs += [torch.empty(shape, dtype=FP8, device=device) for _ in range(2)]
                bufs += [torch.empty(shape[:3], dtype=SCALE_DTYPE, device=device) for _ in range(2)]
            self._staging[role] = bufs
        self._act: list[torch.Tensor] = []
        if act_width is not None:  # activation rows are stored only (restores keep them fp8)
            self._act = [torch.empty((self.chunk, block_size, 1, act_width), dtype=FP8, device=device),
                         torch.empty((self.chunk, block_size, 1), dtype=SCALE_DTYPE, device=device)]

    @property
    def device_bytes(self) -> int:
        tensors = [t for bufs in self._staging.values() for t in bufs] + self._act
        return sum(t.numel() * t.element_size() for t in tensors)

    def _chunks(self, slots: torch.Tensor, blocks: torch.Tensor):
        for c0 in range(0, len(slots), self.chunk):
            s, b = slots[c0 : c0 + self.chunk], blocks[c0 : c0 + self.chunk]
            yield s, self._to_device(b), torch.arange(len(s))

    def _to_device(self, idx: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned: a pageable source would make the host wait
            return idx.pin_memory().to(self.device, non_blocking=True)
        return idx

    def store_kv(self, name: str, host: list[torch.Tensor], slots: torch.Tensor, blocks: torch.Tensor) -> None:
        """Quantize GPU blocks `blocks` of layer `name` into host slots `slots` ([K, V, K scales, V scales])."""
        k, v = self.kv[name]
        q_k, q_v, s_k, s_v = self._staging["store"]
        for s, b, rows in self._chunks(slots, blocks):
            n = len(s)
            quantize_blocks(k, b, q_k[:n], s_k[:n])
            quantize_blocks(v, b, q_v[:n], s_v[:n])
            for dst, src in zip(host, (q_k, q_v, s_k, s_v)):
                self.copy(dst, s, src, rows)

    def load_kv(self, name: str, host: list[torch.Tensor], slots: torch.Tensor, blocks: torch.Tensor) -> None:
        """Host slots `slots` back into GPU blocks `blocks` of layer `name`, dequantized."""
        k, v = self.kv[name]
        q_k, q_v, s_k, s_v = self._staging["load"]
        for s, b, rows in self._chunks(slots, blocks):
            n = len(s)
            for dst, src in zip((q_k, q_v, s_k, s_v), host):
                self.copy(dst, rows, src, s)
            dequantize_blocks(q_k[:n], s_k[:n], k, b)
            dequantize_blocks(q_v[:n], s_v[:n], v, b)

    def store_act(self, capture: torch.Tensor, host: torch.Tensor, host_scale: torch.Tensor, slots: torch.Tensor,
                  blocks: torch.Tensor) -> None:
        """Capture blocks `blocks` ([capture_blocks, block_size, width]) quantized per row into host
        slots `slots` (rows `host`, scales `host_scale`)."""
        q, scale = self._act
        for s, b, rows in self._chunks(slots, blocks):
            n = len(s)
            quantize_blocks(capture.unsqueeze(2), b, q[:n], scale[:n])
            self.copy(host, s, q.squeeze(2), rows)
            self.copy(host_scale, s, scale.squeeze(2), rows)
