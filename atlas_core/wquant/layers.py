"""The decoder's linear layers by the input they read, and the participation ratios of their statistics.

Linear layers that read the same kind of input share a type: the attention projections of q, k and v read
the block's normed hidden state, the attention output projection reads the heads' outputs, the MLP's
gate and up read the normed hidden state of the MLP, its down projection the MLP's hidden activation.
The names are those of the families in ``atlas_core.attention.LAYOUTS`` (fused q/k/v and gate/up
projections included); GPT-2 calls two different layers ``c_proj``, so its parent module decides.
"""

from __future__ import annotations

from atlas_core.wquant.calib import LayerStats, linear_layers, participation_ratio, weight_of

__all__ = ["LAYER_TYPES", "SHARED_INPUT", "layer_index", "layer_type", "linear_widths", "output_widths",
           "participation_rows"]

ATTN_IN, ATTN_OUT, MLP_IN, MLP_DOWN = "attention in (q, k, v)", "attention out", "MLP in (gate, up)", "MLP down"
LAYER_TYPES = {  # the layer's name (its last one or two components) -> its type
    "q_proj": ATTN_IN, "k_proj": ATTN_IN, "v_proj": ATTN_IN, "qkv_proj": ATTN_IN, "c_attn": ATTN_IN,
    "o_proj": ATTN_OUT, "attn.c_proj": ATTN_OUT,
    "gate_proj": MLP_IN, "up_proj": MLP_IN, "gate_up_proj": MLP_IN, "c_fc": MLP_IN,
    "down_proj": MLP_DOWN, "mlp.c_proj": MLP_DOWN,
}
SHARED_INPUT = frozenset({"k_proj", "v_proj", "up_proj"})  # read the very input of the q_proj / gate_proj before them


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def layer_type(name: str) -> str:
    """The type of a decoder linear layer, from ``LAYER_TYPES``.

    Args:
        name: the qualified module name, e.g. "model.layers.3.mlp.up_proj" or "transformer.h.0.attn.c_proj".
    Returns:
        One of "attention in (q, k, v)", "attention out", "MLP in (gate, up)", "MLP down".
    Raises:
        ValueError: a name of no supported family.
    """
    last_two = ".".join(name.rsplit(".", 2)[-2:])
    for key in (last_two, _leaf(name)):
        if key in LAYER_TYPES:
            return LAYER_TYPES[key]
    raise ValueError(f"linear layer {name!r} is of no known type; known names: {sorted(LAYER_TYPES)}")


def layer_index(name: str) -> int:
    """The decoder block a linear layer sits in: the first integer component of its name ("model.layers.3.…" -> 3).

    Raises:
        ValueError: a name without a block index.
    """
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"linear layer {name!r} names no decoder block index")


def participation_rows(stats: dict[str, LayerStats], out_widths: dict[str, int] | None = None) -> list[dict]:
    """Participation ratios of each linear layer's input second moment H and activation Fisher F.

    Layers that read an input already counted (``SHARED_INPUT``: k and v after q, up after gate) are left
    out, so each input is counted once.

    The largest participation ratio a matrix can have is its rank. H = E[x xᵀ] is (in, in): at most the input
    width. F = E[g gᵀ] with g = Wᵀ ∂L/∂y, the gradient through this layer alone (``calibration_stats``' backward
    hook), lies in the row space of W: F's rank is at most min(in, out). For an MLP's down projection that is
    the residual width, not its (wider) input width.

    Args:
        stats: {layer name: ``LayerStats`` with ``fisher``} (``calib.calibration_stats``).
        out_widths: {layer name: output width} (``output_widths``); with it each row also has "out_width" and
            "fisher_bound".
    Returns:
        [{"layer", "type", "depth" (block index), "width" (input width), "pr_h", "pr_fisher"} (+ "out_width",
        "fisher_bound" = min(width, out_width))] in ``stats``' order; a participation ratio is (Σλ)²/Σλ²: 1 for
        rank one, the width for an isotropic matrix.
    Raises:
        ValueError: statistics without a Fisher, a layer of no known type, or a layer missing from ``out_widths``.
    """
    rows = []
    for name, s in stats.items():
        if _leaf(name) in SHARED_INPUT:
            continue
        if s.gg is None:
            raise ValueError(f"{name}: statistics without a Fisher; compute them with calibration_stats(..., fisher=True)")
        row = {"layer": name, "type": layer_type(name), "depth": layer_index(name), "width": s.xx.shape[0],
               "pr_h": participation_ratio(s.h), "pr_fisher": participation_ratio(s.fisher)}
        if out_widths is not None:
            if name not in out_widths:
                raise ValueError(f"{name}: no output width given; out_widths has {sorted(out_widths)[:4]} …")
            row.update(out_width=out_widths[name], fisher_bound=min(row["width"], out_widths[name]))
        rows.append(row)
    return rows


def output_widths(model) -> dict[str, int]:
    """{name: output width} of the decoder's linear layers (``calib.linear_layers``), whatever their weight layout."""
    return {name: weight_of(m).shape[0] for name, m in linear_layers(model).items()}


def linear_widths(config) -> tuple[int, ...]:
    """Input widths of the linear layers weight quantization groups (decoder blocks, no lm_head), from a config.

    The model is built on the meta device: every shape, no weight read or allocated. The CLI and the nqp
    chapter's pre-check test a quantization group against these widths before a model loads.

    Args:
        config: a transformers causal-LM config (``models.model_config``).
    Returns:
        the distinct input widths, ascending.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return tuple(sorted({m.weight.shape[0] if isinstance(m, Conv1D) else m.in_features  # Conv1D's weight: (in, out)
                         for m in linear_layers(skeleton).values()}))
