"""Deployment decisions both halves (and both processes) must take identically, from
configuration alone: the model's shape, whether activations are kept, and how much memory the
plugin's buffers take beside the KV cache."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from vllm.distributed.utils import get_pp_indices
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

from vllm_partial_kv import formats, planner
from vllm_partial_kv.capture import why_not_captured
from vllm_partial_kv.config import ConfigError, PartialKVConfig, parse_config
from vllm_partial_kv.fp8_copies import staging_bytes as fp8_staging_bytes
from vllm_partial_kv.kernels import SPLIT_ROWS
from vllm_partial_kv.profiler import device_peak_bytes

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


def extra_config(vllm_config) -> dict[str, Any]:
    return dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})


def uses_this_connector(vllm_config) -> bool:
    kv = getattr(vllm_config, "kv_transfer_config", None)
    return kv is not None and kv.kv_connector == "PartialRecomputeConnector"


def model_shape(vllm_config, block_size: int | None = None) -> planner.ModelShape:
    mc, parallel = vllm_config.model_config, vllm_config.parallel_config
    hidden, head = mc.get_hidden_size(), mc.get_head_size()
    kv_heads = mc.get_num_kv_heads(parallel)
    return planner.ModelShape(
        num_layers=mc.get_num_layers(parallel),
        hidden_size=hidden,
        num_kv_heads=kv_heads,
        head_size=head,
        dtype_bytes=mc.dtype.itemsize,
        kv_dtype_bytes=kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, mc).itemsize,
        block_size=block_size or vllm_config.cache_config.block_size,
        forward_ratio=forward_ratio(
            mc.hf_text_config, hidden, mc.get_num_attention_heads(parallel) * head, kv_heads * head,
            parallel.tensor_parallel_size,
        ),
        act_shards=activation_shards(vllm_config),
        host_format=parse_config(extra_config(vllm_config)).host_format if uses_this_connector(vllm_config) else "auto",
    )


def check_storage_parallelism(vllm_config, cfg: PartialKVConfig) -> None:
    """The storage tier runs with one worker: under tensor or pipeline parallelism each rank would
    read its files and start its restore when its own reads finish, out of step with the joins and
    agreements the ranks' restores need."""
    parallel = vllm_config.parallel_config
    if cfg.storage_dir and parallel.tensor_parallel_size * parallel.pipeline_parallel_size > 1:
        raise ConfigError(
            "storage_dir: the storage tier runs with tensor_parallel_size and pipeline_parallel_size 1 "
            f"(got {parallel.tensor_parallel_size} and {parallel.pipeline_parallel_size}); unset storage_dir "
            "to offload to host memory only"
        )


def served_layout(cfg: PartialKVConfig, with_act: bool) -> str:
    """The host layout served: without activations every layout is "kv"."""
    return cfg.host_layout if with_act else "kv"


def over_ranks(vllm_config, block_bytes: int, num_layers: int) -> int:
    """A block's bytes over all ranks, from one rank's `block_bytes` for its `num_layers` layers:
    `cpu_bytes` is the total across ranks, as vLLM's `--kv-offloading-size` is.

    Every rank keeps every slot, for its own heads (tensor parallel) and its own layers (pipeline
    stage). Counting all layers rather than this stage's keeps the scheduler (which sees stage 0's
    layers) and every worker on one slot count, even when the stages hold different numbers of
    layers."""
    total_layers = vllm_config.model_config.get_total_num_hidden_layers()
    tp = vllm_config.parallel_config.tensor_parallel_size
    return tp * total_layers * block_bytes // num_layers


def activation_shards(vllm_config) -> int:
    """Tensor-parallel ranks each keep 1/TP of every activation row's columns, so a rank's host
    and PCIe bytes shrink with its K/V; a restore joins the shards over the group before the
    recompute. Rows that do not split evenly are kept whole on every rank."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    return tp if vllm_config.model_config.get_hidden_size() % tp == 0 else 1


def planning_shape(vllm_config) -> planner.ModelShape:
    """The shape every rank plans a restore's split with: the same on every pipeline stage (the
    largest stage's layer count, by vLLM's own partition), so that all ranks restore the same
    blocks the same way."""
    pp = vllm_config.parallel_config.pipeline_parallel_size
    layers = vllm_config.model_config.get_total_num_hidden_layers()
    stages = (get_pp_indices(layers, rank, pp) for rank in range(pp))
    return replace(model_shape(vllm_config), num_layers=max(end - start for start, end in stages))


def forward_ratio(hf_config, hidden: int, q_dim: int, kv_dim: int, tp: int = 1) -> float:
    """A layer's projection GEMMs per token (QKV, output, MLP: gated unless the config names an
    OPT-style `ffn_dim`) in units of its K/V projection's, for the planner's forward model."""
    if getattr(hf_config, "ffn_dim", None):
        mlp = 2 * hidden * hf_config.ffn_dim
    else:
        mlp = 3 * hidden * (getattr(hf_config, "intermediate_size", None) or 4 * hidden)
    return (hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + mlp / tp) / (2 * hidden * kv_dim)


_warned_no_capture: set[str] = set()  # reasons already logged (both halves ask, each process)


def activations_wanted(vllm_config) -> bool:
    """Both halves decide this the same way, from configuration alone.

    Activations are kept when a fixed ratio > 0 asks for them, or in auto mode when they are
    smaller than the K/V they replace (multi-head attention); for grouped-query models they are
    larger, so recompute from them can only lose and auto mode stores plain K/V.
    """
    if not uses_this_connector(vllm_config):
        return False
    cfg = parse_config(extra_config(vllm_config))
    reason = why_not_captured(vllm_config)
    if reason is not None:
        if cfg.recompute_ratio != 0 and reason not in _warned_no_capture:
            _warned_no_capture.add(reason)
            logger.warning("partial_kv: cannot recompute from activations: %s; offloading plain KV instead", reason)
        return False
    if cfg.wants_activations is not None:
        return cfg.wants_activations
    shape = model_shape(vllm_config)
    return shape.act_bytes_per_token < shape.kv_bytes_per_token


DEFAULT_CAPTURE_TOKENS = 4096
"""The default capture space's ceiling, in tokens per layer. Covering a whole step at vLLM's GPU
defaults (1024 sequences, 16384 batched tokens) would take 8 GiB for a 7B multi-head model,
14% of its KV cache on an 80 GB GPU; 4096 tokens take 1 GiB (2%). Past it, blocks are stored
without activations: their restores stream K/V instead of recomputing them."""


def capture_blocks(vllm_config) -> int:
    """Capture blocks (block_size activation rows per layer each). Lent to a KV block while it is
    filled and until its store is issued, so at most one partial block per running sequence plus
    the blocks one step's tokens start are lent at once; never sized from the KV cache."""
    cfg = parse_config(extra_config(vllm_config))
    block_size = vllm_config.cache_config.block_size
    tokens = cfg.capture_tokens
    if tokens is None:
        sched = vllm_config.scheduler_config
        tokens = min(sched.max_num_seqs * block_size + sched.max_num_batched_tokens, DEFAULT_CAPTURE_TOKENS)
    return -(-tokens // block_size)


def device_bytes(vllm_config) -> int:
    """What `device_buffers` allocates on the model's device at model load when activations are
    kept, so that vLLM's memory profiling counts it: the capture space (plus the row that takes
    padding) and the restore staging (the map from KV block to capture block adds 4 bytes per KV
    block the device could hold, under 0.01% of its memory)."""
    shape = model_shape(vllm_config)
    rows = capture_blocks(vllm_config) * shape.block_size + 1
    capture = rows * shape.capture_bytes_per_token * shape.num_layers
    return capture + staging_bytes(shape, parse_config(extra_config(vllm_config)))


def kv_block_bound(vllm_config, device_total: int) -> int:
    """More KV blocks than vLLM can make on this rank, known before it makes any: the override if
    set, else what kv_cache_memory_bytes or the whole device (`device_total` bytes) holds at the
    K and V bytes of a block of this rank's layers (vLLM's pages are never smaller)."""
    cache = vllm_config.cache_config
    if cache.num_gpu_blocks_override:
        return cache.num_gpu_blocks_override
    shape = model_shape(vllm_config)
    per_block = shape.block_size * 2 * shape.num_kv_heads * shape.head_size * shape.kv_dtype_bytes * shape.num_layers
    return (cache.kv_cache_memory_bytes or device_total) // per_block + 1


def staging_bytes(shape: planner.ModelShape, cfg: PartialKVConfig) -> int:
    """The restore runtime's two GPU staging buffers for the activations of recomputed tokens and
    their slots and positions. One layer's worth at a time (double-buffered), so 1/num_layers of
    what the largest restore step moves: 256 MiB for a 7B model at the default 16384 tokens, half
    a percent of its KV cache on an 80 GB GPU. Under tensor parallelism the staging holds this
    rank's shards, and one layer's whole rows are joined beside it (the all-gather's output and
    the rows in token order)."""
    tokens = cfg.max_recompute_tokens - cfg.max_recompute_tokens % shape.block_size
    joined = 2 * tokens * shape.hidden_size * shape.dtype_bytes if shape.act_shards > 1 else 0
    return 2 * tokens * shape.act_bytes_per_token + 2 * 8 * tokens + joined


def late_device_bytes(shape: planner.ModelShape, cfg: PartialKVConfig, profiling: bool) -> int:
    """What the worker half still allocates on the device after vLLM sized its KV cache: the
    recompute GEMM's workspace (one chunk of K and V, kept by torch's allocator; with fp8 rows also
    one chunk of them cast to the model's dtype) and, while the start-up profile is measured, what
    measuring takes. The fp8 host store's quantize staging is `fp8_late_device_bytes`."""
    k_and_v = 2 * shape.num_kv_heads * shape.head_size * shape.dtype_bytes
    chunk = min(cfg.max_recompute_tokens, SPLIT_ROWS)
    workspace = chunk * k_and_v
    if formats.quantizes_activations(shape.host_format):
        workspace += chunk * shape.hidden_size * shape.dtype_bytes
    return workspace + (device_peak_bytes(shape) if profiling else 0)


def fp8_late_device_bytes(shape: planner.ModelShape, with_act: bool) -> int:
    """The fp8 host store's quantize/dequantize staging (`fp8_copies`), made by the worker half after
    vLLM sized its KV cache (0 in the "auto" format)."""
    if not formats.quantizes_activations(shape.host_format):
        return 0
    kv = (shape.num_kv_heads, shape.head_size) if formats.quantizes_kv(shape.host_format, shape.kv_dtype_bytes) \
        else None
    return fp8_staging_bytes(shape.block_size, kv, shape.hidden_size // shape.act_shards if with_act else None)
