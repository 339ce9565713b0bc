"""Fused K/V recompute in one Triton kernel: X·W_k / X·W_v, bias, Qwen3 K-RMSNorm, RoPE and the
paged-cache scatter all happen on the register tile, so recomputed K/V never round-trips through
HBM before it lands in the cache.

Each program owns a [BLOCK_T, head] tile of either K or V of one KV head. For K with RoPE the weight
rows are loaded in an order that puts each rotary pair (i, i + rot/2 for neox, 2i/2i+1 for GPT-J)
where a reshape + split can pull the two halves apart after one full-width tl.dot: the MMA keeps
its full N = head_size width instead of two half-width accumulators.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .reference import FP8_DTYPES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Token tiles per L2 group: 8 tiles of X stay hot in L2 while every head's weights stream past.
GROUP_T = tl.constexpr(8)
# Below this many tokens the kernel is launch/weight-bandwidth bound; a fixed config avoids autotuning.
TUNE_MIN_T = 128


@triton.jit
def _rope(acc, pos_ptr, cs_ptr, offs_t, t_mask, stride_cs,
          BLOCK_T: tl.constexpr, HEAD_PAD: tl.constexpr, ROT_DIM: tl.constexpr, NEOX: tl.constexpr):
    """Rotate pairs (a_i, b_i); neox tiles hold [a | b], GPT-J tiles hold a0 b0 a1 b1 ...
    Pairs past ROT_DIM / 2 get cos = 1, sin = 0 and pass through unchanged."""
    HALF: tl.constexpr = HEAD_PAD // 2
    pairs = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    cs = cs_ptr + pos[:, None] * stride_cs + pairs[None, :]
    rot = t_mask[:, None] & (pairs < ROT_DIM // 2)[None, :]
    cos = tl.load(cs, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(cs + ROT_DIM // 2, mask=rot, other=0.0).to(tl.float32)
    if NEOX:
        a, b = tl.split(tl.permute(tl.reshape(acc, [BLOCK_T, 2, HALF]), (0, 2, 1)))
    else:
        a, b = tl.split(tl.reshape(acc, [BLOCK_T, HALF, 2]))
    out = tl.join(a * cos - b * sin, b * cos + a * sin)
    if NEOX:
        out = tl.permute(out, (0, 2, 1))
    return tl.reshape(out, [BLOCK_T, HEAD_PAD])


@triton.jit
def _kv_tile(x_ptr, w_ptr, b_ptr, cache_ptr, slot_ptr, pos_ptr, cs_ptr, kn_ptr,
             offs_t, head, T, hidden, stride_x, stride_w, stride_cs,
             c_s0, c_s1, c_s2, c_s3, block_size, scale, eps,
             HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, ROT_DIM: tl.constexpr, NEOX: tl.constexpr,
             HAS_BIAS: tl.constexpr, HAS_KNORM: tl.constexpr, FP8_MAX: tl.constexpr,
             DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
             IS_K: tl.constexpr):
    """Project, post-process and scatter one [BLOCK_T, head] tile of K (IS_K) or V."""
    cols = tl.arange(0, HEAD_PAD)
    if IS_K and NEOX and ROT_DIM < HEAD_PAD:
        # Partial rotary (or padded head) in neox style: column j < HALF holds the pair's first element,
        # column HALF + j its partner; the pass-through dims fill the remaining columns.
        r: tl.constexpr = ROT_DIM // 2
        half: tl.constexpr = HEAD_PAD // 2
        dims = tl.where((cols >= r) & (cols < half), cols + r,
                        tl.where((cols >= half) & (cols < half + r), cols - half + r, cols))
    else:
        dims = cols
    d_mask = dims < HEAD
    t_mask = offs_t < T

    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + (head * HEAD + dims)[:, None] * stride_w
    acc = tl.zeros([BLOCK_T, HEAD_PAD], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        xt = tl.load(x_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_rows + offs_k[None, :], mask=d_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:  # the Triton interpreter multiplies bf16 operands as their raw uint16 bits
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + head * HEAD + dims, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if IS_K and HAS_KNORM:
        inv_rms = tl.rsqrt(tl.sum(acc * acc, axis=1) / HEAD + eps)
        acc = acc * inv_rms[:, None] * tl.load(kn_ptr + dims, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if IS_K and ROT_DIM > 0:
        acc = _rope(acc, pos_ptr, cs_ptr, offs_t, t_mask, stride_cs, BLOCK_T, HEAD_PAD, ROT_DIM, NEOX)
    if FP8_MAX > 0:
        acc = tl.clamp(acc / scale, -FP8_MAX, FP8_MAX)

    slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1).to(tl.int64)
    rows = (slots // block_size) * c_s0 + (slots % block_size) * c_s1 + head * c_s2
    ptrs = cache_ptr + rows[:, None] + (dims * c_s3)[None, :]
    tl.store(ptrs, acc.to(cache_ptr.dtype.element_ty), mask=(slots >= 0)[:, None] & d_mask[None, :])


# Sizes that change call to call are not specialized on (divisibility, == 1): one binary per config.
@triton.jit(do_not_specialize=["T", "num_kv_heads", "block_size", "t_bucket"])
def _recompute_kv_kernel(
        x_ptr, wk_ptr, wv_ptr, bk_ptr, bv_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, cs_ptr, kn_ptr,
        T, hidden, num_kv_heads, stride_x, stride_wk, stride_wv, stride_cs,
        kc_s0, kc_s1, kc_s2, kc_s3, vc_s0, vc_s1, vc_s2, vc_s3,
        block_size, k_scale, v_scale, eps,
        t_bucket,  # autotune key only: tune per power-of-two bucket of T, not per T
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, ROT_DIM: tl.constexpr, NEOX: tl.constexpr,
        HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, HAS_KNORM: tl.constexpr, FP8_MAX: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """1-D grid over (token tile, K/V x head), grouped so GROUP_T token tiles share L2."""
    pid = tl.program_id(0)
    num_t = tl.cdiv(T, BLOCK_T)
    num_n = 2 * num_kv_heads
    per_group = GROUP_T * num_n
    first_t = (pid // per_group) * GROUP_T
    group_t = tl.minimum(num_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_t
    pid_n = (pid % per_group) // group_t
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    if pid_n < num_kv_heads:
        _kv_tile(x_ptr, wk_ptr, bk_ptr, kc_ptr, slot_ptr, pos_ptr, cs_ptr, kn_ptr,
                 offs_t, pid_n, T, hidden, stride_x, stride_wk, stride_cs,
                 kc_s0, kc_s1, kc_s2, kc_s3, block_size, k_scale, eps,
                 HEAD, HEAD_PAD, ROT_DIM, NEOX, HAS_BK, HAS_KNORM, FP8_MAX, DOT_PRECISION,
                 DOT_F32, BLOCK_T, BLOCK_K, IS_K=True)
    else:
        _kv_tile(x_ptr, wv_ptr, bv_ptr, vc_ptr, slot_ptr, pos_ptr, cs_ptr, kn_ptr,
                 offs_t, pid_n - num_kv_heads, T, hidden, stride_x, stride_wv, stride_cs,
                 vc_s0, vc_s1, vc_s2, vc_s3, block_size, v_scale, eps,
                 HEAD, HEAD_PAD, ROT_DIM, NEOX, HAS_BV, False, FP8_MAX, DOT_PRECISION,
                 DOT_F32, BLOCK_T, BLOCK_K, IS_K=False)


def _config(block_t: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_T": block_t, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


# H100 candidates (BLOCK_T, BLOCK_K, warps, stages): 128-row tiles feed wgmma for large T; 32/64-row
# tiles give small T enough programs to cover 132 SMs; (64, 64, 8) is the big-tile choice for head 256.
TUNE_CONFIGS = [
    _config(32, 128, 4, 4),
    _config(64, 64, 4, 4),
    _config(64, 128, 4, 3),
    _config(64, 64, 8, 4),
    _config(128, 64, 4, 4),
    _config(128, 64, 8, 4),
    _config(256, 64, 8, 3),
]
_SMEM_BUDGET = 200 * 1024
# fp32 accumulator registers per thread: the RoPE epilogue holds the accumulator twice plus cos/sin,
# and spills on sm_90 above 64 (measured with ptxas); the plain GEMM epilogue is fine up to 128.
_MAX_ACC_REGS = {False: 128, True: 64}


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than the T bucket, and ones that would spill or overflow shared memory."""
    args = {**named_args, **kwargs}
    head_pad, elem = args["HEAD_PAD"], args["x_ptr"].element_size()
    max_t = max(32, args["t_bucket"] // 2)
    max_regs = _MAX_ACC_REGS[args["ROT_DIM"] > 0]

    def fits(c: triton.Config) -> bool:
        bt, bk = c.kwargs["BLOCK_T"], c.kwargs["BLOCK_K"]
        regs = bt * head_pad // (32 * c.num_warps)
        smem = c.num_stages * (bt + head_pad) * bk * elem
        return bt <= max_t and regs <= max_regs and smem <= _SMEM_BUDGET

    return [c for c in configs if fits(c)] or [configs[0]]


_tuned_kernel = triton.autotune(
    configs=TUNE_CONFIGS,
    key=["t_bucket", "hidden", "num_kv_heads", "HEAD_PAD"],
    prune_configs_by={"early_config_prune": _prune},
)(_recompute_kv_kernel)


def _fixed_config(T: int, head_pad: int, elem: int) -> dict:
    """Small T, and the CPU interpreter, where autotuning would only cost time: the tallest tile T
    needs (<= 64 rows), 64 accumulator registers per thread, the widest K step that fits smem."""
    block_t = min(64, max(16, triton.next_power_of_2(T)))
    warps = 8 if block_t * head_pad > 64 * 32 * 4 else 4
    stages = 3
    block_k = next(bk for bk in (128, 64, 32, 16) if stages * (block_t + head_pad) * bk * elem <= 160 * 1024)
    return {"BLOCK_T": block_t, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


def recompute_kv_triton(
    x: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor | None,
    is_neox: bool,
    b_k: torch.Tensor | None,
    b_v: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    k_norm_eps: float,
    k_scale: float | None,
    v_scale: float | None,
) -> None:
    """Launch the fused kernel; inputs are assumed validated (see `recompute_kv`)."""
    T, hidden = x.shape
    _, block_size, num_kv_heads, head_size = key_cache.shape
    fp8 = key_cache.dtype in FP8_DTYPES
    args = (
        x, w_k, w_v, b_k, b_v, key_cache, value_cache, slot_mapping, positions, cos_sin_cache, k_norm_weight,
        T, hidden, num_kv_heads, x.stride(0), w_k.stride(0), w_v.stride(0),
        0 if cos_sin_cache is None else cos_sin_cache.stride(0),
        *key_cache.stride(), *value_cache.stride(),
        block_size, float(k_scale or 1.0), float(v_scale or 1.0), float(k_norm_eps),
        triton.next_power_of_2(T),
    )
    meta = {
        "HEAD": head_size,
        "HEAD_PAD": max(16, triton.next_power_of_2(head_size)),
        "ROT_DIM": 0 if cos_sin_cache is None else cos_sin_cache.shape[1],
        "NEOX": bool(is_neox),
        "HAS_BK": b_k is not None,
        "HAS_BV": b_v is not None,
        "HAS_KNORM": k_norm_weight is not None,
        "FP8_MAX": float(torch.finfo(key_cache.dtype).max) if fp8 else 0.0,
        # fp32 activations: 3xTF32 keeps fp32 accuracy on tensor cores.
        "DOT_PRECISION": "tf32x3" if x.dtype == torch.float32 else "tf32",
        "DOT_F32": INTERPRET and x.dtype == torch.bfloat16,
    }

    def grid(m: dict) -> tuple[int]:
        return (triton.cdiv(T, m["BLOCK_T"]) * 2 * num_kv_heads,)

    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        if INTERPRET or T < TUNE_MIN_T:
            _recompute_kv_kernel[grid](*args, **meta, **_fixed_config(T, meta["HEAD_PAD"], x.element_size()))
        else:
            _tuned_kernel[grid](*args, **meta)
