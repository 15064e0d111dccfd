"""AWQ (Lin et al. 2024) as its reference code runs it: shared, foldable scales searched on the block's output,
then a clipping search.

Per decoder block, on the full-precision block's calibration inputs (llm-awq ``run_awq``: each block's inputs
are the full-precision outputs of the block before it):

1. **Scale groups** (llm-awq ``auto_scale_block``). The linear layers that read one input share one input-channel
   scale s = mean|x|^α / √(max·min), so that diag(s)⁻¹ can be folded into the op that makes that input:
   q/k/v after the attention norm (loss: the attention module's output), gate/up after the MLP norm (loss:
   the MLP's output), o after v when v's output is o's input (AWQ's test: v and o weights of one shape, i.e.
   no grouped-query heads; loss: o's output) and down after up (loss: down's output). For each group, α runs
   over 0, 1/20, …, 19/20 (α = 1 is not tried, as in llm-awq); the group's layers are set to Q(W·diag(s))·diag(s)⁻¹
   together, the loss is the squared error of the inspected module's output against the full-precision output
   summed over calibration tokens, and the α with the smallest loss wins. For one-linear groups (o, down) the
   loss is computed exactly from the input second moment H: Σ‖E x‖² = n·tr(E H Eᵀ), E = W − Ŵ.
2. **Clipping** (llm-awq ``auto_clip_layer``), on every linear layer but q and k (AWQ skips them by name, as the q·k
   product makes their error hard to judge; a fused q/k/v is clipped, as there), with the scales applied (weights W·diag(s), inputs x/s). For each output
   channel and group of input columns, the weights are clamped to ±(1 − i/20)·max|w|, i = 0…9, quantized, and the
   bound with the smallest partial output error E[(x_g·(w_g − q_g))²] is kept.

The quantized layer computes with Ŵ = Q(clamp(W·diag(s), ±m))·diag(s)⁻¹ on the original inputs, which is what
folding diag(s)⁻¹ into the norm (or into the previous linear's output rows) and storing Q(clamp(W·diag(s))) gives;
``fold_scales`` does the folding itself. A previous linear's output rows carry a further per-row factor in the
folded model (v→o, up→down), which leaves per-row groups' rounding unchanged, so each layer's effective weight
depends only on its own input scale. α = 0 without clipping is RTN bit for bit.

Differences from llm-awq, all deliberate:
- Calibration text: the blocks the caller passes (``atlas wquant`` and the nqp chapter: the corpus's calib split),
  not samples of the Pile's validation split.
- The quantizer is ours (``rtn.quantize_rtn``; llm-awq's ``pseudo_quantize_tensor`` does not stretch the range to
  hold 0, see ``rtn``): every method in this library rounds on one grid.
- Clipping judges each group with the second moment H of all calibration tokens instead of 512 sampled tokens,
  and keeps a row unclipped if its clipped version has a larger full-row output error (AWQ's per-group criterion
  ignores the cross-group terms of E H Eᵀ); so clipping never increases a layer's calibration output error.
- GPT-2's MLP output projection follows a GELU, which no linear or norm can absorb (llm-awq wraps the activation in
  a ``ScaledActivation`` for such models): we leave it unscaled and clip it only.

Source: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" (MLSys 2024),
§3.2–3.3; mit-han-lab/llm-awq awq/quantize/auto_scale.py, auto_clip.py, pre_quant.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from atlas_core.attention import decoder_layers
from atlas_core.progress import tqdm  # names the running chapter
from transformers.pytorch_utils import Conv1D

from atlas_core.wquant.calib import BlockInputs, LayerStats, add_inputs, block_inputs, weight_of
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn

__all__ = ["AWQConfig", "AWQLayer", "ScaleGroup", "awq_block", "awq_quantize", "awq_scales", "awq_search",
           "clip_search", "fold_scales", "output_error", "scale_groups"]


@dataclass(frozen=True, kw_only=True)
class AWQConfig:
    """The two searches' grids (llm-awq's defaults)."""

    n_grid: int = 20  # α = i / n_grid, i = 0 … n_grid − 1; n_grid = 1 tries α = 0 only (RTN)
    clip: bool = True
    clip_grid: int = 20  # clamp bounds (1 − i / clip_grid)·max|w|
    max_shrink: float = 0.5  # … for i < max_shrink·clip_grid
    # Calibration tokens the searches see (the first blocks that hold them; None: every block given).
    # Each α costs a forward of the searched modules over them: 20 α on 16K tokens is ~20 full-model
    # forwards, half an hour of one CPU thread on smollm2-135m, so the default searches on 4,096
    # (llm-awq: up to 128 blocks of 512 on a GPU).
    search_tokens: int | None = 4096

    def __post_init__(self):
        if self.n_grid < 1 or self.clip_grid < 1 or not 0 < self.max_shrink < 1:
            raise ValueError(f"AWQConfig needs n_grid, clip_grid ≥ 1 and 0 < max_shrink < 1, got {self}")
        if self.search_tokens is not None and (isinstance(self.search_tokens, bool) or self.search_tokens < 1):
            raise ValueError(f"AWQConfig.search_tokens must be a positive number of tokens or None, got {self.search_tokens!r}")

    def search_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """(block, token) the first calibration blocks holding ``search_tokens`` tokens (at least one block)."""
        if self.search_tokens is None:
            return blocks
        return blocks[: max(1, -(-self.search_tokens // blocks.shape[1]))]

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(i / self.n_grid for i in range(self.n_grid))


@dataclass(frozen=True, kw_only=True)
class ScaleGroup:
    """Linear layers (names inside a decoder block) that share one input scale, folded into ``prev``.

    ``prev_rows`` > 0: ``prev`` is a linear whose last ``prev_rows`` output rows make the layers' input (v inside a
    fused qkv, up inside a fused gate_up); 0: ``prev`` is a norm. ``inspect`` is the module whose output is the loss.
    """

    prev: str
    layers: tuple[str, ...]
    inspect: str
    prev_rows: int = 0


@dataclass(frozen=True)
class AWQLayer:
    """One linear layer's AWQ result: input scale (in,), clamp bound (out, n_group) or None, and α."""

    scale: torch.Tensor
    clip: torch.Tensor | None
    alpha: float | None


def awq_scales(x_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel scales (in,) = mean|x|^α clamped at 1e-4, normalised so that max·min = 1 (llm-awq)."""
    s = x_abs_mean.float().pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """E‖(W − Ŵ) x‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ) for inputs with second moment H (in, in), in H's dtype."""
    e = (w - w_hat).to(h.dtype)
    return ((e @ h) * e).sum().item()


def awq_quantize(w: torch.Tensor, layer: AWQLayer, spec: WQuantSpec) -> torch.Tensor:
    """Ŵ = Q(clamp(W·diag(s), ±m))·diag(s)⁻¹: the (out, in) fp32 weight the layer computes with."""
    ws = w.float() * layer.scale
    if layer.clip is not None:
        ws = _clamp_groups(ws, layer.clip, spec)
    return quantize_rtn(ws, spec) / layer.scale


def _clamp_groups(w: torch.Tensor, bound: torch.Tensor, spec: WQuantSpec) -> torch.Tensor:
    """Clamp each (row, group) of w (out, in) to ±bound (out, n_group)."""
    out, n_in = w.shape
    g = spec.group_size(n_in)
    b = bound[..., None]  # (out, n_group, 1)
    return torch.clamp(w.reshape(out, n_in // g, g), -b, b).reshape(out, n_in)


def _group_errors(e: torch.Tensor, h_blocks: torch.Tensor) -> torch.Tensor:
    """Partial output errors e_g H_gg e_gᵀ (out, n_group) of errors e (out, n_group, g), blocks (n_group, g, g)."""
    return ((e.transpose(0, 1) @ h_blocks).transpose(0, 1) * e).sum(-1)  # (out, n_group, g) -> (out, n_group)


def _clip_error(w: torch.Tensor, bound: torch.Tensor, spec: WQuantSpec) -> torch.Tensor:
    """W − Q(clamp(W, ±bound)) (out, in) in fp64, rounded in fp32 exactly as ``awq_quantize`` rounds."""
    return (w - quantize_rtn(_clamp_groups(w, bound, spec), spec)).double()


def _row_errors(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Output error of each row, e_r H e_rᵀ (out,)."""
    return ((e @ h) * e).sum(1)


def clip_search(w: torch.Tensor, h: torch.Tensor, spec: WQuantSpec, cfg: AWQConfig = AWQConfig()) -> torch.Tensor:
    """AWQ's clamp bound per output channel and group: the shrink of max|w| with the least partial output error.

    Args:
        w: (out, in) weight (already multiplied by the scales); h: (in, in) second moment of its (scaled) inputs.
    Returns:
        bound (out, n_group): clamp each group to ±bound before quantizing. Rows whose clamped weights give a larger
        full-row error tr(e H eᵀ) than the unclamped ones keep the unclamped bound max|w|.
    Source: llm-awq auto_clip.py ``auto_clip_layer`` (n_grid 20, max_shrink 0.5).
    """
    out, n_in = w.shape
    g = spec.group_size(n_in)
    w, h = w.float(), h.double()
    h_blocks = torch.stack([h[i : i + g, i : i + g] for i in range(0, n_in, g)])  # (n_group, g, g)
    top = w.reshape(out, n_in // g, g).abs().amax(-1)  # (out, n_group)
    best, best_err = top.clone(), None
    for i in range(int(cfg.max_shrink * cfg.clip_grid)):
        bound = top * (1 - i / cfg.clip_grid)  # i = 0: max|w| itself, no clamping
        err = _group_errors(_clip_error(w, bound, spec).reshape(out, n_in // g, g), h_blocks)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best[better], best_err[better] = bound[better], err[better]
    # AWQ judges groups one by one; keep a row unclamped where that raised the row's whole output error.
    worse = _row_errors(_clip_error(w, best, spec), h) > _row_errors(_clip_error(w, top, spec), h)
    best[worse] = top[worse]
    return best


def _first(block, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if _get(block, n) is not None), None)


def _get(block, name: str):
    mod = block
    for part in name.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _out_features(block, name: str) -> int:
    return weight_of(_get(block, name)).shape[0]


def scale_groups(block) -> list[ScaleGroup]:
    """AWQ's scale groups of one decoder block (llm-awq ``auto_scale_block``; llama branch, and its fused analogues).

    Raises:
        ValueError: the block's norms or projections are not one of the known layouts.
    """
    attn_norm = _first(block, ("input_layernorm", "ln_1"))
    attn = _first(block, ("self_attn", "attn"))
    mlp_norm = _first(block, ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"))  # Gemma: pre_ff first
    if None in (attn_norm, attn, mlp_norm) or _get(block, "mlp") is None:
        raise ValueError(f"AWQ does not know the layout of {type(block).__name__} (norms, attention, MLP); "
                         "add it to awq.scale_groups")
    if _get(block, f"{attn}.q_proj") is not None:
        qkv, v, v_rows = tuple(f"{attn}.{p}_proj" for p in "qkv"), f"{attn}.v_proj", 0
    else:
        fused = _first(block, (f"{attn}.qkv_proj", f"{attn}.c_attn"))
        qkv, v, v_rows = (fused,), fused, -1
    o = _first(block, (f"{attn}.o_proj", f"{attn}.c_proj"))
    if _get(block, "mlp.gate_proj") is not None:
        mlp_in, up, up_rows = ("mlp.gate_proj", "mlp.up_proj"), "mlp.up_proj", 0
    elif _get(block, "mlp.gate_up_proj") is not None:
        mlp_in, up, up_rows = ("mlp.gate_up_proj",), "mlp.gate_up_proj", -1
    else:
        mlp_in, up, up_rows = ("mlp.c_fc",), None, 0  # GPT-2: a GELU sits between c_fc and c_proj
    down = _first(block, ("mlp.down_proj", "mlp.c_proj"))
    if None in qkv or o is None or down is None:
        raise ValueError(f"AWQ does not know the projections of {type(block).__name__}; add them to awq.scale_groups")
    groups = [ScaleGroup(prev=attn_norm, layers=qkv, inspect=attn)]
    o_out, o_in = weight_of(_get(block, o)).shape
    # AWQ's test, v and o of one shape (no grouped-query heads): every o input is one v output row, so the scale
    # folds into v. A fused q/k/v has then three equal parts, v the last.
    v_out = _out_features(block, v) // 3 if v_rows else _out_features(block, v)
    if o_out == o_in == v_out and (not v_rows or _out_features(block, v) == 3 * o_in):
        groups.append(ScaleGroup(prev=v, layers=(o,), inspect=o, prev_rows=o_in if v_rows else 0))
    groups.append(ScaleGroup(prev=mlp_norm, layers=mlp_in, inspect="mlp"))
    if up is not None:
        d_in = weight_of(_get(block, down)).shape[1]
        groups.append(ScaleGroup(prev=up, layers=(down,), inspect=down, prev_rows=d_in if up_rows else 0))
    return groups


@torch.no_grad()
def fold_scales(block, group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold diag(s)⁻¹ into ``group.prev`` and diag(s) into the group's layers, in place (the block's function is
    unchanged up to rounding).

    Args:
        s: (in,) positive scales of the layers' input channels.
    Raises:
        ValueError: ``prev`` is neither a known norm nor a linear layer.
    """
    prev = _get(block, group.prev)
    s = s.to(torch.float32)
    if isinstance(prev, (torch.nn.Linear, Conv1D)):
        rows = group.prev_rows or weight_of(prev).shape[0]
        w = weight_of(prev)  # (out, in) view: dividing its rows divides the outputs
        w[-rows:] /= s[:, None].to(w.dtype)
        if prev.bias is not None:
            prev.bias[-rows:] /= s.to(prev.bias.dtype)
    elif "norm" in type(prev).__name__.lower() and hasattr(prev, "weight"):
        if "gemma" in type(prev).__name__.lower():  # Gemma's RMSNorm multiplies by (1 + weight)
            prev.weight.copy_((1 + prev.weight) / s - 1)
        else:
            prev.weight.div_(s)
        if getattr(prev, "bias", None) is not None:  # LayerNorm: γ and β both scale the output
            prev.bias.div_(s)
    else:
        raise ValueError(f"cannot fold AWQ scales into {group.prev} ({type(prev).__name__}); it is not a norm or linear")
    for name in group.layers:
        weight_of(_get(block, name)).mul_(s[None, :])  # (out, in) view


def _module_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _capture(modules: dict[str, torch.nn.Module], store: dict, outputs: dict):
    """Record each module's (args, kwargs) per call into ``store[name]`` and its output into ``outputs[name]``
    (lists): the full-precision references of the search, from the block's own forward (no second one)."""
    def hook(name):
        def pre(module, args, kwargs):
            store.setdefault(name, []).append((args, kwargs))
        return pre

    def post(name):
        def after(module, args, output):
            outputs.setdefault(name, []).append(_module_output(output))
        return after

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    handles += [m.register_forward_hook(post(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _input_stats(block, names: list[str], stats: dict[str, LayerStats]):
    """Accumulate H and E|x| of each named linear's inputs into ``stats`` (``calib.add_inputs``)."""
    handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: add_inputs(stats, n, args[0]))
               for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- the searches -----------------------------------------------------------------------------------------------

def _set_weight(module, w: torch.Tensor) -> None:
    module.weight.copy_(w.T if isinstance(module, Conv1D) else w)


def _search_group(block, group: ScaleGroup, inputs: list[tuple], refs: list[torch.Tensor],
                  stats: dict[str, LayerStats], spec: WQuantSpec, cfg: AWQConfig) -> tuple[torch.Tensor, float]:
    """The group's scale (in,) and α with the least loss on the inspected module's output."""
    mods = [_get(block, n) for n in group.layers]
    orig = [weight_of(m).detach().clone().float() for m in mods]
    mean_abs = stats[group.layers[0]].mean_abs
    best = None
    try:
        for alpha in cfg.alphas:
            s = awq_scales(mean_abs, alpha)
            w_hats = [quantize_rtn(w * s, spec) / s for w in orig]
            if group.inspect in group.layers:  # one linear: Σ‖E x‖² = n·tr(E H Eᵀ), exact and cheap
                loss = sum(output_error(w, wh, stats[n].h) for w, wh, n in zip(orig, w_hats, group.layers))
            else:  # the group's layers quantized together, the rest of the module in full precision
                for m, wh in zip(mods, w_hats):
                    _set_weight(m, wh)
                module = block.get_submodule(group.inspect)
                loss = sum((_module_output(module(*a, **k)) - r).double().pow(2).sum().item()
                           for (a, k), r in zip(inputs, refs))
            if best is None or loss < best[0]:
                best = (loss, s, alpha)
    finally:
        for m, w in zip(mods, orig):
            _set_weight(m, w)
    return best[1], best[2]


@torch.no_grad()
def awq_block(block, index: int, inputs: BlockInputs, hidden: list[torch.Tensor], spec: WQuantSpec,
              cfg: AWQConfig = AWQConfig()) -> tuple[dict[str, AWQLayer], list[torch.Tensor]]:
    """AWQ's scale and clip search for one decoder block, on its full-precision calibration inputs.

    Args:
        block: decoder block ``index`` (left unchanged).
        inputs: the other arguments the model passes each block per calibration batch (``calib.block_inputs``).
        hidden: per batch, the full-precision hidden states (batch, token, d_model) entering the block.
    Returns:
        ({linear name inside the block: AWQLayer}, the block's full-precision outputs per batch (batch, token,
        d_model): the next block's inputs, as in llm-awq)
    """
    groups = scale_groups(block)
    linear_names = [n for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    inspected = {g.inspect: block.get_submodule(g.inspect) for g in groups if g.inspect not in g.layers}
    stats: dict[str, LayerStats] = {}
    captured: dict = {}
    refs: dict = {}
    with _input_stats(block, linear_names, stats), _capture(inspected, captured, refs):
        outputs = [_module_output(inputs.call(block, index, b, h)) for b, h in enumerate(hidden)]
    result = {n: AWQLayer(torch.ones(weight_of(block.get_submodule(n)).shape[1]), None, None) for n in linear_names}
    for group in groups:
        s, alpha = _search_group(block, group, captured.get(group.inspect, []), refs.get(group.inspect, []),
                                 stats, spec, cfg)
        result.update({n: AWQLayer(s, None, alpha) for n in group.layers})
    if cfg.clip:
        for n in linear_names:
            if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj"):  # AWQ does not clip q and k (see module doc)
                continue
            s = result[n].scale
            h = stats[n].h / (s[:, None].double() * s[None, :].double())  # second moment of the scaled inputs x / s
            bound = clip_search(weight_of(block.get_submodule(n)).float() * s, h, spec, cfg)
            result[n] = AWQLayer(s, bound, result[n].alpha)
    return result, outputs


@torch.no_grad()
def awq_search(model, blocks: torch.Tensor, spec: WQuantSpec, cfg: AWQConfig = AWQConfig(), batch_size: int = 8,
               progress: bool = True) -> dict[str, AWQLayer]:
    """AWQ over every decoder block, each on the full-precision outputs of the one before (llm-awq ``run_awq``).

    Args:
        blocks: (block, token) calibration token ids; the first ``cfg.search_tokens`` of them are used, run
            ``batch_size`` blocks at a time (memory only).
    Returns:
        {qualified linear name (as ``calib.linear_layers``): AWQLayer}
    """
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    inputs = block_inputs(model, cfg.search_blocks(blocks), batch_size)
    hidden, result = inputs.hidden, {}
    for i, block in enumerate(tqdm(layers, desc="awq", disable=not progress)):
        found, hidden = awq_block(block, i, inputs, hidden, spec, cfg)
        result.update({f"{prefix}.{i}.{n}": r for n, r in found.items()})
    return result
