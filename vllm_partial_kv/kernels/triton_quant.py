"""Triton kernels of `quant`: gather-and-quantize blocks (before a store's copy to the host) and
dequantize-and-scatter them into vLLM's paged blocks (after a restore's copy back). Each program
takes ROWS (token, head) rows of one width; both are one pass over memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import FP8_MAX

_MAX_TILE = 4096  # elements per program


@triton.jit
def _round_to_e4m3(x):
    """x (float32, |x| <= 448) rounded to the nearest e4m3 value, ties to even, still in float32:
    the conversion that follows is then exact. Triton 3.9's interpreter converts to e4m3 with ties
    away from zero and loses the carry when a value rounds up to the next power of two (31.6 -> 16);
    rounding first gives the interpreter and the GPU's cvt.rn.satfinite the same values. Normal
    values keep 3 of float32's 23 mantissa bits; below 2**-6 the grid is e4m3's subnormal step 2**-9."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576: ~0xFFFFF
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (x + 24576.0) - 24576.0  # 1.5 * 2**14: float32 spacing 2**-9 around it
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _rows(ids_ptr, n_rows, bs, heads, s0, s1, s2,
          WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, ROWS: tl.constexpr):
    """This program's (token, head) rows of the listed blocks: their row numbers and mask, the
    columns and element mask, and each row's offset in the paged tensor (strides s0..s2)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_mask = r < n_rows
    block = tl.load(ids_ptr + r // (bs * heads), mask=r_mask, other=0).to(tl.int64)
    token, head = (r // heads) % bs, r % heads
    cols = tl.arange(0, WIDTH_PAD)
    mask = r_mask[:, None] & (cols < WIDTH)[None, :]
    base = block * s0 + token.to(tl.int64) * s1 + head.to(tl.int64) * s2
    return r, r_mask, cols, mask, base


@triton.jit(do_not_specialize=["n_rows", "bs", "heads"])
def _quantize_kernel(src_ptr, ids_ptr, q_ptr, s_ptr, n_rows, bs, heads, s0, s1, s2, s3,
                     WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, ROWS: tl.constexpr, FMAX: tl.constexpr):
    r, r_mask, cols, mask, base = _rows(ids_ptr, n_rows, bs, heads, s0, s1, s2, WIDTH, WIDTH_PAD, ROWS)
    x = tl.load(src_ptr + base[:, None] + (cols * s3)[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, amax / FMAX, 1.0)
    q = _round_to_e4m3(tl.clamp(x / scale[:, None], -FMAX, FMAX))
    tl.store(q_ptr + r.to(tl.int64)[:, None] * WIDTH + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + r, scale, mask=r_mask)


@triton.jit(do_not_specialize=["n_rows", "bs", "heads"])
def _dequantize_kernel(q_ptr, s_ptr, dst_ptr, ids_ptr, n_rows, bs, heads, s0, s1, s2, s3,
                       WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, ROWS: tl.constexpr):
    r, r_mask, cols, mask, base = _rows(ids_ptr, n_rows, bs, heads, s0, s1, s2, WIDTH, WIDTH_PAD, ROWS)
    q = tl.load(q_ptr + r.to(tl.int64)[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(s_ptr + r, mask=r_mask, other=1.0)
    tl.store(dst_ptr + base[:, None] + (cols * s3)[None, :], (q * scale[:, None]).to(dst_ptr.dtype.element_ty),
             mask=mask)


def _tile(blocks: torch.Tensor, n: int) -> tuple[int, int, int, int]:
    """(rows, width, width_pad, rows per program) of n blocks of a [num_blocks, bs, heads, width] view."""
    _, bs, heads, width = blocks.shape
    pad = triton.next_power_of_2(width)
    return n * bs * heads, width, pad, max(1, min(64, _MAX_TILE // pad))


def quantize_blocks_triton(src: torch.Tensor, block_ids: torch.Tensor, out_q: torch.Tensor,
                           out_scale: torch.Tensor) -> None:
    n_rows, width, pad, rows = _tile(src, block_ids.shape[0])
    _quantize_kernel[(triton.cdiv(n_rows, rows),)](
        src, block_ids, out_q, out_scale, n_rows, src.shape[1], src.shape[2], *src.stride(),
        WIDTH=width, WIDTH_PAD=pad, ROWS=rows, FMAX=FP8_MAX)


def dequantize_blocks_triton(q: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor,
                             block_ids: torch.Tensor) -> None:
    n_rows, width, pad, rows = _tile(dst, block_ids.shape[0])
    _dequantize_kernel[(triton.cdiv(n_rows, rows),)](
        q, scale, dst, block_ids, n_rows, dst.shape[1], dst.shape[2], *dst.stride(),
        WIDTH=width, WIDTH_PAD=pad, ROWS=rows)
