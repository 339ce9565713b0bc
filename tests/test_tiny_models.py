"""Tiny models: well-formed files, and real vLLM runs them stably and as transformers does."""

from __future__ import annotations

import json
import random

import pytest
from conftest import drop_parallel_groups, make_llm
from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

from vllm_partial_kv.tiny_models import ARCHS, make_tiny_model

MAX_TOKENS = 48


def _prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    """2n token prompts of ~3 KV blocks; prompts i and n+i differ only before the last 12 words."""
    rng = random.Random(seed)
    words = [tok.decode([i]) for i in range(len(tok)) if i not in tok.all_special_ids]
    words = [w for w in words if w.strip().isalpha()]

    def tokens(k: int) -> list[int]:
        return tok.encode("".join(rng.choice(words) for _ in range(k)), add_special_tokens=False)

    heads = [tokens(80) for _ in range(2 * n)]
    tails = [tokens(12) for _ in range(n)]
    return [h + tails[i % n] for i, h in enumerate(heads)]


def test_files_small_deterministic_and_chat_ready(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    a = make_tiny_model(tmp_path / "a", "llama", seed=3)
    b = make_tiny_model(tmp_path / "b", "llama", seed=3)
    c = make_tiny_model(tmp_path / "c", "llama", seed=4)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]
    assert sum(f.stat().st_size for f in a.iterdir()) < 20 << 20

    cfg = AutoConfig.from_pretrained(a)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 64)
    assert cfg.max_position_embeddings >= 4096 and not cfg.tie_word_embeddings
    assert json.loads((a / "config.json").read_text())["torch_dtype"] == "float32"

    tok = AutoTokenizer.from_pretrained(a)
    assert 1000 <= len(tok) <= 2000 and tok.bos_token and tok.eos_token
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<s>user: Hi there\nassistant:"
    text = "Any text, even unseen: Zürich 42!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model(tmp_path, "falcon")
    with pytest.raises(ValueError, match="multiple of head_dim"):
        make_tiny_model(tmp_path, "llama", hidden_size=200)


@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_greedy_is_stable_full_length_and_matches_transformers(tiny_model, arch, hf_classes_restored):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    path = tiny_model(arch)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(tok, 3)
    # Hugging Face first: where vLLM serves the family by its Transformers backend (GPT-NeoX, Phi-2 on
    # vLLM 0.32) it patches these classes for the rest of the test.
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=MAX_TOKENS, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    drop_parallel_groups()
    ensure_kv_transfer_shutdown()  # an earlier module's connector: these engines run without the plugin
    llm = make_llm(path)
    cold = llm.generate(inputs, params, use_tqdm=False)
    warm = llm.generate(inputs, params, use_tqdm=False)
    del llm
    cold_ids = [list(o.outputs[0].token_ids) for o in cold]
    assert all(len(ids) == MAX_TOKENS for ids in cold_ids)
    assert cold_ids == [list(o.outputs[0].token_ids) for o in warm]
    assert all(o.num_cached_tokens >= 64 for o in warm)  # the warm run hit the prefix cache
    # Same last tokens, different contexts: the KV cache must matter for some continuation. Not so
    # for Bloom's tied embeddings (never peaked): its tokens mostly repeat, whatever the context.
    assert cold_ids[:3] != cold_ids[3:] or arch == "bloom"
    if arch != "phi3":  # vLLM uses LongRoPE's long factors at every length once max_model_len exceeds
        # the original context, Hugging Face only for longer sequences: their tokens differ by design
        assert ref[0, len(prompts[0]):].tolist() == cold_ids[0]


def test_two_engines_agree(tiny_model):
    from vllm import SamplingParams

    path = tiny_model("llama2")
    prompts = ["Zaiba kou mipa dou, " * 20, "Tekou ri zova? " * 30]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    runs = []
    ensure_kv_transfer_shutdown()  # an earlier module's connector: these engines run without the plugin
    for _ in range(2):
        llm = make_llm(path)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
    assert runs[0] == runs[1]
