"""Which models recompute K/V from captured activations, and what recomputing a layer takes.

Two checks, which must agree:

- `why_not_matched(vllm_config)`, from configuration alone. The scheduler has no model, yet its
  store plans and the KV/activation memory split depend on the answer, so both halves ask this
  and get the same answer: the architecture vLLM resolved must be one whose attention blocks the
  structural match below is tested on (`MATCHED_ARCHITECTURES`), served by vLLM's own model code for it
  (the class its registry instantiates, not its Transformers backend), and the configured positional
  transform must be one that indexes a fixed cos/sin table by position.
- `match_layers(model)`, on the worker's loaded model, by structure rather than attribute names:
  for every vLLM `Attention` layer in a block of vLLM's own code, the `QKVParallelLinear` beside it
  that feeds it, a per-head RMS K norm where there is one, and the rotary embedding (none: K as
  projected, as with learned positions or ALiBi). The absence of a rotary module proves nothing
  about code that could rotate K in a function, which is why the configuration check names the
  families whose code is known. It is authoritative for *how* K/V are recomputed; where it fails for a
  deployment the configuration admitted, that worker captures nothing and never recomputes (it
  streams K/V and reports blocks kept without K/V as load errors, which vLLM recomputes), with one
  warning: the scheduler's plans can then cost restores, never give wrong K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# vLLM architectures (as vLLM resolved them: `model_config.architecture`) whose attention blocks
# `match_layers` is tested on (tests/test_restore.py builds a tiny model of each).
MATCHED_ARCHITECTURES = frozenset(
    {
        "BloomForCausalLM",  # ALiBi
        "GPT2LMHeadModel",  # learned positions
        "GPTJForCausalLM",  # GPT-J (interleaved) partial rotary
        "GPTNeoXForCausalLM",  # neox partial rotary (0.25); vLLM 0.32 serves it by its Transformers backend
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "OPTForCausalLM",  # learned positions
        "Phi3ForCausalLM",  # LongRoPE
        "PhiForCausalLM",  # Phi-2: partial rotary, biases; vLLM 0.32 serves it by its Transformers backend
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",  # per-head K norm
        "StableLmForCausalLM",  # neox partial rotary (0.25), K bias; vLLM 0.34 serves it by its Transformers backend
    }
)

# Rope types whose vLLM class only fills the cos/sin table differently (the kernel reads it as
# given); "longrope" picks its short or long table once per deployment from max_model_len.
TABLE_ROPE_TYPES = frozenset({"default", "linear", "dynamic", "ntk", "yarn", "llama3", "longrope"})


def why_not_matched(vllm_config) -> str | None:
    """Why this model's K/V cannot be recomputed from its layers' inputs (None when they can)."""
    from vllm_partial_kv import compat

    mc = vllm_config.model_config
    arch = getattr(mc, "architecture", None) or (mc.architectures or ["?"])[0]
    if arch not in MATCHED_ARCHITECTURES:
        named = sorted(set(mc.architectures or []) - {arch})
        via = f" (for {', '.join(named)})" if named else ""
        return f"architecture {arch}{via} is not one of {sorted(MATCHED_ARCHITECTURES)}"
    served = compat.model_class(mc)
    if served is None or not served.startswith("vllm.") or served.startswith(compat.TRANSFORMERS_BACKEND + "."):
        # The name alone says nothing of the code: vLLM 0.32 serves GPT-NeoX and Phi-2 through its
        # Transformers backend, 0.34 StableLM, and model_impl="transformers" any model.
        return f"this vLLM serves {arch} by {served or 'a class outside its registry'}, not by its own model code"
    text = mc.hf_text_config
    if getattr(text, "dual_chunk_attention_config", None):
        return "dual-chunk attention rotates K by chunk, not by position alone"
    for params in _rope_parameter_sets(text):
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind not in TABLE_ROPE_TYPES:
            return f"rope type {kind!r} is not one of {sorted(TABLE_ROPE_TYPES)}"
        if params.get("mrope_section") or params.get("use_fope"):
            return "multimodal or Fourier rotary embeddings rotate K by more than its position"
    return None


def _rope_parameter_sets(text_config) -> list[dict]:
    """Rope parameters as transformers >= 5 (`rope_parameters`, possibly one dict per layer type)
    or earlier releases (`rope_scaling`) spell them."""
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    if params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


@dataclass(frozen=True)
class Rope:
    """K's rotary transform as the kernel takes it: vLLM's own table for this deployment, indexed by
    position, rotating the first `table.shape[1]` dims of each head."""

    module: nn.Module
    is_neox: bool
    long_rope: bool = False  # Phi-3 LongRoPE: one of two stacked tables, chosen once

    @property
    def table(self) -> torch.Tensor:
        """Read at every use, never kept: vLLM may swap the buffer for one of the query's dtype."""
        r = self.module
        if not self.long_rope:
            return r.cos_sin_cache
        rows = r.original_max_position_embeddings
        return r.long_short_cos_sin_cache[rows:] if r.use_long_rope else r.long_short_cos_sin_cache[:rows]

    def apply(self, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """K rotated by vLLM's own module (the torch path)."""
        if self.long_rope:
            return self.module(positions, k.clone(), k)[1]
        return self.module.forward_native(positions, k)[0]

    def describe(self) -> str:
        return (f"{type(self.module).__name__} ({'neox' if self.is_neox else 'GPT-J'} style, "
                f"{self.table.shape[1]} of {self.module.head_size} dims)")


@dataclass(frozen=True)
class Match:
    """What recomputing one layer's K/V needs, found around its `Attention`."""

    attn: nn.Module
    qkv_proj: nn.Module
    k_norm: nn.Module | None
    rope: Rope | None


class Mismatch(ValueError):
    """A layer whose K/V the recompute cannot reproduce; the message says why."""


def match_layers(model: nn.Module) -> dict[str, Match]:
    """Every vLLM Attention layer of `model` by layer name; raises Mismatch naming the first that
    cannot be matched."""
    from vllm_partial_kv import compat

    attention = compat.attention_layer_class()
    found: dict[str, Match] = {}
    for parent in model.modules():
        for attn in parent.children():
            if isinstance(attn, attention):
                found[attn.layer_name] = _match(parent, attn)
    return found


def _match(block: nn.Module, attn: nn.Module) -> Match:
    from vllm.model_executor.layers.linear import QKVParallelLinear

    name = attn.layer_name
    origin = type(block).__module__
    if not origin.startswith("vllm."):
        # vLLM's own blocks rotate K with a module beside the attention; other code (Hugging Face's,
        # under vLLM's Transformers backend) may do it in a plain function this match cannot see.
        raise Mismatch(f"{name}: its attention block {type(block).__name__} is not vLLM's code ({origin})")
    if getattr(attn, "kv_sharing_target_layer_name", None):
        raise Mismatch(f"{name} reads the K/V of {attn.kv_sharing_target_layer_name}")
    fused = [m for m in block.children() if isinstance(m, QKVParallelLinear)]
    if len(fused) != 1:
        raise Mismatch(f"{name}: expected one fused QKV projection beside it, found {len(fused)}")
    qkv = fused[0]
    head = attn.head_size
    if (qkv.num_heads, qkv.num_kv_heads, qkv.head_size) != (attn.num_heads, attn.num_kv_heads, head) or (
        getattr(qkv, "v_head_size", head) != head
    ):
        raise Mismatch(
            f"{name}: its QKV projection has {qkv.num_heads}/{qkv.num_kv_heads} heads of "
            f"{qkv.head_size}, its attention {attn.num_heads}/{attn.num_kv_heads} of {head}"
        )
    return Match(attn=attn, qkv_proj=qkv, k_norm=_k_norm(block, name, head), rope=_rope(block, name, head))


def _k_norm(block: nn.Module, name: str, head: int) -> nn.Module | None:
    """The per-head RMS norm applied to K (vLLM names it `k_norm`; a norm over the whole projection
    or a LayerNorm per head is refused rather than guessed at)."""
    from vllm.model_executor.layers.layernorm import RMSNorm

    others = [n for n, m in block.named_children() if "Norm" in type(m).__name__ and n not in ("q_norm", "k_norm")]
    if others:  # e.g. MPT's qk_ln: a K transform this match would otherwise leave out
        raise Mismatch(f"{name}: norms beside it that may transform K: {', '.join(others)}")
    norm = getattr(block, "k_norm", None)
    if norm is None:
        return None
    weight = getattr(norm, "weight", None)
    if type(norm) is not RMSNorm or weight is None or weight.shape != (head,) or norm.variance_size_override:
        shape = None if weight is None else tuple(weight.shape)
        raise Mismatch(f"{name}: K norm {type(norm).__name__} {shape} is not an RMS norm per head of {head}")
    return norm


def _rope(block: nn.Module, name: str, head: int) -> Rope | None:
    """K's rotary embedding: a vLLM RotaryEmbedding whose subclass only fills its table (linear,
    dynamic NTK, YaRN, Llama-3 ...), or Phi-3's LongRoPE with its table chosen once per deployment.
    No rotary module beside the attention: K is used as projected (learned positions, ALiBi)."""
    from vllm_partial_kv import compat

    plain, root, long_rope = compat.rotary_classes()
    rotary = [m for m in block.children() if isinstance(m, (root, long_rope))]
    if not rotary:
        return None
    if len(rotary) > 1:
        raise Mismatch(f"{name}: {len(rotary)} rotary embeddings beside it")
    r = rotary[0]
    kind = type(r).__name__
    if r.head_size != head:
        raise Mismatch(f"{name}: {kind} rotates heads of {r.head_size}, the attention's are {head}")
    if isinstance(r, long_rope):
        if not hasattr(r, "use_long_rope"):
            raise Mismatch(
                f"{name}: this vLLM's {kind} switches between its short and long factors per batch, "
                "so a token's K depends on the batch it was computed in"
            )
        return Rope(r, is_neox=True, long_rope=True)
    overridden = [m for m in _FORWARDS if getattr(type(r), m, None) is not getattr(plain, m, None)]
    if not isinstance(r, plain) or overridden:
        raise Mismatch(f"{name}: {kind} rotates K its own way ({', '.join(overridden) or 'not a table rotary'})")
    if r.cos_sin_cache.shape[1] != r.rotary_dim:
        raise Mismatch(f"{name}: {kind} table has {r.cos_sin_cache.shape[1]} columns for {r.rotary_dim} dims")
    return Rope(r, is_neox=bool(r.is_neox_style))


_FORWARDS = ("forward", "forward_native", "forward_static", "forward_cuda", "forward_cpu", "forward_hip",
             "forward_xpu", "_match_cos_sin_cache_dtype")
