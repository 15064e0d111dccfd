"""A Hugging Face ``LlamaForCausalLM`` built from an ``ArchConfig``, with the two swaps Llama has no switch for.

The model is transformers' own Llama (its attention, GQA through ``num_key_value_heads``, ``head_dim``
independent of ``d_model``, SwiGLU MLP, tied embeddings), so extraction and every other library function
treat it as the ``llama`` family it is. Two variants change modules after construction, each documented
where it is made:

- ``norm="layernorm"``: every ``LlamaRMSNorm`` (two per layer and the final norm) becomes
  ``nn.LayerNorm(d_model)`` with weight and bias (``use_layernorm``).
- ``position="learned"``: the rotary embedding becomes ``NoRotary`` (cos 1, sin 0: ``apply_rotary_pos_emb``
  returns q and k unchanged), and a learned table ``model.model.embed_positions`` (max_positions, d_model)
  is added to the hidden states entering layer 0, looked up at the ``position_ids`` that ``LlamaModel``
  passes to every layer (from the cache length during generation), by a forward pre-hook (``use_learned``).

A checkpoint folder holds ``arch.json`` (the ``ArchConfig``), ``model.safetensors`` and the tokenizer; it has
no ``config.json`` on purpose: ``models.load_model`` would rebuild a plain Llama and silently drop the swaps
(LayerNorm biases, the position table), so it refuses the folder and ``load_checkpoint`` is the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from atlas_core.models import LoadedModel, model_spec
from atlas_core.train.config import ArchConfig, from_dict

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
INIT_STD = 0.02  # transformers' initializer_range; GPT-2 / nanoGPT draw token and position tables with it
NORM_EPS = 1e-5  # RMSNorm and LayerNorm alike
EOS_ID = 0  # the tokenizer's one special token (``tokenizer.EOS``) is id 0


def hf_config(arch: ArchConfig) -> LlamaConfig:
    """The transformers config of ``arch`` (family ``llama``; the norm and position swaps are not in it)."""
    return LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.d_model, intermediate_size=arch.d_ff,
        num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads, num_key_value_heads=arch.n_kv_heads,
        head_dim=arch.d_head, max_position_embeddings=arch.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": float(arch.rope_theta)},
        rms_norm_eps=NORM_EPS, initializer_range=INIT_STD, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )


class NoRotary(nn.Module):
    """Stands in for ``LlamaRotaryEmbedding`` with the same call: cos = 1 and sin = 0 at every position, so
    ``apply_rotary_pos_emb`` leaves q and k as they are (the learned-position variant rotates nothing)."""

    def __init__(self, d_head: int):
        super().__init__()
        self.d_head = d_head

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (batch or 1, query, d_head), in ``x``'s dtype and device."""
        shape = (*position_ids.shape, self.d_head)
        return (torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device))


class LearnedPositions(nn.Embedding):
    """A learned absolute position table (max_positions, d_model), added to the hidden states entering layer 0
    through ``add_to`` (a forward pre-hook with kwargs on that layer)."""

    def add_to(self, layer: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook: hidden_states (batch, query, d_model) + table[position_ids] ((batch or 1, query, d_model))."""
        positions = kwargs.get("position_ids")
        if positions is None:
            raise RuntimeError("layer 0 was called without position_ids; the learned table needs them")
        if int(positions.max()) >= self.num_embeddings:
            raise ValueError(f"position {int(positions.max())} is beyond the {self.num_embeddings} learned positions; "
                             "use shorter sequences or a model with a larger max_positions")
        if args:
            return (args[0] + self(positions), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + self(positions)}


def use_layernorm(model: LlamaForCausalLM, d_model: int) -> None:
    """Replace every ``LlamaRMSNorm`` in ``model`` by ``nn.LayerNorm(d_model)`` (weight 1, bias 0), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LlamaRMSNorm):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.LayerNorm(d_model, eps=NORM_EPS))


def use_learned(model: LlamaForCausalLM, arch: ArchConfig, generator: torch.Generator) -> None:
    """Swap RoPE for a learned position table (module docstring), drawn N(0, INIT_STD²) from ``generator``."""
    decoder = model.model
    decoder.rotary_emb = NoRotary(arch.d_head)
    table = LearnedPositions(arch.max_positions, arch.d_model)
    with torch.no_grad():
        table.weight.copy_(torch.randn(table.weight.shape, generator=generator) * INIT_STD)
    decoder.embed_positions = table
    decoder.layers[0].register_forward_pre_hook(table.add_to, with_kwargs=True)


def build_model(arch: ArchConfig, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised fp32 model of ``arch``, a deterministic function of ``seed``.

    transformers' initialisation (normal(0, 0.02) matrices and embeddings, norms at 1) runs on the global torch
    RNG seeded inside ``torch.random.fork_rng``, so the caller's RNG state is untouched.

    Args:
        arch: the architecture; seed: the initialisation seed.
    Returns:
        ``LlamaForCausalLM`` in train mode on the CPU, SDPA attention, with the swaps ``arch`` asks for.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config(arch)).float()
        if arch.norm == "layernorm":
            use_layernorm(model, arch.d_model)
        if arch.position == "learned":
            use_learned(model, arch, torch.Generator().manual_seed(seed + 1))
    model.set_attn_implementation("sdpa")
    return model.train()


def count_parameters(model: nn.Module) -> int:
    """Parameters of a built model, each tensor once (the tied output embedding is the input one)."""
    return sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())


def save_weights(model: nn.Module, arch: ArchConfig, folder: Path) -> None:
    """Write ``arch.json`` and ``model.safetensors`` (tied tensors stored once) into ``folder``."""
    (folder / ARCH_FILE).write_text(json.dumps(arch.as_dict(), indent=1) + "\n")
    save_safetensors(model, str(folder / WEIGHTS_FILE))


def read_arch(folder: str | Path) -> ArchConfig:
    """The ``ArchConfig`` a checkpoint folder was saved with.

    Raises:
        FileNotFoundError: the folder has no ``arch.json`` (not a checkpoint of ``atlas_core.train``).
        ValueError: its fields do not make a valid config.
    """
    path = Path(folder) / ARCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint: it has no {ARCH_FILE}; "
                                "pass a folder written by atlas_core.train (e.g. <run>/step-000000)")
    return from_dict(ArchConfig, json.loads(path.read_text()))


def load_weights(folder: str | Path) -> tuple[LlamaForCausalLM, ArchConfig]:
    """Rebuild the model saved in ``folder`` (every weight must be present: safetensors' strict load)."""
    arch = read_arch(folder)
    model = build_model(arch)
    missing, unexpected = load_safetensors(model, str(Path(folder) / WEIGHTS_FILE), strict=True)
    return model, arch


def load_checkpoint(folder: str | Path, name: str | None = None, attn_implementation: str = "eager") -> LoadedModel:
    """A checkpoint as ``models.load_model`` returns a model: fp32, CPU, eval mode, no gradients.

    Args:
        folder: a checkpoint folder (``<run>/step-NNNNNN``, see ``loop.train``).
        name: the model's name in its spec (cloud cache files are named by it); default
            ``"<run folder>/<checkpoint folder>"``.
        attn_implementation: "eager" (extraction reads attention probabilities) or "sdpa".
    Returns:
        ``LoadedModel(model, tokenizer, spec)``, spec.source "trained", spec.add_bos False (training saw no BOS).
    Raises:
        FileNotFoundError, ValueError: not a checkpoint folder (see ``read_arch``); a damaged weights file raises
            safetensors' own error.
    """
    folder = Path(folder)
    model, _ = load_weights(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    model.set_attn_implementation(attn_implementation)
    model.eval().requires_grad_(False)
    name = name or f"{folder.resolve().parent.name}/{folder.name}"
    return LoadedModel(model, tokenizer, model_spec(model.config, tokenizer, name, "trained", add_bos=False))
