"""Tiny random Hugging Face models for tests and demos (nothing can be downloaded here).

Random weights give near-tied logits, so greedy tokens can flip under harmless numeric
differences (bf16 rounding, another attention kernel, a recomputed K). ``peaked=True`` makes
each next token mostly a fixed function of the current one (a bigram "backbone" in the
embeddings and lm_head) while the attention layers still move the decision in a fraction of
the steps: greedy decoding becomes stable, yet still depends on the KV cache, so a broken
restore changes the output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ARCHS = ("llama", "llama2", "opt", "qwen2", "qwen3", "phi3", "stablelm", "gptj", "gpt2", "bloom", "mixtral",
         "gpt_neox", "phi")
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ROPE_THETA = 10000.0
SWITCH_RATE = 0.08  # share of greedy steps the context decides under peaked=True


def make_tiny_model(
    out_dir: str | Path,
    arch: str,
    *,
    peaked: bool = True,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 256,
    head_dim: int = 64,
    vocab_size: int = 1024,
    dtype: str = "float32",
    max_position_embeddings: int = 4096,
) -> Path:
    """Write config, safetensors weights and a tokenizer for ``arch`` into ``out_dir``.

    Sizes default to 4 layers, hidden 256, head_dim 64 (4 heads; GQA archs have 2 KV heads),
    intermediate 512, a ~1000-token vocabulary: about 12 MB. Each arch keeps what sets its
    family apart: phi3 LongRoPE (long factors once max_model_len exceeds 1024), stablelm neox
    rotary on a quarter of each head and a QKV bias, gptj GPT-J-style rotary on a quarter, gpt2
    learned positions, bloom ALiBi (tied embeddings, as vLLM serves it: never peaked), mixtral
    grouped-query experts, gpt_neox rotary_pct 0.25 with parallel residual, phi (Phi-2) half
    rotary with biases. float32 by default: vLLM's CPU build runs bf16 too, but about 2x slower
    on AVX2-only CPUs; pass ``dtype="bfloat16"`` for GPU-style runs.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    if hidden_size % head_dim:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of head_dim {head_dim}")
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab_size, seed)
    tok.save_pretrained(out)
    cfg = _config(arch, num_layers, hidden_size, head_dim, len(tok), dtype,
                  max_position_embeddings, tok)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    if peaked and not cfg.tie_word_embeddings:  # a bigram backbone needs its own lm_head
        _peak(model, tok, gen, random.Random(seed))
    with torch.no_grad():  # no special token ever wins, so EOS never cuts a generation short
        model.get_output_embeddings().weight[tok.all_special_ids] = 0.0
    model.to(getattr(torch, dtype)).save_pretrained(out)
    _patch_config(out / "config.json", dtype)
    return out


def _config(arch: str, layers: int, hidden: int, head_dim: int, vocab: int, dtype: str,
            max_pos: int, tok):
    """transformers config for ``arch``; untied lm_head so the bigram backbone can differ."""
    from transformers import LlamaConfig, OPTConfig, Qwen2Config, Qwen3Config

    heads = hidden // head_dim
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, vocab_size=vocab, tie_word_embeddings=False,
               dtype=dtype, max_position_embeddings=max_pos)
    if arch in _OTHER_FAMILIES:
        return _OTHER_FAMILIES[arch](layers, hidden, heads, head_dim, ids)
    if arch == "opt":
        return OPTConfig(hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, ffn_dim=2 * hidden, do_layer_norm_before=True,
                         dropout=0.0, architectures=["OPTForCausalLM"], **ids)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, head_dim=head_dim, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, **ids)
    gqa = max(1, heads // 2)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=gqa, architectures=["LlamaForCausalLM"], **common)
    if arch == "llama2":
        return LlamaConfig(num_key_value_heads=heads, architectures=["LlamaForCausalLM"], **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=gqa, architectures=["Qwen2ForCausalLM"], **common)
    return Qwen3Config(num_key_value_heads=gqa, architectures=["Qwen3ForCausalLM"], **common)


def _phi3(layers: int, hidden: int, heads: int, head_dim: int, ids: dict):
    from transformers import Phi3Config

    half = head_dim // 2  # LongRoPE: one rescale factor per rotary frequency
    rope = {"rope_type": "longrope", "rope_theta": ROPE_THETA, "original_max_position_embeddings": 1024,
            "short_factor": [1.0 + i / half for i in range(half)],
            "long_factor": [1.0 + 4 * i / half for i in range(half)]}
    return Phi3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, rope_parameters=rope,
                      original_max_position_embeddings=1024, rms_norm_eps=1e-6, resid_pdrop=0.0,
                      embd_pdrop=0.0, attention_dropout=0.0, architectures=["Phi3ForCausalLM"], **ids)


def _stablelm(layers: int, hidden: int, heads: int, head_dim: int, ids: dict):
    from transformers import StableLmConfig

    return StableLmConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, partial_rotary_factor=0.25,
                          rope_theta=ROPE_THETA, use_qkv_bias=True, architectures=["StableLmForCausalLM"], **ids)


def _gptj(layers: int, hidden: int, heads: int, head_dim: int, ids: dict):
    from transformers import GPTJConfig

    return GPTJConfig(n_embd=hidden, n_layer=layers, n_head=heads, rotary_dim=head_dim // 4,
                      n_inner=2 * hidden, n_positions=ids.pop("max_position_embeddings"), resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, architectures=["GPTJForCausalLM"], **ids)


def _gpt2(layers: int, hidden: int, heads: int, head_dim: int, ids: dict):
    from transformers import GPT2Config

    return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=2 * hidden,
                      n_positions=ids.pop("max_position_embeddings"), resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, architectures=["GPT2LMHeadModel"], **ids)


def _bloom(layers: int, hidden: int, heads: int, head_dim: int, ids: dict):
    from transformers import BloomConfig

    ids.pop("max_position_embeddings")  # ALiBi: no position table
    ids["tie_word_embeddings"] = True  # vLLM's Bloom has no lm_head of its own: never peaked
    return BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, hidden_dropout=0.0,
                       attention_dropout=0.0, architectures=["BloomForCausalLM"], **ids)


def _mixtral(layers: int, hidden: int, heads: int, head_dim: int, ids: dict):
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                         num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                         architectures=["MixtralForCausalLM"], **ids)


def _gpt_neox(layers: int, hidden: int, heads: int, head_dim: int, ids: dict):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, rotary_pct=0.25, rotary_emb_base=ROPE_THETA,
                         use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0,
                         architectures=["GPTNeoXForCausalLM"], **ids)


def _phi(layers: int, hidden: int, heads: int, head_dim: int, ids: dict):
    from transformers import PhiConfig

    # vLLM's Phi MLP reads n_inner (default 4 x hidden), not intermediate_size.
    return PhiConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, partial_rotary_factor=0.5, rope_theta=ROPE_THETA,
                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                     architectures=["PhiForCausalLM"], **ids)


_OTHER_FAMILIES = {"phi3": _phi3, "stablelm": _stablelm, "gptj": _gptj, "gpt2": _gpt2, "bloom": _bloom,
                   "mixtral": _mixtral, "gpt_neox": _gpt_neox, "phi": _phi}


def _patch_config(path: Path, dtype: str) -> None:
    """Add the keys older transformers read (the GPU machine may carry a 4.x release)."""
    cfg = json.loads(path.read_text())
    cfg["torch_dtype"] = dtype
    if "rope_parameters" in cfg:
        cfg["rope_theta"] = ROPE_THETA
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _randomize(model, gen) -> None:
    """Seeded weights independent of transformers' init order.

    Norm gains (every 1-D weight) are 1 +- 0.1 and biases small but non-zero, so that code which forgets a
    gain or a bias (e.g. when recomputing K/V) produces different numbers.
    """
    import torch

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):  # norm gains (LayerNorm, RMSNorm)
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif p.dim() == 2:
                p.copy_(noise / p.shape[-1] ** 0.5)  # unit-gain linear maps
            else:
                p.copy_(0.02 * noise)


def _peak(model, tok, gen, rng: random.Random, switch_rate: float = SWITCH_RATE) -> None:
    """Bigram backbone: lm_head row succ(t) is the direction of embedding row t, where succ
    walks all printable tokens in one random cycle.

    The embedding gain sets how strongly the current token dominates the residual stream
    over the layers' outputs. It is calibrated so that the layers (i.e. the KV cache) change
    the greedy token in about ``switch_rate`` of the steps: the other steps have wide margins.
    Non-printable tokens get zero lm_head rows, so decoded text re-encodes to the same tokens.
    """
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = [i for i in range(vocab) if _printable(tok, i)]
    order = list(allowed)
    rng.shuffle(order)  # one long cycle: greedy text never settles into a short loop
    succ = {t: order[(i + 1) % len(order)] for i, t in enumerate(order)}
    backbone = torch.tensor([succ.get(t, order[t % len(order)]) for t in range(vocab)])
    raw = torch.randn(model.get_input_embeddings().weight.shape, generator=gen)
    with torch.no_grad():
        head = torch.zeros_like(raw).index_add_(0, backbone, raw / raw.norm(dim=1, keepdim=True))
        model.get_output_embeddings().weight.copy_(head)
        probe = torch.tensor([[rng.choice(allowed) for _ in range(256)]])

        def rate(gain: float) -> float:
            model.get_input_embeddings().weight.copy_(raw * gain)
            top = model(input_ids=probe).logits[0].argmax(-1)
            return (top != backbone[probe[0]]).float().mean().item()

        lo, hi = 0.1, 3.0  # rate(lo) is high, rate(hi) about zero; 7 halvings: within 3 %
        for _ in range(7):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if rate(mid) > switch_rate else (lo, mid)
        rate(hi)  # leaves the embeddings at the chosen gain


def _printable(tok, token_id: int) -> bool:
    if token_id in tok.all_special_ids:
        return False
    text = tok.decode([token_id])
    return bool(text) and all(c == "\n" or " " <= c <= "~" for c in text)


def corpus(seed: int) -> list[str]:
    """Deterministic pseudo-English: words built from syllables, sentences and numbers."""
    rng = random.Random(seed)
    syll = [a + b for a in "bcdfghklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    lines = []
    for _ in range(3000):
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        tail = rng.choice([".", "!", "?", f" {rng.randint(0, 999)}.", ","])
        lines.append(sent.capitalize() + tail)
    return lines


def _train_tokenizer(vocab_size: int, seed: int):
    """Byte-level BPE (any input text encodes) with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, chat_template=CHAT_TEMPLATE,
                                   model_max_length=1 << 20)
