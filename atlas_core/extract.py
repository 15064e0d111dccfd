"""Per-head extraction: q, k (pre/post RoPE), v, attention probabilities, z, c and the residual ε.

The model runs its own code. A registered attention function (``atlas_capture``) calls the model's own
``eager_attention_forward`` and records its inputs and outputs in the requested layers; forward hooks
record pre-RoPE queries and keys and the attention module's output. Where pre-RoPE q and k come from
differs by architecture (a projection, a fused q/k/v projection, a q/k norm before or after the head
transpose), so each family declares it in ``attention.LAYOUTS`` and every pass checks the declared shape.
Nothing of an architecture's math is re-typed here except the per-head split of the output projection,
c[h] = W_O[:, h] z[h], which the invariant Σ_h c[h] + b_O = attention output checks against the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from atlas_core.progress import tqdm  # names the running chapter

from atlas_core.attention import (PRE_SHAPES, Layout, attention_modules, eager_of, intervene, layout_of, register,
                                  kv_group, state_of, top1_values)
from atlas_core.models import LoadedModel

CAPTURE = "atlas_capture"
FIELDS = ("q", "k", "q_pre", "k_pre", "v", "probs", "z", "c", "eps")


@dataclass
class LayerActivations:
    """Everything extracted from one layer; points are (block, token) pairs in block-major order."""

    layer: int
    q: torch.Tensor | None = None  # (head, point, d_head), post-RoPE
    k: torch.Tensor | None = None  # (kv_head, point, d_head), post-RoPE (as caches hold them)
    q_pre: torch.Tensor | None = None  # (head, point, d_head)
    k_pre: torch.Tensor | None = None  # (kv_head, point, d_head)
    v: torch.Tensor | None = None  # (kv_head, point, d_head)
    probs: torch.Tensor | None = None  # (block, head, query, key)
    z: torch.Tensor | None = None  # (head, point, d_head), before W_O
    c: torch.Tensor | None = None  # (head, point, d_model), after W_O
    eps: torch.Tensor | None = None  # (head, point, d_head), z - v[argmax p]
    attn_out: torch.Tensor | None = None  # (point, d_model), the attention module's own output
    out_bias: torch.Tensor | None = None  # (d_model,) or None
    kv_group: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # (head,)


def head_out_proj(model, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_O of one layer split per head, and its bias.

    Returns:
        (weights (head, d_head, d_model), bias (d_model,) or None)
    """
    layout = layout_of(model)
    attn = attention_modules(model)[layer]
    proj = attn.get_submodule(layout.out_proj)
    weight = proj.weight if layout.conv1d else proj.weight.T  # (head * d_head, d_model)
    d_head = _d_head(attn)
    return weight.reshape(-1, d_head, weight.shape[-1]), proj.bias


def extract(
    lm: LoadedModel,
    blocks: torch.Tensor,
    layers: list[int],
    fields: tuple[str, ...] = FIELDS,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[int, LayerActivations]:
    """Run the model over token blocks and return per-head activations of the requested layers.

    Args:
        lm: a loaded model.
        blocks: (block, token) token ids, each row one independent, unpadded window at positions
            0..token-1 (every (block, token) pair becomes a point, so there is no attention mask).
        layers: layer indices (negative counts from the end).
        fields: which of ``FIELDS`` to keep (attn_out is always kept).
        batch_size: blocks per forward pass; results do not depend on it.
    Returns:
        {layer: LayerActivations}
    Raises:
        ValueError: unknown fields or layers, or blocks that are not a 2-D integer tensor.
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.is_floating_point():
        raise ValueError("blocks must be a (block, token) tensor of token ids: equal-length windows, no padding")
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; choose from {FIELDS}")
    n = lm.spec.n_layers
    bad = [l for l in layers if not -n <= l < n]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} do not exist; the model has layers 0..{n - 1} (or -{n}..-1)")
    layers = sorted({l % n for l in layers})
    recorders = {l: _Recorder(lm.model, l, fields) for l in layers}
    with _capturing(lm.model, recorders):
        for start in tqdm(range(0, len(blocks), batch_size), desc="extract", disable=not progress):
            with torch.no_grad(), contextlib.suppress(_StopForward):
                lm.model(blocks[start : start + batch_size], use_cache=False)
    return {l: rec.finish() for l, rec in recorders.items()}


class _StopForward(Exception):
    """Raised after the deepest requested layer: the rest of the network is not needed."""


class _Recorder:
    """Collects one layer's tensors batch by batch."""

    def __init__(self, model, layer: int, fields: tuple[str, ...]):
        self.layer, self.fields = layer, set(fields)
        self.layout = layout_of(model)
        self.w_o, self.bias = head_out_proj(model, layer)
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.pre_rope: dict[str, torch.Tensor] = {}  # this pass's q_pre/k_pre module outputs, as emitted

    def add(self, name: str, value: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(value.detach())

    def attention(self, query, key, value, probs, out, attention_mask) -> None:
        # query (batch, head, query, d_head); key/value (batch, kv_head, key, d_head)
        # probs (batch, head, query, key); out (batch, query, head, d_head)
        _check_shared_mask(attention_mask)
        for name, raw in self.pre_rope.items():
            self.add(name, _points(_pre_rope_heads(raw, self.layout, name, query, key)))
        self.pre_rope.clear()
        self.kv_group = kv_group(query.shape[1], key.shape[1])
        z = out.transpose(1, 2)  # (batch, head, query, d_head)
        for name, t in (("q", query), ("k", key), ("v", value), ("z", z)):
            if name in self.fields:
                self.add(name, _points(t))
        if "probs" in self.fields:
            self.add("probs", probs)
        if "c" in self.fields:
            self.add("c", _points(torch.einsum("bhtd,hdm->bhtm", z, self.w_o)))
        if "eps" in self.fields:
            self.add("eps", _points(z - top1_values(value, probs)))

    def finish(self) -> LayerActivations:
        cat = {name: torch.cat(parts, dim=0 if name in ("probs", "attn_out") else 1) for name, parts in self.parts.items()}
        for pre, post in (("q_pre", "q"), ("k_pre", "k")):
            if pre in self.fields and pre not in self.parts:  # no RoPE: pre = post
                cat[pre] = cat.get(post)
        return LayerActivations(layer=self.layer, out_bias=self.bias, kv_group=self.kv_group, **cat)


def _points(t: torch.Tensor) -> torch.Tensor:
    """(batch, head, token, d) -> (head, batch * token, d)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])


def _pre_rope_heads(t: torch.Tensor, layout: Layout, name: str, query, key) -> torch.Tensor:
    """A q_pre/k_pre module's output as (batch, head, token, d_head), its declared layout checked by shape.

    Args:
        t: the module's output, laid out as ``layout.pre_shape`` (and ``fused_qkv``) declare.
        name: "q_pre" or "k_pre".
        query: (batch, head, token, d_head) and key: (batch, kv_head, token, d_head), post-RoPE.
    Raises:
        ValueError: the output's shape is not the declared one (the family's ``LAYOUTS`` entry is wrong).
    """
    batch, n_q, tokens, d_head = query.shape
    n_kv = key.shape[1]
    heads = n_q if name == "q_pre" else n_kv
    if layout.fused_qkv:  # (batch, token, (head + 2 kv_head) * d_head): q, then k, then v
        _expect_shape(t, (batch, tokens, (n_q + 2 * n_kv) * d_head), name, "fused q, k, v")
        start = 0 if name == "q_pre" else n_q * d_head
        t = t[..., start : start + heads * d_head]
    shapes = {"flat": (batch, tokens, heads * d_head), "token_major": (batch, tokens, heads, d_head),
              "head_major": (batch, heads, tokens, d_head)}
    _expect_shape(t, shapes[layout.pre_shape], name, PRE_SHAPES[layout.pre_shape])
    if layout.pre_shape == "head_major":
        return t
    return t.reshape(batch, tokens, heads, d_head).transpose(1, 2)


def _expect_shape(t: torch.Tensor, shape: tuple[int, ...], name: str, meaning: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: the module emitted {tuple(t.shape)}, not {shape} = {meaning} as its family's "
                         "entry in atlas_core.attention.LAYOUTS declares; correct that entry")


def _check_shared_mask(mask: torch.Tensor | None) -> None:
    """Refuse per-row masks: every (block, token) is recorded as a point, so a pad token would be one."""
    if mask is not None and mask.shape[0] > 1 and not torch.equal(mask, mask[:1].expand_as(mask)):
        raise ValueError("extraction records every (block, token) as a point and takes equal-length, unpadded "
                         "windows; this batch has per-row attention masks (padding): extract each text alone")


def _d_head(attn) -> int:
    return getattr(attn, "head_dim", None)


def capture_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Attention function ``atlas_capture``: the model's own eager attention, recorded when asked."""
    out, probs = eager_of(module)(module, query, key, value, attention_mask, **kwargs)
    recorder = state_of(module, CAPTURE, required=False)
    if recorder is not None:
        recorder.attention(query, key, value, probs, out, attention_mask)
    return out, probs


register(CAPTURE, capture_attention_forward, owner="atlas_core.extract.extract(...)")


@contextlib.contextmanager
def _capturing(model, recorders: dict[int, _Recorder]):
    """Switch the model to the capture attention and hook the recorded layers; undo on exit."""
    layout = layout_of(model)
    modules = attention_modules(model)
    handles = []
    for layer, rec in recorders.items():
        attn = modules[layer]
        for name, key in ((layout.q_pre, "q_pre"), (layout.k_pre, "k_pre")):
            if name and key in rec.fields:  # kept as emitted; the recorder reshapes it beside the post-RoPE q/k
                hook = lambda m, i, o, r=rec, k=key: r.pre_rope.__setitem__(k, o.detach())
                handles.append(attn.get_submodule(name).register_forward_hook(hook))
        handles.append(attn.register_forward_hook(lambda m, i, o, r=rec: r.add("attn_out", o[0].reshape(-1, o[0].shape[-1]))))
    handles.append(modules[max(recorders)].register_forward_hook(_stop))
    try:
        with intervene(model, CAPTURE, recorders):
            yield
    finally:
        for h in handles:
            h.remove()


def _stop(module, inputs, output):
    raise _StopForward


# --- checks --------------------------------------------------------------------------------------------


def invariant_errors(lm: LoadedModel, blocks: torch.Tensor, layers: list[int] | None = None) -> dict:
    """Worst deviation of the extraction's two invariants on a model: Σ_h c[h] + b_O = attention output,
    and every attention row sums to 1.

    Args:
        lm: a loaded model
        blocks: (block, token) token ids, as ``extract`` takes them
        layers: layers to check; the first, middle and last when None
    Returns:
        {"layers": the layers checked, "sum_abs": max |Σ_h c[h] + b_O − out|, "sum_rel": the same over
        max |out| (the worst layer's), "rows": max |Σ_key p − 1|}, floats in the model's units
    Raises:
        ValueError: as ``extract``
    """
    n = lm.spec.n_layers
    layers = sorted({0, n // 2, n - 1} if layers is None else {l % n for l in layers})
    acts = extract(lm, blocks, layers, fields=("probs", "c"), progress=False)
    errors = [layer_invariant_errors(acts[l]) for l in layers]
    return {"layers": layers, **{name: max(e[name] for e in errors) for name in ("sum_abs", "sum_rel", "rows")}}


def layer_invariant_errors(acts: LayerActivations) -> dict:
    """The invariants of one layer's activations (its ``c``, ``attn_out`` and ``probs`` must be extracted).

    Returns:
        {"sum_abs": max |Σ_h c[h] + b_O − out|, "sum_rel": sum_abs / max |out|, "rows": max |Σ_key p − 1|}
    """
    bias = 0.0 if acts.out_bias is None else acts.out_bias  # (d_model,)
    diff = (acts.c.sum(0) + bias - acts.attn_out).abs().max().item()  # c: (head, point, d_model)
    return {"sum_abs": diff, "sum_rel": diff / acts.attn_out.abs().max().item(),
            "rows": (acts.probs.sum(-1) - 1).abs().max().item()}  # probs: (block, head, query, key)
