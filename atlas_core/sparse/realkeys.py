"""Real keys for the decode benchmark: one long prompt's post-RoPE keys, values and queries of one layer.

A synthetic Gaussian cache says nothing about a selector's recall: real keys are low-rank, clustered and
dominated by a few sinks. ``real_keys`` runs the first n tokens of one held-out text through a model and
returns what one full-attention (global) layer holds at the end: its cached keys and values (post-RoPE,
as the decode step reads them) and the post-RoPE queries of the last ``n_query`` positions before each
context length n_c, so a decode step at context n_c uses ``keys[:, :n_c]`` with ``queries[n_c]``.

How. The prompt runs in chunks (``CHUNK`` tokens per forward) through a ``DynamicCache`` with SDPA, so no
(n × n) score or mask tensor is ever built. Every layer runs the registered attention function
``atlas_realkeys``, which is transformers' SDPA attention (or the model's own eager attention for a model
with a logit softcap) on the mask eager attention gets; in the chosen layer it instead records the query
rows it needs and stops the forward (``_Stop``): the cache already holds that layer's keys of the chunk,
and nothing after it is needed. The keys and values are read from the cache at the end.

Results are cached on disk (``cache.cached``: checksummed, rebuilt with a notice if damaged).

Source: transformers' ``DynamicCache`` and attention interface (``atlas_core.attention``); the decode
benchmark this feeds is issue 18, item 3.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from atlas_core.attention import eager_of, intervene, register, state_of
from atlas_core.cache import cache_dir, cache_key, cached
from atlas_core.corpus import CORPORA, BlockSpec, check_blocks, check_corpus, surely_holds, token_blocks
from atlas_core.models import ModelSpec, check_layer, check_positions, describe, load_model, load_tokenizer
from atlas_core.progress import tqdm
from atlas_core.sparse.attention import positions

REALKEYS = "atlas_realkeys"  # the chosen layer's state inside ``capture``: a ``_Capture``
CHUNK = 1024  # prompt tokens per forward: the additive mask is (CHUNK, n) fp32, 128 MiB at n = 32K

__all__ = ["CHUNK", "REALKEYS", "RealKeys", "capture", "global_layer", "real_keys"]


@dataclass(frozen=True, kw_only=True)
class RealKeys:
    """One layer's cache after a real prompt, and the queries that read it."""

    model: str
    layer: int
    corpus: str
    keys: torch.Tensor  # (kv_head, n, d_head) fp32, post-RoPE, positions 0..n-1 of one prompt
    values: torch.Tensor  # (kv_head, n, d_head)
    queries: dict[int, torch.Tensor]  # context n_c -> (n_query, head, d_head), positions n_c-n_query .. n_c-1
    scaling: float  # the layer's attention scaling (module.scaling; Gemma 3: query_pre_attn_scalar ** -0.5)
    softcap: float | None  # the attention logit softcap, None when the model has none


class _Stop(Exception):
    """Raised by the chosen layer after its capture: the layers above it are not needed."""


@dataclass
class _Capture:
    """What the chosen layer records: the wanted query positions, the rows seen so far, and its settings."""

    wanted: frozenset[int]
    rows: dict[int, torch.Tensor]  # position -> (head, d_head)
    settings: dict  # scaling and softcap, as the attention call received them


def _attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function ``atlas_realkeys``: plain attention, except that the chosen layer records and stops.

    Args:
        query: (batch, head, query, d_head) post-RoPE; key, value: (batch, kv_head, key, d_head), the cache's
            keys up to this chunk's last token.
        attention_mask: the additive mask eager attention gets, (batch, 1, query, key).
    Returns:
        (output (batch, query, head, d_head), None) in the other layers.
    Raises:
        _Stop: in the chosen layer, once the chunk's wanted query rows are recorded.
    """
    state = state_of(module, REALKEYS, required=False)
    if state is None:
        if kwargs.get("softcap") is None:  # SDPA has no softcap: such models run their own eager attention
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return eager_of(module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    position_ids = kwargs.get("position_ids")
    q_pos, _ = positions(position_ids.to(query.device) if position_ids is not None else None,
                         query.shape[2], key.shape[2])  # (1, query)
    for row, pos in enumerate(q_pos[0].tolist()):
        if pos in state.wanted:
            state.rows[pos] = query[0, :, row].float().clone()  # (head, d_head)
    state.settings.update(scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
                          softcap=kwargs.get("softcap"))
    raise _Stop


register(REALKEYS, _attention_forward, owner="atlas_core.sparse.realkeys.capture(model, prompt, layer, positions)")


@torch.no_grad()  # not inference_mode: the returned tensors stay ordinary tensors a caller may edit in place
def capture(model, prompt: torch.Tensor, layer: int, wanted: tuple[int, ...], chunk: int = CHUNK,
            progress: bool = False) -> dict:
    """Run ``prompt`` in chunks through a DynamicCache; return one layer's keys, values and some queries.

    Args:
        model: a transformers causal LM of a family in ``attention.LAYOUTS``; ``layer`` must be a full-attention
            layer (a sliding layer's cache holds only its window).
        prompt: (n,) token ids.
        wanted: the positions whose post-RoPE queries to record.
        chunk: prompt tokens per forward.
    Returns:
        {"keys": (kv_head, n, d_head), "values": (kv_head, n, d_head), "queries": {position: (head, d_head)},
        "scaling": float, "softcap": float | None}, all fp32 on the CPU.
    Raises:
        ValueError: a wanted position outside the prompt.
    """
    n = prompt.shape[0]
    if any(not 0 <= p < n for p in wanted):
        raise ValueError(f"query positions must lie in 0..{n - 1}, got {sorted(wanted)}")
    cache = DynamicCache(config=model.config)
    state = _Capture(wanted=frozenset(wanted), rows={}, settings={})
    base = model.get_decoder()  # the decoder stack: the chosen layer stops the forward before the LM head anyway
    with intervene(model, REALKEYS, {layer: state}):
        for start in tqdm(range(0, n, chunk), desc="real keys: prefill", disable=not progress):
            try:
                base(input_ids=prompt[None, start:start + chunk], past_key_values=cache, use_cache=True)
            except _Stop:
                continue
            raise RuntimeError(f"layer {layer} never ran its attention")  # not reached for a layer of the model
    held = cache.layers[layer]
    keys, values = held.keys[0].float().contiguous(), held.values[0].float().contiguous()  # (kv_head, n, d_head)
    if keys.shape[1] != n:
        raise RuntimeError(f"layer {layer}'s cache holds {keys.shape[1]} of {n} positions: is it a sliding layer?")
    return {"keys": keys, "values": values, "queries": dict(sorted(state.rows.items())), **state.settings}


def global_layer(spec: ModelSpec, layer: int | None = None) -> int:
    """The full-attention layer to read: ``layer`` checked, or by default the model's last one.

    Args:
        spec: the model's spec (``models.describe``).
        layer: a layer index (negative counts from the end), or None for the last full-attention layer.
    Returns:
        the layer index in 0..n_layers-1.
    Raises:
        ValueError: ``layer`` out of range, a sliding-window layer, or a model with no full-attention layer.
    """
    full = [i for i, window in enumerate(spec.windows) if window is None]
    if layer is None:
        if not full:
            raise ValueError(f"{spec.name} has no full-attention layer (every layer slides): its caches hold only "
                             "their window; use a model with global layers")
        return full[-1]
    index = check_layer(spec, layer)
    if spec.windows[index] is not None:
        raise ValueError(f"layer {layer} of {spec.name} is a sliding-window layer (window {spec.windows[index]}): its "
                         f"cache holds only its window; choose a full-attention layer, one of {full}")
    return index


def _check_contexts(contexts, n_query) -> tuple[int, ...]:
    """The distinct contexts in increasing order.

    Raises:
        ValueError: ``n_query`` not a positive integer, no contexts, a context that is not an integer, or
            one shorter than ``n_query``.
    """
    if isinstance(n_query, bool) or not isinstance(n_query, numbers.Integral) or n_query < 1:
        raise ValueError(f"n_query must be a positive integer, got {n_query!r}")
    if isinstance(contexts, (str, bytes)) or not hasattr(contexts, "__iter__") or not len(tuple(contexts)):
        raise ValueError(f"contexts must be a non-empty sequence of token counts, got {contexts!r}")
    for c in contexts:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise ValueError(f"context {c!r} is not an integer number of tokens")
        if c < n_query:
            raise ValueError(f"context {c} is shorter than n_query={n_query}: its queries would start before "
                             "position 0; use a longer context or fewer queries")
    return tuple(sorted({int(c) for c in contexts}))


def real_keys(model: str, contexts: tuple[int, ...], *, corpus: str = "britannica", layer: int | None = None,
              n_query: int = 8, progress: bool = False) -> RealKeys:
    """One full-attention layer's post-RoPE keys and values after a real prompt, and its queries at each context.

    The prompt is the first n = max(contexts) tokens of the corpus's held-out text (``token_blocks`` with one
    eval block of n tokens, BOS as the model wants), run in chunked prefill (see the module docstring).

    Args:
        model: a model name (``models.load_model``).
        contexts: context lengths n_c; queries are taken at positions n_c - n_query .. n_c - 1 of each.
        corpus: a corpus name or text file (``atlas_core.corpus``).
        layer: a full-attention layer, or None for the model's last one (``global_layer``).
        n_query: queries per context.
        progress: a progress bar over prefill chunks.
    Returns:
        ``RealKeys``: keys and values (kv_head, n, d_head), queries {n_c: (n_query, head, d_head)}, all fp32.
    Raises:
        ValueError: bad contexts or n_query, a context beyond the model's positions, a sliding or missing
            layer, an unknown corpus, or a corpus whose eval split holds no n-token block (CorpusError).
    Cached on disk under ``cache_dir("sparse", "realkeys")``, keyed by model, corpus, n, layer, n_query and
    the contexts (``cache.cached``: checksummed, rebuilt if damaged).
    """
    contexts = _check_contexts(contexts, n_query)
    n = contexts[-1]
    check_positions(model, n, "the real-keys prompt")
    check_corpus(corpus)
    index = global_layer(describe(model), layer)
    blocks = BlockSpec(corpus=corpus, seq_len=n, n_blocks=1)
    wanted = tuple(sorted({p for c in contexts for p in range(c - n_query, c)}))
    text_version = os.stat(corpus).st_mtime_ns if corpus not in CORPORA else 0  # an edited file is a new text
    key = cache_key(kind="sparse-realkeys", model=model, corpus=corpus, text_version=text_version, n=n, layer=index,
                    n_query=int(n_query), contexts=list(contexts))
    path = cache_dir("sparse", "realkeys") / f"{model.replace('/', '--')}-L{index}-{n}-{key}.pt"

    def build() -> dict:
        if not surely_holds(blocks):  # refuse a too-short corpus before the weights load
            check_blocks(load_tokenizer(model), blocks)
        lm = load_model(model, attn_implementation="sdpa")
        prompt = token_blocks(lm, blocks)[0]  # (n,)
        return capture(lm.model, prompt, index, wanted, progress=progress)

    held = cached(path, build, torch.save, lambda p: torch.load(p, weights_only=True), "real keys")
    rows = held["queries"]
    queries = {c: torch.stack([rows[p] for p in range(c - n_query, c)]) for c in contexts}  # (n_query, head, d_head)
    return RealKeys(model=model, layer=index, corpus=corpus, keys=held["keys"], values=held["values"], queries=queries,
                    scaling=float(held["scaling"]), softcap=held["softcap"])
