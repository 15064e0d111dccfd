"""Load any causal LM (embedded name, local folder or hub id) in fp32, with a small spec of its attention.

Embedded GGUF models are dequantized by transformers once and cached as fp32 safetensors in the user
cache (``$ATLAS_CACHE_DIR/models``), written atomically and validated by sha256 on every read, so a
truncated or corrupt cache is rebuilt rather than loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from atlas_core import toy
from atlas_core.cache import atomic_path, cache_dir, file_sha256
from atlas_core.zoo import DEFAULT_MODEL, EMBEDDED, ModelError, gguf_path

MANIFEST = "atlas-manifest.json"
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "LoadedModel", "ModelError", "ModelSpec", "describe", "load_model", "model_spec",
           "n_parameters", "parameter_count",
           "scoring_attention"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What the rest of the library needs to know about a model's attention."""

    name: str
    source: str  # "embedded" | "local" | "hub" | "toy"
    family: str  # transformers model_type: llama, gemma3_text, qwen2, gpt2, mistral, ...
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    layer_types: tuple[str, ...]  # per layer: "full_attention" or "sliding_attention"
    windows: tuple[int | None, ...]  # per layer: sliding window length, None for full attention
    add_bos: bool  # prepend BOS to every window of text

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec


def check_length(lm: LoadedModel, n_tokens: int, what: str) -> None:
    """Refuse a sequence longer than the model's positions (GPT-2's learned table has 1,024; RoPE models
    state theirs as ``max_position_embeddings``).

    Raises:
        ValueError: ``n_tokens`` exceeds the positions the model's config declares.
    """
    _refuse_longer(lm.model.config, lm.spec.name, n_tokens, what)


def check_positions(name: str, n_tokens: int, what: str) -> None:
    """``check_length`` from the model's config alone, before any weights load (the CLI's up-front check).

    Raises:
        ModelError: ``name`` is not a model (see ``check_model_name``).
        ValueError: ``n_tokens`` exceeds the positions the model's config declares.
    """
    check_model_name(name)
    _refuse_longer(model_config(name), name, n_tokens, what)


def check_layer(spec: ModelSpec, layer: int) -> int:
    """The index in 0..n_layers-1 of ``layer`` (negative counts from the end).

    Raises:
        ValueError: ``layer`` is not an integer in -n_layers..n_layers-1.
    """
    n = spec.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer {layer} out of range: {spec.name} has layers 0..{n - 1} (or -{n}..-1)")
    return layer % n


def n_parameters(model: torch.nn.Module, tied_embeddings: bool | None = None) -> int:
    """The number of a model's parameters, each weight counted once.

    A weight shared by two modules (tied input and output embeddings) is one tensor and counts once. When the
    original network ties its embeddings but the loaded model holds the output embedding as a separate copy of
    the same shape (an embedded GGUF that stores the tied matrix twice), that copy is not counted.

    Args:
        model: a causal LM.
        tied_embeddings: whether the original network ties its output embedding to its input one; None reads
            the model's config (``tie_word_embeddings``).
    Returns:
        the count (an int).
    """
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    total = sum(unique.values())
    if tied_embeddings is None:
        tied_embeddings = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if (tied_embeddings and out is not None and inp is not None and out.weight.shape == inp.weight.shape
            and out.weight.data_ptr() != inp.weight.data_ptr()):
        total -= out.weight.numel()
    return total


def parameter_count(lm: LoadedModel) -> int:
    """``n_parameters`` of a loaded model; an embedded model's tying is the zoo's (``EmbeddedModel.tied_embeddings``),
    any other model's its config's. Qwen2.5-Coder-0.5B: 494.0 M, not the 630.2 M of its two embedding copies."""
    tied = EMBEDDED[lm.spec.name].tied_embeddings if lm.spec.source == "embedded" else None
    return n_parameters(lm.model, tied)


def _refuse_longer(config, name: str, n_tokens: int, what: str) -> None:
    config = config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and n_tokens > limit:
        raise ValueError(f"{what} is {n_tokens} tokens, longer than the {limit} positions of {name}; use at most {limit}")


def load_model(name: str = DEFAULT_MODEL, attn_implementation: str = "eager") -> LoadedModel:
    """Load a causal LM in fp32 on the CPU, in eval mode.

    Args:
        name: an embedded name (see ``EMBEDDED``), ``toy-<family>``, a local folder, or a hub id.
        attn_implementation: transformers attention backend ("eager", "sdpa", or a registered one).
    Returns:
        ``LoadedModel(model, tokenizer, spec)``.
    """
    source = _model_source(name)
    if source == "toy":
        model, tokenizer = toy.toy_model(name.removeprefix("toy-"))
        return _finish(model, tokenizer, name, "toy", attn_implementation, add_bos=None)
    if source == "embedded":
        folder = _embedded_folder(name)
    elif source == "local":
        folder = Path(name).expanduser()
    else:  # a hub id: transformers resolves it (from the local cache when offline)
        folder = name
    if source == "local":
        check_model_name(name)  # a folder lacking config, weights or tokenizer: say which, before transformers does
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with _quiet_loading():  # the weight bar and load report: our own check names what is wrong, in one line
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        _check_loading(name, info)
    except ModelError:
        raise
    except OSError as err:
        raise ModelError(f"could not load '{name}' ({err.__class__.__name__}: {err}).\n" + _unknown_model_message(name)) from err
    except Exception as err:  # noqa: BLE001 - tokenizers, safetensors and torch raise their own types for a damaged file
        if source != "local" and type(err).__name__ != "SafetensorError":
            raise
        # check_model_name found every part present, so a part that fails to load is damaged
        raise ModelError(f"'{name}' cannot be read ({type(err).__name__}: {_first_line(err)}): a file of the checkpoint "
                         "is damaged or truncated; copy or save it (model and tokenizer) again") from err
    add_bos = EMBEDDED[name].add_bos if name in EMBEDDED else None
    return _finish(model, tokenizer, name, source, attn_implementation, add_bos)


def _model_source(name: str) -> str:
    """Where ``load_model`` finds ``name``: "embedded", "toy", "local" (a folder) or "hub".

    Raises:
        ModelError: none of these (the message lists what can be used).
    """
    if not name.strip():
        raise ModelError("the model name is empty; pass an embedded name (e.g. smollm2-135m), toy-<family>, "
                         "a local checkpoint folder or a hub id")
    if name in EMBEDDED:
        return "embedded"
    if name.startswith("toy-"):
        return "toy"
    if Path(name).expanduser().is_dir():
        return "local"
    if _HUB_ID.match(name) and Path(name).suffix != ".gguf":
        return "hub"
    raise ModelError(_unknown_model_message(name))


def check_model_name(name: str) -> None:
    """Fail fast, without loading anything, when ``name`` cannot be a model that ``load_model`` loads.

    Raises:
        ModelError: not an embedded or toy name, not a folder holding a ``config.json``, and not a hub
            id; or a hub id while offline that is not in the local Hugging Face cache.
    """
    source = _model_source(name)
    if source == "toy" and name.removeprefix("toy-") not in toy.FAMILIES:
        raise ModelError(_unknown_model_message(name))
    if source == "local":
        missing = local_checkpoint_gaps(Path(name).expanduser())
        if missing:
            raise ModelError(f"folder '{name}' is not a transformers checkpoint: it has no {' and no '.join(missing)}; "
                             "save the model and its tokenizer there with save_pretrained")
    if source == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            # the likelier fault (a typo) first, the hub's way out after it
            raise ModelError(_unknown_model_message(name) + " It is not in the local Hugging Face cache and the hub "
                             "is off (HF_HUB_OFFLINE=1).")


# What a local checkpoint folder must hold: (what, any one of these file-name patterns)
CHECKPOINT_FILES = (
    ("config.json", ("config.json",)),
    ("weights (*.safetensors or pytorch_model*.bin)", ("*.safetensors", "pytorch_model*.bin")),
    ("tokenizer (tokenizer.json, tokenizer.model, vocab.json or tokenizer_config.json with its files)",
     ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")),
)


def local_checkpoint_gaps(folder: Path) -> list[str]:
    """What a local folder lacks to be loaded as a causal LM with its tokenizer ([] when complete).

    Args:
        folder: the checkpoint folder.
    Returns:
        the missing parts' names, in ``CHECKPOINT_FILES`` order.
    """
    return [what for what, patterns in CHECKPOINT_FILES if not any(any(folder.glob(p)) for p in patterns)]


@dataclass(frozen=True, kw_only=True)
class ModelText:
    """A model's tokenizer and spec without its weights: enough to ask the corpus for blocks before loading
    (``corpus.check_blocks``, which reads ``tokenizer`` and ``spec.add_bos`` as from a ``LoadedModel``)."""

    tokenizer: object
    spec: ModelSpec


def load_tokenizer(name: str) -> ModelText:
    """The tokenizer and spec of a model, no weights loaded (an embedded model is converted once if needed).

    Raises:
        ModelError: ``name`` is not a model ``load_model`` can load.
    """
    spec = describe(name)
    source = _model_source(name)
    tokenizer = toy.byte_tokenizer() if source == "toy" else AutoTokenizer.from_pretrained(_folder(name, source))
    return ModelText(tokenizer=tokenizer, spec=spec)


def describe(name: str = DEFAULT_MODEL) -> ModelSpec:
    """The spec of a model from its config and tokenizer alone: no weights are loaded.

    An embedded model is converted once if needed (its config lives in the converted folder); a toy's
    config is built; a local folder's or hub id's is read by transformers.

    Raises:
        ModelError: ``name`` is not a model ``load_model`` can load (see ``check_model_name``).
    """
    check_model_name(name)
    source = _model_source(name)
    if source == "embedded":
        return model_spec(model_config(name), None, name, source, EMBEDDED[name].add_bos)
    tokenizer = toy.byte_tokenizer() if source == "toy" else AutoTokenizer.from_pretrained(_folder(name, source))
    return model_spec(model_config(name), tokenizer, name, source, None)


def model_config(name: str):
    """The transformers config of ``name`` (embedded, toy, local folder or hub id), without its weights."""
    source = _model_source(name)
    if source == "toy":
        return toy.toy_config(name.removeprefix("toy-"))
    try:
        return AutoConfig.from_pretrained(_folder(name, source))
    except OSError as err:
        raise ModelError(f"could not read the config of '{name}' ({err.__class__.__name__}: {err}).\n"
                         + _unknown_model_message(name)) from err


def _folder(name: str, source: str):
    """Where transformers reads ``name`` from: the converted folder, a local folder or the hub id."""
    if source == "embedded":
        return _embedded_folder(name)
    return Path(name).expanduser() if source == "local" else name


def model_spec(config, tokenizer, name: str, source: str, add_bos: bool | None = None) -> ModelSpec:
    """Read the attention layout of a model from its config.

    Args:
        config: the model's transformers config.
        tokenizer: used only when ``add_bos`` is None.
        add_bos: the BOS policy; ``None`` copies the tokenizer's own habit (does it add BOS itself?).
    """
    cfg = config.get_text_config()
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    d_model = cfg.hidden_size
    layer_types = tuple(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    if window and "sliding_attention" not in layer_types:
        layer_types = ("sliding_attention",) * n_layers  # Mistral: every layer slides
    if add_bos is None:
        bos = tokenizer.bos_token_id
        add_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    return ModelSpec(
        name=name,
        source=source,
        family=cfg.model_type,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        d_head=getattr(cfg, "head_dim", None) or d_model // n_heads,
        d_model=d_model,
        layer_types=layer_types,
        windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        add_bos=bool(add_bos),
    )


def _finish(model, tokenizer, name, source, attn_implementation, add_bos) -> LoadedModel:
    model.set_attn_implementation(attn_implementation)
    model.eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, model_spec(model.config, tokenizer, name, source, add_bos))


@contextlib.contextmanager
def scoring_attention(model):
    """Run the block with SDPA attention in place of plain eager attention, on the same loaded model.

    Scoring (perplexity, NLL) needs only the attention output, not its probabilities, so the fused
    ``torch.nn.functional.scaled_dot_product_attention`` gives the same numbers (to fp32 rounding) without
    materialising the (batch, head, query, key) probabilities. Chapters load their model eagerly because
    extraction hooks read those probabilities; this switches the backend for the block and back, with no
    second load. Any other backend (a registered one such as top-1, capture or sparse attention, whose
    numbers differ from plain attention on purpose; or SDPA already) is left as it is, and so is a model
    whose class has no SDPA path.

    Args:
        model: a transformers ``PreTrainedModel``.
    Yields:
        the attention implementation in force inside the block ("sdpa" or the model's own).
    Source: transformers' ``PreTrainedModel.set_attn_implementation`` and ``sdpa_attention_forward``.
    """
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)  # None: not a transformers model
    if previous != "eager" or not getattr(model, "_supports_sdpa", False):
        yield previous
        return
    model.set_attn_implementation("sdpa")
    try:
        yield "sdpa"
    finally:
        model.set_attn_implementation(previous)


def _embedded_folder(name: str) -> Path:
    """Return the fp32 safetensors folder of an embedded model, converting its GGUF if needed."""
    folder = cache_dir("models") / name
    if _valid_cache(folder):
        return folder
    gguf = gguf_path(name)
    print(f"[atlas] converting {name} from {gguf.name} to fp32 safetensors in {folder} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized fp32.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp, source=gguf.name)
    return folder


def _write_manifest(folder: Path, source: str) -> None:
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"source": source, "sha256": files}, indent=1))


def _valid_cache(folder: Path) -> bool:
    """True iff the folder has a manifest and every listed file has its recorded sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all(file_sha256(folder / n) == h for n, h in manifest["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError):
        if folder.exists():
            print(f"[atlas] cache {folder} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        return False




@contextlib.contextmanager
def _quiet_loading():
    """transformers' weight-loading progress bar and load report off for the span of one load."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _check_loading(name: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not fill the model: transformers would initialise the missing ones
    at random (a different model, and different numbers, on every load) and only print a report.

    Raises:
        ModelError: missing or mismatched weights (the first few named).
    """
    missing, mismatched = list(info.get("missing_keys", [])), list(info.get("mismatched_keys", []))
    if missing or mismatched:
        named = ", ".join(str(k[0] if isinstance(k, tuple) else k) for k in (missing + mismatched)[:3])
        more = len(missing) + len(mismatched) - 3
        raise ModelError(f"the weights of '{name}' do not fill its model: {len(missing)} missing and {len(mismatched)} "
                         f"of the wrong shape ({named}{f', and {more} more' if more > 0 else ''}); transformers "
                         "would draw them at random. Save the model whole with save_pretrained")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _unknown_model_message(name: str) -> str:
    """One short sentence: what a model name may be, and where the full list is (``atlas models``)."""
    return (f"unknown model '{name}': give an embedded model ({', '.join(sorted(EMBEDDED))}; `atlas models`), "
            f"toy-<{'|'.join(toy.FAMILIES)}>, a local checkpoint folder or a Hugging Face hub id.")
