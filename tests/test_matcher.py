"""The matcher on vLLM's own rotary classes: every admitted variant gives the kernel (Triton in the
interpreter, and torch) a table from which it writes the K that vLLM's module computes; variants
that rotate K some other way are refused by name, from configuration and from structure."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers import rotary_embedding
from vllm.model_executor.layers.rotary_embedding import phi3_long_rope_scaled_rope

from vllm_partial_kv import matcher
from vllm_partial_kv.kernels import recompute_kv  # TRITON_INTERPRET: conftest

HEAD, HEADS, HIDDEN, T, BLOCK = 32, 2, 48, 11, 16
MAX_POS, ORIGINAL = 256, 64
THETA = {"rope_theta": 10000.0}
ADMITTED = {
    "default": (True, {"rope_type": "default", **THETA}),
    "gptj_partial": (False, {"rope_type": "default", "partial_rotary_factor": 0.25, **THETA}),
    "neox_partial": (True, {"rope_type": "default", "partial_rotary_factor": 0.5, **THETA}),
    "linear": (True, {"rope_type": "linear", "factor": 2.0, **THETA}),
    "dynamic_ntk": (True, {"rope_type": "dynamic", "factor": 2.0, **THETA}),
    "yarn": (True, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, **THETA}),
    "llama3": (True, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": ORIGINAL, **THETA}),
    "longrope_short": (True, {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL,
                              "short_factor": [1.0 + i / 16 for i in range(16)],
                              "long_factor": [1.0 + i / 2 for i in range(16)], **THETA}),
}
ADMITTED["longrope_long"] = ADMITTED["longrope_short"]


def _block(params: dict, is_neox: bool, monkeypatch, max_model_len: int = MAX_POS) -> nn.Module:
    """An attention block holding the rotary embedding vLLM builds for `params` (afresh: vLLM
    caches them by shape). LongRoPE reads max_model_len from the current vLLM config, which has no
    model here: only that value is stood in."""
    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))
    monkeypatch.setattr(phi3_long_rope_scaled_rope, "get_current_vllm_config", lambda: config)
    monkeypatch.setattr(rotary_embedding, "_ROPE_DICT", {})
    block = nn.Module()
    with set_current_vllm_config(VllmConfig()):
        block.rotary_emb = rotary_embedding.get_rope(HEAD, MAX_POS, is_neox_style=is_neox,
                                                     rope_parameters=dict(params), dtype=torch.float32)
    return block


def _vllm_rotated_k(rotary: nn.Module, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if hasattr(rotary, "forward_native"):
        return rotary.forward_native(positions, k.clone(), k.clone())[1]
    return rotary(positions, k.clone(), k.clone())[1]  # LongRoPE: a plain module


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(ADMITTED))
def test_admitted_rotary_gives_the_kernel_vllms_k(name: str, backend: str, monkeypatch) -> None:
    is_neox, params = ADMITTED[name]
    long = name == "longrope_long"
    block = _block(params, is_neox, monkeypatch, max_model_len=MAX_POS if long else ORIGINAL)
    rope = matcher._rope(block, "layer", HEAD)
    assert rope is not None and rope.is_neox == is_neox
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(T, HIDDEN, generator=g)
    w_k, w_v = torch.randn(2, HEADS * HEAD, HIDDEN, generator=g) / HIDDEN**0.5
    # Positions past the short table only where the long one is in use (as vLLM's max_model_len bounds them).
    positions = torch.randint(0, MAX_POS if long else ORIGINAL, (T,), generator=g)
    kv = torch.zeros(2, -(-T // BLOCK), BLOCK, HEADS, HEAD)
    slots = torch.arange(T)
    recompute_kv(x, w_k, w_v, kv[0], kv[1], slots, positions, rope.table, is_neox=rope.is_neox, backend=backend)
    want = _vllm_rotated_k(block.rotary_emb, positions, x @ w_k.T)
    got = kv[0].flatten(0, 1)[:T].flatten(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rope.apply(positions, x @ w_k.T), want)  # the torch path's own module call


@pytest.mark.parametrize("params, match", [
    ({"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, **THETA},
     "DeepseekScalingRotaryEmbedding"),
    ({"rope_type": "default", "mrope_section": [4, 6, 6], **THETA}, "MRotaryEmbedding"),
])
def test_rotary_that_rotates_k_its_own_way_is_refused(params: dict, match: str, monkeypatch) -> None:
    with pytest.raises(matcher.Mismatch, match=match):
        matcher._rope(_block(params, True, monkeypatch), "layer", HEAD)


def test_longrope_switching_per_batch_is_refused(monkeypatch) -> None:
    """Older vLLM releases picked LongRoPE's table per batch: a token's K then depends on its batch."""
    block = _block(ADMITTED["longrope_short"][1], True, monkeypatch)
    del block.rotary_emb.use_long_rope
    with pytest.raises(matcher.Mismatch, match="per batch"):
        matcher._rope(block, "layer", HEAD)


def _config(arch: str, **text) -> SimpleNamespace:
    model = SimpleNamespace(architecture=arch, architectures=[arch], hf_text_config=SimpleNamespace(**text))
    return SimpleNamespace(model_config=model)


@pytest.mark.parametrize("text, reason", [
    ({}, None),
    ({"rope_parameters": ADMITTED["yarn"][1]}, None),
    ({"rope_scaling": {"type": "longrope"}}, None),  # transformers 4.x spelling
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear"}}},
     None),
    ({"rope_parameters": {"rope_type": "deepseek_yarn"}}, "rope type 'deepseek_yarn'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "mllama4"}}},
     "rope type 'mllama4'"),
    ({"rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6]}}, "multimodal"),
    ({"dual_chunk_attention_config": {"chunk_size": 8}}, "dual-chunk"),
])
def test_config_check_admits_table_rotaries_only(text: dict, reason: str | None) -> None:
    got = matcher.why_not_matched(_config("Qwen2ForCausalLM", **text))
    assert got is None if reason is None else reason in got


def test_config_check_names_an_architecture_outside_the_matcher() -> None:
    cfg = _config("TransformersForCausalLM")
    cfg.model_config.architectures = ["GPTNeoXForCausalLM"]
    reason = matcher.why_not_matched(cfg)
    assert "TransformersForCausalLM (for GPTNeoXForCausalLM)" in reason


@pytest.mark.parametrize("entry, reason", [
    (SimpleNamespace(module_name="vllm.model_executor.models.gpt_neox", class_name="GPTNeoXForCausalLM"), None),
    (SimpleNamespace(module_name="vllm.model_executor.models.transformers", class_name="TransformersForCausalLM"),
     "serves GPTNeoXForCausalLM by vllm.model_executor.models.transformers.TransformersForCausalLM"),
    (SimpleNamespace(model_cls=SimpleNamespace), "by types.SimpleNamespace"),  # a plugin's class
    (None, "by a class outside its registry"),
])
def test_config_check_reads_the_class_vllm_instantiates(entry, reason) -> None:
    """The architecture's name alone says nothing of the code that runs it: vLLM 0.32 serves GPT-NeoX
    and Phi-2 through its Transformers backend (0.26 by classes of its own), 0.34 StableLM; a plugin
    may register its own class under a known name."""
    cfg = _config("GPTNeoXForCausalLM")
    cfg.model_config.registry = SimpleNamespace(models={} if entry is None else {"GPTNeoXForCausalLM": entry})
    got = matcher.why_not_matched(cfg)
    assert got is None if reason is None else reason in got, got


def test_config_check_follows_this_vllms_registry() -> None:
    """Against the installed vLLM's own registry: GPT-NeoX and Phi-2 recompute where it has classes of
    their own for them (0.26), not where its Transformers backend serves them (0.32)."""
    from vllm.model_executor.models.registry import ModelRegistry

    for arch in ("GPTNeoXForCausalLM", "PhiForCausalLM", "StableLmForCausalLM", "LlamaForCausalLM"):
        backend = ModelRegistry.models[arch].module_name.endswith(".transformers")
        reason = matcher.why_not_matched(_config(arch))
        assert (reason is not None and "not by its own model code" in reason) == backend, (arch, reason)
