"""Activation capture: each attention layer's K/V-projection input rows, written by slot.

A forward hook on the layer's fused QKV projection (found by `matcher`) calls one custom op. The
op is opaque to torch.compile and writes with a fixed-address `index_copy_` driven by vLLM's own
slot mapping, so it is safe inside CUDA graphs: replays write the rows of whatever batch is
running. Rows live in a small capture space (blocks of block_size rows), not one row per KV slot:
a fixed-address int32 map from KV block to capture block (-1: not captured), rewritten in place
before each forward, sends slot s to row map[s // block_size] * block_size + s % block_size, and
uncaptured slots and padding to a spare last row. Under tensor parallelism a rank keeps only its
shard of each row's columns (the shards in rank order make the row). The hooks go in, and the
buffers are bound (`device_buffers`), right after the model is loaded: before vLLM's profiling run,
compilation, warm-up and CUDA-graph capture, which vLLM 0.34 runs before it creates the connector.
The map is sized from an upper bound on KV block ids known then; a block id past it goes to the
spare row (the worker refuses a KV cache with more blocks at start-up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from vllm_partial_kv import compat, matcher

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


@dataclass
class LayerRecompute:
    """What recomputing one layer's K/V needs: views of its own weights, never copies."""

    attn: nn.Module  # vLLM's Attention layer (its impl writes the paged cache)
    qkv_proj: nn.Module
    q_size: int
    kv_size: int
    hidden_size: int
    k_norm: nn.Module | None
    rope: matcher.Rope | None  # None: K as projected (learned positions, ALiBi)

    @property
    def w_k(self) -> torch.Tensor:
        return self.qkv_proj.weight[self.q_size : self.q_size + self.kv_size]

    @property
    def w_v(self) -> torch.Tensor:
        return self.qkv_proj.weight[self.q_size + self.kv_size : self.q_size + 2 * self.kv_size]

    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        bias = getattr(self.qkv_proj, "bias", None)
        if bias is None:
            return None, None
        q, kv = self.q_size, self.kv_size
        return bias[q : q + kv], bias[q + kv : q + 2 * kv]

    @property
    def has_dense_weight(self) -> bool:
        """False where vLLM repacked the weight for its CPU GEMM and dropped the dense copy."""
        return self.qkv_proj.weight.numel() > 0

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V through the layer's own linear method (no forward hooks, so no capture):
        whatever GEMM and weight packing vLLM chose for this layer is reused."""
        qkv = self.qkv_proj
        bias = None if getattr(qkv, "skip_bias_add", False) else getattr(qkv, "bias", None)
        out = qkv.quant_method.apply(qkv, x, bias)
        q, kv = self.q_size, self.kv_size
        return out[:, q : q + kv], out[:, q + kv : q + 2 * kv]


_LAYERS: dict[str, LayerRecompute] = {}
_BUFFERS: dict[str, torch.Tensor] = {}
_MAP: list[tuple[torch.Tensor, int]] = []  # (KV block -> capture block, block size), once bound
_COLUMNS: list[int] = [0, 0]  # this rank's columns of a row, [start, end)
_NOT_INSTALLED: list[str] = []  # why the last install hooked nothing


def layers() -> dict[str, LayerRecompute]:
    return _LAYERS


def why_not_installed() -> str | None:
    """Why the structural match refused this process's model (None: hooked, or never asked)."""
    return _NOT_INSTALLED[0] if _NOT_INSTALLED else None


def bind_buffers(buffers: dict[str, torch.Tensor], block_map: torch.Tensor | None = None,
                 block_size: int = 0, first_column: int = 0) -> None:
    """Capture space per layer, [capture_blocks * block_size + 1, columns] (the spare last row
    takes padding and uncaptured slots), the int32 map from KV block to capture block, and where
    this rank's columns start in a row."""
    _BUFFERS.clear()
    _BUFFERS.update(buffers)
    _MAP.clear()
    if block_map is not None:
        _MAP.append((block_map, block_size))
    width = next(iter(buffers.values())).shape[-1] if buffers else 0
    _COLUMNS[:] = first_column, first_column + width


def capture_rows(slots: torch.Tensor, block_map: torch.Tensor, block_size: int, spare: int) -> torch.Tensor:
    """Capture-space row of each slot: its KV block's capture block and offset, or `spare` for
    padding (slot -1), blocks without a capture block and blocks past the map."""
    slots = slots.to(torch.long)
    kv_blocks = slots // block_size
    outside = (slots < 0) | (kv_blocks >= block_map.shape[0])
    blocks = block_map[kv_blocks.clamp(0, block_map.shape[0] - 1)].to(torch.long)
    rows = blocks * block_size + slots % block_size
    return torch.where(outside | (blocks < 0), torch.full_like(rows, spare), rows)


@torch.library.custom_op("partial_kv::capture", mutates_args=("qkv_out",))
def capture_op(x: torch.Tensor, qkv_out: torch.Tensor, layer_name: str) -> None:
    # `qkv_out` is declared mutated (it is not) only so that the compiler keeps this op, in order.
    buf = _BUFFERS.get(layer_name)
    if buf is None or not _MAP:
        return
    slots = compat.current_slot_mapping(layer_name)
    if slots is None:
        return
    n = min(x.shape[0], slots.shape[0])
    block_map, block_size = _MAP[0]
    start, end = _COLUMNS
    rows = capture_rows(slots[:n], block_map, block_size, buf.shape[0] - 1)
    buf.index_copy_(0, rows, x[:n, start:end].to(buf.dtype))


@capture_op.register_fake
def _(x: torch.Tensor, qkv_out: torch.Tensor, layer_name: str) -> None:
    return None


def _hook(layer_name: str):
    def hook(module: nn.Module, args: tuple, output):
        out = output[0] if isinstance(output, tuple) else output
        torch.ops.partial_kv.capture(args[0], out, layer_name)

    return hook


def why_not_captured(vllm_config) -> str | None:
    """Why recomputing from this deployment's captured activations would not give back its K/V
    (None when it would): the plugin then offloads plain K/V."""
    mc = vllm_config.model_config
    if getattr(mc, "quantization", None) is not None:
        return f"its K/V projections are quantized ({mc.quantization})"
    unmatched = matcher.why_not_matched(vllm_config)
    if unmatched is not None:
        return unmatched
    if getattr(vllm_config, "lora_config", None) is not None:
        return "LoRA adapters may change the K/V projection of each request"
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None and (spec.use_eagle() or spec.uses_draft_model()):
        return f"speculative decoding ({spec.method}) loads a draft model whose layers are not hooked"
    return None


def install(model: nn.Module, vllm_config) -> None:
    """Hook every attention block of a freshly loaded model (called by the model-loader wrap
    when `deployment.activations_wanted`). Where the structure refuses a model the configuration
    check admitted, nothing is hooked and one warning says why: this worker then never recomputes
    (`why_not_installed`, read by the worker half)."""
    _LAYERS.clear()
    _NOT_INSTALLED.clear()
    try:
        matches = matcher.match_layers(model)
        if not matches:
            raise matcher.Mismatch("no vLLM Attention layer found to capture activations for")
        described = {name: _describe(match) for name, match in matches.items()}
    except matcher.Mismatch as e:
        _NOT_INSTALLED.append(str(e))
        logger.warning(
            "partial_kv: cannot recompute from activations: %s, although this model's configuration passes "
            "the check the scheduler makes; this worker offloads plain K/V (please report it)", e,
        )
        return
    for name, match in matches.items():
        _LAYERS[name] = described[name]
        match.qkv_proj.register_forward_hook(_hook(name))
    first = next(iter(_LAYERS.values()))
    logger.info(
        "partial_kv: capturing K/V-projection inputs of %d layers of %s; K is recomputed from its QKV "
        "projection (%s bias)%s, %s", len(_LAYERS), type(model).__name__,
        "with" if getattr(first.qkv_proj, "bias", None) is not None else "no",
        ", RMS norm per head" if first.k_norm is not None else "",
        f"rotated by {first.rope.describe()}" if first.rope is not None else "not rotated",
    )
    # vLLM's compile cache must not hand this run a graph traced without the hooks.
    compat.add_to_compile_key(vllm_config, "partial_kv_capture", "qkv_proj inputs")


def _describe(match: matcher.Match) -> LayerRecompute:
    attn, qkv = match.attn, match.qkv_proj
    head = attn.head_size
    q_size, kv_size = attn.num_heads * head, attn.num_kv_heads * head
    weight = getattr(qkv, "weight", None)
    method = type(getattr(qkv, "quant_method", None)).__name__
    if weight is None or not weight.is_floating_point() or method != "UnquantizedLinearMethod":
        raise matcher.Mismatch(f"{attn.layer_name}: its QKV projection is quantized ({method})")
    if qkv.output_size_per_partition != q_size + 2 * kv_size:
        raise matcher.Mismatch(
            f"{attn.layer_name}: its QKV projection has {qkv.output_size_per_partition} "
            f"outputs, expected {q_size + 2 * kv_size}"
        )
    return LayerRecompute(
        attn=attn,
        qkv_proj=qkv,
        q_size=q_size,
        kv_size=kv_size,
        hidden_size=qkv.input_size,
        k_norm=match.k_norm,
        rope=match.rope,
    )
