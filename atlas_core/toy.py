"""Tiny randomly initialised models of every supported architecture, with an offline tokenizer.

They exist for unit tests: seconds to build, no download, and they exercise the same code paths as the
real models (GQA/MQA, sliding windows, q/k norms before (Qwen3) or after (Gemma 3) the head transpose,
head_dim × heads ≠ d_model (Qwen3), fused q/k/v and gate/up projections with partial RoPE (Phi-3),
biases, Conv1D projections). Every family in ``atlas_core.attention.LAYOUTS`` has one here.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

SPECIALS = ("<unk>", "<bos>", "<eos>", "<pad>")
VOCAB = 256 + len(SPECIALS)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte, no merges) with BOS/EOS/PAD/UNK specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _configs() -> dict:
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    rope = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)
    return {
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common),
        "llama": LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **rope, **common),
        "mistral": MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=8, **rope, **common),
        "qwen2": Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **rope, **common),
        # q_norm/k_norm act on (batch, token, head, d_head), before the transpose; 4 × 32 ≠ d_model 64
        "qwen3": Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=32, **rope, **common),
        # one fused qkv_proj and gate_up_proj; RoPE on half of each head (as Phi-4-mini, model_type phi3)
        "phi3": Phi3Config(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            **rope,
            **common,
        ),
        "gemma3": Gemma3TextConfig(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            **rope,
            **common,
        ),
    }


FAMILIES = tuple(_configs())


def toy_config(family: str):
    """The transformers config of one toy family (shapes only: no weights are made).

    Raises:
        ValueError: an unknown family.
    """
    configs = _configs()
    if family not in configs:
        raise ValueError(f"unknown toy family '{family}'; choose one of {FAMILIES}")
    return configs[family]


def toy_model(family: str, seed: int = 0):
    """Build a tiny random model of one family, in fp32 eval mode.

    Args:
        family: one of ``FAMILIES``.
        seed: weights are a deterministic function of it.
    Returns:
        (model, tokenizer)
    """
    config = toy_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_norms_and_biases(model, seed)
    return model.eval(), byte_tokenizer()


def _randomise_norms_and_biases(model, seed: int) -> None:
    """Give norm weights and biases non-trivial values, so tests see their effect (init leaves them 0/1)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
