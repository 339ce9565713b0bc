"""Fused K/V recompute in one Triton kernel: X·W_k / X·W_v, bias, Qwen3 K-RMSNorm, RoPE and the
paged-cache scatter all happen on the register tile, so recomputed K/V never round-trips through
HBM before it lands in the cache.

Each program owns a [BLOCK_T, HEADS * head] tile of either K or V of HEADS adjacent KV heads,
computed by one full-width tl.dot: their weight rows are adjacent, so HEADS = 2 at head 128 gives
the N = 256 tile (the widest wgmma) that Hopper GEMMs run best with. The epilogue views the tile as
[BLOCK_T, HEADS, head] (one cos/sin row per token serves every head; compiled for sm_90 this
epilogue needs half the shared-memory round trips of a [BLOCK_T * HEADS, head] view and spills
nothing). RoPE separates each rotary pair with a register-level reshape + split: neox pairs
(i, i + rot/2) sit in the two halves of a head, GPT-J pairs (2i, 2i + 1) are adjacent; for
partial-rotary neox the weight rows are loaded permuted so the pairs still land that way. This
beats two half-width accumulators, which would halve the MMA N.

The same kernel with PROJECTED set is the epilogue alone, reading K/V that a cuBLAS GEMM projected
into a workspace: cuBLAS outruns Triton's own matmul on Hopper, and the epilogue is one pass over
K/V. Both ways are timed once per shape and token bucket, at start-up, and the faster is kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from . import SPLIT_ROWS
from .reference import FP8_DTYPES

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Token tiles per L2 group: 8 tiles of X stay hot in L2 while every head's weights stream past.
GROUP_T = tl.constexpr(8)
# Below this many tokens the kernel is launch/weight-bandwidth bound; a fixed config avoids autotuning.
TUNE_MIN_T = 128


@triton.jit
def _rope(acc, pos_ptr, cs_ptr, offs_t, t_mask, stride_cs, BLOCK_T: tl.constexpr, HEADS: tl.constexpr,
          HEAD_PAD: tl.constexpr, ROT_DIM: tl.constexpr, NEOX: tl.constexpr):
    """Rotate pairs (a_i, b_i) of each head of acc [BLOCK_T, HEADS, HEAD_PAD] by its token's position:
    neox heads hold [a | b], GPT-J heads hold a0 b0 a1 b1 ... One cos/sin row per token serves
    every head. Pairs past ROT_DIM / 2 get cos = 1, sin = 0 and pass through unchanged."""
    HALF: tl.constexpr = HEAD_PAD // 2
    pairs = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    cs = cs_ptr + pos[:, None] * stride_cs + pairs[None, :]
    rot = t_mask[:, None] & (pairs < ROT_DIM // 2)[None, :]
    cos = tl.load(cs, mask=rot, other=1.0).to(tl.float32)[:, None, :]
    sin = tl.load(cs + ROT_DIM // 2, mask=rot, other=0.0).to(tl.float32)[:, None, :]
    if NEOX:
        a, b = tl.split(tl.permute(tl.reshape(acc, [BLOCK_T, HEADS, 2, HALF]), (0, 1, 3, 2)))
    else:
        a, b = tl.split(tl.reshape(acc, [BLOCK_T, HEADS, HALF, 2]))
    out = tl.join(a * cos - b * sin, b * cos + a * sin)
    if NEOX:
        out = tl.permute(out, (0, 1, 3, 2))
    return tl.reshape(out, [BLOCK_T, HEADS, HEAD_PAD])


@triton.jit
def _neox_partial_order(cols, ROT_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Head dim held by each tile column when only ROT_DIM < HEAD_PAD dims rotate (neox): column
    j < HALF holds a pair's first element and HALF + j its partner; pass-through dims fill the rest."""
    r: tl.constexpr = ROT_DIM // 2
    half: tl.constexpr = HEAD_PAD // 2
    return tl.where((cols >= r) & (cols < half), cols + r,
                    tl.where((cols >= half) & (cols < half + r), cols - half + r, cols))


@triton.jit
def _project(x_ptr, w_ptr, T, hidden, num_kv_heads, stride_x, stride_w, pid_t, head0, offs_t, t_mask, w_row, n_mask,
             HEAD: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr,
             DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, X_SCALED: tl.constexpr):
    """The [BLOCK_T, N] tile x[offs_t] @ w[w_row].T in fp32, K step by K step (fp8 rows of x, with
    X_SCALED, enter the dot cast to the weights' dtype: exact, their scales come after)."""
    if TMA:  # the program's weight rows are one box; rows past T and columns past hidden read as 0
        x_desc = tl.make_tensor_descriptor(x_ptr, [T, hidden], [stride_x, 1], [BLOCK_T, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, [num_kv_heads * HEAD, hidden], [stride_w, 1], [N, BLOCK_K])
    else:
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x
        w_rows = w_ptr + w_row[:, None] * stride_w
    acc = tl.zeros([BLOCK_T, N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if TMA:
            xt = x_desc.load([pid_t * BLOCK_T, k0])
            wt = w_desc.load([head0 * HEAD, k0])
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hidden
            xt = tl.load(x_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if X_SCALED:
            xt = xt.to(wt.dtype)
        if DOT_F32:  # the Triton interpreter multiplies bf16 operands as their raw uint16 bits
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)
    return acc


# Sizes that change call to call are not specialized on (divisibility, == 1): one binary per config.
@triton.jit(do_not_specialize=["T", "num_kv_heads", "block_size", "y_v_off", "t_bucket", "tma_ok"])
def _recompute_kv_kernel(
        x_ptr, wk_ptr, wv_ptr, bk_ptr, bv_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, cs_ptr, kn_ptr, y_ptr, xs_ptr,
        T, hidden, num_kv_heads, stride_x, stride_wk, stride_wv, stride_cs, stride_y, y_v_off,
        c_s0, c_s1, c_s2, c_s3, block_size, k_scale, v_scale, eps,
        t_bucket, tma_ok,  # autotune keys only: tune per power-of-two bucket of T, and per TMA eligibility
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, ROT_DIM: tl.constexpr, NEOX: tl.constexpr,
        HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, HAS_KNORM: tl.constexpr, FP8_MAX: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
        HEADS: tl.constexpr, TMA: tl.constexpr, PROJECTED: tl.constexpr, X_SCALED: tl.constexpr):
    """One [BLOCK_T, HEADS * head] tile of K or V of HEADS adjacent KV heads per program. 1-D grid
    over (token tile, K/V x head group), grouped so GROUP_T token tiles share L2. K and V programs
    share one main loop: only pointers differ, and the K-only epilogue sits behind a uniform branch.
    PROJECTED: no main loop; row t of K (V) is y[t * stride_y + k (+ y_v_off)], ready projected.
    X_SCALED: x (or the rows y was projected from) holds fp8 rows; row t is scaled by xs[t]."""
    N: tl.constexpr = HEADS * HEAD_PAD
    pid = tl.program_id(0)
    num_t = tl.cdiv(T, BLOCK_T)
    groups = num_kv_heads // HEADS
    per_group = GROUP_T * 2 * groups
    first_t = (pid // per_group) * GROUP_T
    group_t = tl.minimum(num_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_t
    pid_n = (pid % per_group) // group_t
    is_k = pid_n < groups
    if is_k:
        head0 = pid_n * HEADS
        w_ptr, stride_w, cache_ptr, scale = wk_ptr, stride_wk, kc_ptr, k_scale
    else:
        head0 = (pid_n - groups) * HEADS
        w_ptr, stride_w, cache_ptr, scale = wv_ptr, stride_wv, vc_ptr, v_scale

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    cols = tl.arange(0, HEAD_PAD)
    n = tl.arange(0, N)
    if NEOX and 0 < ROT_DIM and ROT_DIM < HEAD_PAD:  # V uses the same order: loads and stores agree
        dims = _neox_partial_order(cols, ROT_DIM, HEAD_PAD)
        n_dims = _neox_partial_order(n % HEAD_PAD, ROT_DIM, HEAD_PAD)
    else:
        dims = cols
        n_dims = n % HEAD_PAD
    d_mask = dims < HEAD
    n_mask = n_dims < HEAD
    w_row = (head0 + n // HEAD_PAD) * HEAD + n_dims  # weight (and bias) row of each tile column

    if PROJECTED:
        y_rows = y_ptr + offs_t.to(tl.int64)[:, None] * stride_y + tl.where(is_k, 0, y_v_off)
        acc = tl.load(y_rows + w_row[None, :], mask=t_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    else:
        acc = _project(x_ptr, w_ptr, T, hidden, num_kv_heads, stride_x, stride_w, pid_t, head0, offs_t, t_mask,
                       w_row, n_mask, HEAD, N, BLOCK_T, BLOCK_K, TMA, DOT_PRECISION, DOT_F32, X_SCALED)
    if X_SCALED:  # (s_t q_t) . w = s_t (q_t . w): one scale per row of the tile
        acc *= tl.load(xs_ptr + offs_t, mask=t_mask, other=1.0)[:, None]

    # Each bias load is masked off entirely in the other half of the grid (`n_mask & is_k` would read
    # better, but the interpreter turns bool & scalar-bool into ints).
    if HAS_BK:
        b = tl.load(bk_ptr + w_row, mask=n_dims < tl.where(is_k, HEAD, 0), other=0.0)
        acc += b.to(tl.float32)[None, :]
    if HAS_BV:
        b = tl.load(bv_ptr + w_row, mask=n_dims < tl.where(is_k, 0, HEAD), other=0.0)
        acc += b.to(tl.float32)[None, :]

    # From here on [token, head, dim].
    acc = tl.reshape(acc, [BLOCK_T, HEADS, HEAD_PAD])
    if HAS_KNORM or ROT_DIM > 0:
        if is_k:
            if HAS_KNORM:
                inv_rms = tl.rsqrt(tl.sum(acc * acc, axis=2) / HEAD + eps)
                norm_w = tl.load(kn_ptr + dims, mask=d_mask, other=0.0).to(tl.float32)
                acc = acc * inv_rms[:, :, None] * norm_w[None, None, :]
            if ROT_DIM > 0:
                acc = _rope(acc, pos_ptr, cs_ptr, offs_t, t_mask, stride_cs, BLOCK_T, HEADS, HEAD_PAD, ROT_DIM, NEOX)
    if FP8_MAX > 0:
        acc = tl.clamp(acc / scale, -FP8_MAX, FP8_MAX)

    slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1).to(tl.int64)
    rows = (slots // block_size) * c_s0 + (slots % block_size) * c_s1
    heads = (head0 + tl.arange(0, HEADS)) * c_s2
    ptrs = cache_ptr + rows[:, None, None] + heads[None, :, None] + (dims * c_s3)[None, None, :]
    tl.store(ptrs, acc.to(cache_ptr.dtype.element_ty), mask=(slots >= 0)[:, None, None] & d_mask[None, None, :])


def _next_pow2(n: int) -> int:
    """triton.next_power_of_2 costs microseconds per call on the launch path; this does not."""
    return 1 << max(n - 1, 0).bit_length()


def _config(block_t: int, block_k: int, warps: int, stages: int, heads: int = 1,
            tma: bool = False) -> triton.Config:
    return triton.Config({"BLOCK_T": block_t, "BLOCK_K": block_k, "HEADS": heads, "TMA": tma},
                         num_warps=warps, num_stages=stages)


def _fixed_config(T: int, head_pad: int, elem: int) -> dict:
    """Small T, and the CPU interpreter, where autotuning would only cost time: the tallest tile T
    needs (<= 64 rows), 64 accumulator registers per thread, the widest K step that fits smem."""
    block_t = min(64, max(16, _next_pow2(T)))
    warps = 8 if block_t * head_pad > 64 * 32 * 4 else 4
    stages = 3
    block_k = next(bk for bk in (128, 64, 32, 16) if stages * (block_t + head_pad) * bk * elem <= 160 * 1024)
    return {"BLOCK_T": block_t, "BLOCK_K": block_k, "HEADS": 1, "TMA": False, "num_warps": warps,
            "num_stages": stages}


# H100 candidates (BLOCK_T, BLOCK_K, warps, stages[, heads, tma]): 128-row tiles feed wgmma for
# large T; 32/64-row tiles give small T enough programs to cover 132 SMs; (64, 64, 8) is the big-tile
# choice for head 256. Two heads of 128 make the 128 x 256 x 64 tile of Triton's Hopper matmul
# tutorial; TMA loads replace cp.async (the 2026-11-23 H100 run, one head per program and no TMA,
# picked 256 x 128 x 64 at T >= 4096 and reached 74-80% of cuBLAS).
TUNE_CONFIGS = [
    _config(32, 128, 4, 4),
    _config(64, 64, 4, 4),
    _config(64, 128, 4, 3),
    _config(64, 64, 8, 4),
    _config(128, 64, 4, 4),
    _config(128, 64, 8, 4),
    _config(128, 128, 8, 3),
    _config(256, 64, 8, 3),
    _config(64, 64, 4, 4, heads=2),
    _config(64, 64, 8, 4, heads=2),
    _config(128, 64, 8, 3, heads=2),
    _config(128, 64, 8, 4, heads=2),
    _config(256, 64, 8, 3, tma=True),
    _config(128, 64, 8, 3, heads=2, tma=True),
    _config(128, 64, 8, 4, heads=2, tma=True),
]
_MAX_N = 256  # wgmma's widest N
_SMEM_BUDGET = 225 * 1024  # H100: 227 KiB of shared memory per block
# fp32 accumulator registers per thread: ptxas (sm_90, Triton 3.6) spills nothing at 128 and
# kilobytes at 256 (tests/test_kernel_sm90.py).
_MAX_ACC_REGS = 128


def config_name(config: triton.Config) -> str:
    """Token rows, heads and K step of the tile, warps, stages, load kind (for benchmark tables)."""
    k = config.kwargs
    return (f"T{k['BLOCK_T']} H{k['HEADS']} K{k['BLOCK_K']} w{config.num_warps} s{config.num_stages} "
            f"{'tma' if k['TMA'] else 'cp.async'}")


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than the T bucket, head groups that do not divide the KV heads, TMA where the
    operands do not allow it (`_tma_eligible`), and tiles that would spill or overflow shared memory (falling back to
    the small-T config, which always fits)."""
    args = {**named_args, **kwargs}
    head_pad, elem = args["HEAD_PAD"], args["wk_ptr"].element_size()  # fp8 x is cast to w's dtype
    max_t = max(32, args["t_bucket"] // 2)

    def fits(c: triton.Config) -> bool:
        bt, bk, heads = c.kwargs["BLOCK_T"], c.kwargs["BLOCK_K"], c.kwargs["HEADS"]
        n = heads * head_pad
        regs = bt * n // (32 * c.num_warps)
        smem = c.num_stages * (bt + n) * bk * elem
        return (bt <= max_t and args["num_kv_heads"] % heads == 0 and n <= _MAX_N
                and (args["tma_ok"] or not c.kwargs["TMA"]) and regs <= _MAX_ACC_REGS and smem <= _SMEM_BUDGET)

    fixed = _fixed_config(args["t_bucket"], head_pad, elem)
    fallback = _config(fixed["BLOCK_T"], fixed["BLOCK_K"], fixed["num_warps"], fixed["num_stages"])
    return [c for c in configs if fits(c)] or [fallback]


# Timings persist in Triton's cache dir: a restart does not tune (and stall a restore) again.
_tuned_kernel = triton.autotune(
    configs=TUNE_CONFIGS,
    key=["t_bucket", "tma_ok", "hidden", "num_kv_heads", "HEAD_PAD"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(_recompute_kv_kernel)


def _tma_eligible(x: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, head_size: int, head_pad: int,
                  rotary_dim: int, is_neox: bool) -> bool:
    """TMA boxes need 16-byte aligned bases and row strides, and each program's weight rows to be one
    contiguous box (no head padding, no permuted partial-rotary rows)."""
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in (x, w_k, w_v))
    return aligned and head_size == head_pad and not (is_neox and 0 < rotary_dim < head_size)


def _merged_weight(w_k: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor | None:
    """[W_k; W_v] as one view when W_v directly follows W_k in the same storage (vLLM's merged QKV
    weight), so that one GEMM projects both."""
    rows = w_k.shape[0]
    same = w_k.untyped_storage().data_ptr() == w_v.untyped_storage().data_ptr()
    if same and w_v.stride() == w_k.stride() and (
            w_v.data_ptr() == w_k.data_ptr() + rows * w_k.stride(0) * w_k.element_size()):
        return w_k.as_strided((2 * rows, w_k.shape[1]), w_k.stride())
    return None


def _epilogue_config(T: int) -> dict:
    """The epilogue alone moves each value once: a small tile, nothing to tune. 16 values per thread
    at head 128 (sm_90, Triton 3.6: 728 SASS instructions for Llama, 1160 for Qwen3, no spills; a 64-row
    tile on 4 warps takes 2008 and 3216 and spills: benchmarks/kernel_sass.py)."""
    block_t = 16 if T <= 16 else 32
    return {"BLOCK_T": block_t, "BLOCK_K": 16, "HEADS": 1, "TMA": False, "num_warps": block_t // 4, "num_stages": 1}


# (shape, dtypes, strides, flags, T bucket) -> "fused" or "split", decided by `_tune_mode` at
# start-up (the runtime tunes every bucket a restore can ask for before serving).
_modes: dict[tuple, str] = {}
_WAYS = {"fused": "the one-pass kernel", "split": "cuBLAS GEMM + the epilogue"}
# What a call that finds no tuned way runs, untimed: its epilogue has a fixed tile, nothing to tune.
UNTUNED_MODE = "split"
_untuned_logged: set[tuple] = set()


def _median_ms(fn: Callable[[], None]) -> float:
    """Triton's benchmark: it synchronizes the device and flushes L2, so start-up only."""
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def _tune_mode(key: tuple, fused: Callable[[], None], split: Callable[[], None]) -> str:
    """Time both ways for this key (a few hundred ms, and the one-pass kernel's tile is autotuned
    on its first launch) and keep the faster. A way that fails to compile or launch here is
    logged and left out; if both fail, this raises."""
    times = {}
    for name, way in (("fused", fused), ("split", split)):
        try:
            way()  # compile (and tune the one-pass kernel's tile) before timing
            times[name] = _median_ms(way)
        except Exception:
            logger.exception("partial_kv: K/V recompute by %s failed; using the other way", _WAYS[name])
    if not times:
        raise RuntimeError("both ways of the Triton K/V recompute failed (tracebacks above)")
    mode = _modes[key] = min(times, key=times.get)
    logger.info("partial_kv: K/V recompute, up to %d tokens: %s; using %s", key[-1],
                ", ".join(f"{_WAYS[n]} {t:.3f} ms" for n, t in times.items()), _WAYS[mode])
    return mode


def _untuned_mode(key: tuple) -> str:
    """A call the start-up tuning did not foresee: run a way that needs no timing now (measuring
    here would stall the device under live requests). The interpreter has no device to time on
    and runs the one-pass kernel."""
    if INTERPRET:
        return "fused"
    if key not in _untuned_logged:
        _untuned_logged.add(key)
        logger.warning("partial_kv: K/V recompute of up to %d tokens was not tuned at start-up; "
                       "using %s, untimed", key[-1], _WAYS[UNTUNED_MODE])
    return UNTUNED_MODE


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
    mode: str | None = None,
    tune: bool = False,
    x_scale: torch.Tensor | None = None,
) -> None:
    """Launch the recompute; inputs are assumed validated (see `recompute_kv`). mode: "fused" (one
    kernel), "split" (cuBLAS GEMM of at most SPLIT_ROWS tokens at a time into a workspace, then the
    kernel's epilogue) or None: the way tuned for this shape and T bucket. tune: time both ways
    first where none is tuned (start-up only: it synchronizes the device); without it an untuned
    call runs UNTUNED_MODE, untimed (the interpreter: "fused"). x_scale: x holds fp8 rows (see
    `recompute_kv`); "split" casts each chunk of them to the weights' dtype for cuBLAS, and the
    epilogue applies the scales."""
    T, hidden = x.shape
    _, block_size, num_kv_heads, head_size = key_cache.shape
    kv_dim = num_kv_heads * head_size
    fp8 = key_cache.dtype in FP8_DTYPES
    rotary_dim = 0 if cos_sin_cache is None else cos_sin_cache.shape[1]
    head_pad = max(16, _next_pow2(head_size))
    tma_ok = int(x_scale is None and _tma_eligible(x, w_k, w_v, head_size, head_pad, rotary_dim, is_neox))
    w_dtype = w_k.dtype
    meta = {
        "HEAD": head_size,
        "HEAD_PAD": head_pad,
        "ROT_DIM": rotary_dim,
        "NEOX": bool(is_neox),
        "HAS_BK": b_k is not None,
        "HAS_BV": b_v is not None,
        "HAS_KNORM": k_norm_weight is not None,
        "FP8_MAX": float(torch.finfo(key_cache.dtype).max) if fp8 else 0.0,
        # fp32 activations: 3xTF32 keeps fp32 accuracy on tensor cores.
        "DOT_PRECISION": "tf32x3" if w_dtype == torch.float32 else "tf32",
        "DOT_F32": INTERPRET and w_dtype == torch.bfloat16,
        "X_SCALED": x_scale is not None,
    }

    def launch(kernel, rows: slice, y: torch.Tensor, stride_y: int, y_v_off: int, **config) -> None:
        n = rows.stop - rows.start
        kernel[lambda m: (triton.cdiv(n, m["BLOCK_T"]) * 2 * (num_kv_heads // m["HEADS"]),)](
            x[rows], w_k, w_v, b_k, b_v, key_cache, value_cache, slot_mapping[rows], positions[rows],
            cos_sin_cache, k_norm_weight, y, None if x_scale is None else x_scale[rows],
            n, hidden, num_kv_heads, x.stride(0), w_k.stride(0), w_v.stride(0),
            0 if cos_sin_cache is None else cos_sin_cache.stride(0), stride_y, y_v_off,
            *key_cache.stride(),  # value_cache has the same strides (validated)
            block_size, float(k_scale or 1.0), float(v_scale or 1.0), float(k_norm_eps),
            _next_pow2(n), tma_ok, **meta, **config)

    def fused() -> None:
        if INTERPRET or T < TUNE_MIN_T:
            launch(_recompute_kv_kernel, slice(0, T), x, 0, 0, PROJECTED=False,
                   **_fixed_config(T, head_pad, w_k.element_size()))
        else:
            launch(_tuned_kernel, slice(0, T), x, 0, 0, PROJECTED=False)

    w_kv = _merged_weight(w_k, w_v)

    def split() -> None:
        chunk = min(T, SPLIT_ROWS)
        y = torch.empty(chunk * 2 * kv_dim, dtype=w_dtype, device=x.device)
        for t0 in range(0, T, chunk):
            rows = slice(t0, min(T, t0 + chunk))
            n = rows.stop - rows.start
            xr = x[rows] if x_scale is None else x[rows].to(w_dtype)
            if w_kv is not None:  # [n, K | V]
                torch.mm(xr, w_kv.t(), out=y[: n * 2 * kv_dim].view(n, 2 * kv_dim))
                stride_y, y_v_off = 2 * kv_dim, kv_dim
            else:  # [K rows | V rows]
                out = y[: n * 2 * kv_dim].view(2, n, kv_dim)
                torch.mm(xr, w_k.t(), out=out[0])
                torch.mm(xr, w_v.t(), out=out[1])
                stride_y, y_v_off = kv_dim, n * kv_dim
            launch(_recompute_kv_kernel, rows, y, stride_y, y_v_off, PROJECTED=True, **_epilogue_config(n))

    if x.is_cuda and not INTERPRET:  # TMA descriptors are built in a per-launch global scratch
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=x.device, dtype=torch.int8))
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        if mode is None:
            key = (x.device, x.dtype, key_cache.dtype, key_cache.stride(), hidden, num_kv_heads, head_size,
                   tuple(meta.items()), tma_ok, w_kv is not None, _next_pow2(T))
            mode = _modes.get(key) or (_tune_mode(key, fused, split) if tune else _untuned_mode(key))
        if mode not in ("fused", "split"):
            raise ValueError(f"mode must be 'fused', 'split' or None, got {mode!r}")
        (fused if mode == "fused" else split)()
