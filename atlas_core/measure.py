"""The source work's head-geometry protocol end to end: clouds of one layer → O_h with nulls, and d_int."""

from __future__ import annotations

import numpy as np

from atlas_core.clouds import RESIDUALS, CloudSpec, head_clouds, kv_groups, out_proj
from atlas_core.geometry import check_rank, layer_overlap
from atlas_core.intrinsic import ESTIMATORS, per_head
from atlas_core.models import LoadedModel, ModelSpec, check_layer

HEAD_SETS = ("all", "first8")


def select_heads(heads: str, n_heads: int) -> np.ndarray:
    """Indices of the heads to compare: "all", or "first8" (the source's GPT-2 headline)."""
    if heads not in HEAD_SETS:
        raise ValueError(f"unknown head set '{heads}'; choose one of {HEAD_SETS}")
    return np.arange(n_heads if heads == "all" else min(8, n_heads))


def overlap_report(
    lm: LoadedModel,
    layer: int = -1,
    k: int = 7,
    residual: str = "eps",
    heads: str = "all",
    spec: CloudSpec = CloudSpec(),
    metric: str = "source",
    n_boot: int = 2000,
    null_draws: int = 500,
    progress: bool = True,
) -> dict:
    """O_h of one layer with its CI, inter/intra split, Haar null, difference and z-score.

    For c (after W_O) the null inside each head's W_O column space is added beside the d_model null.
    Returns:
        a JSON-ready dict (``OverlapResult.summary()`` plus model, layer, residual, heads).
    """
    layer = check_request(lm.spec, layer, residual, spec, k)  # before any extraction
    idx = select_heads(heads, lm.spec.n_heads)
    cloud = head_clouds(lm, [layer], residual, spec, progress)[layer][idx]
    w_o = out_proj(lm, layer)[idx] if residual == "c" else None
    result = layer_overlap(cloud, kv_groups(lm)[idx], k, metric, n_boot, spec.seed, null_draws, w_o)
    return {"model": lm.spec.name, "layer": layer, "residual": residual, "heads": heads,
            "n_heads": len(idx), "corpus": spec.corpus, "d_head": lm.spec.d_head, **result.summary()}


def id_report(
    lm: LoadedModel,
    layer: int = -1,
    estimator: str = "twonn",
    residual: str = "eps",
    spec: CloudSpec = CloudSpec(),
    progress: bool = True,
) -> dict:
    """Per-head intrinsic dimension of one layer's clouds and its mean over heads."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator '{estimator}'; choose one of {ESTIMATORS}")
    layer = check_request(lm.spec, layer, residual, spec)
    cloud = head_clouds(lm, [layer], residual, spec, progress)[layer]
    values = per_head(cloud, estimator)
    return {"model": lm.spec.name, "layer": layer, "residual": residual, "estimator": estimator,
            "corpus": spec.corpus, "n_points": spec.n_points, "per_head": [float(v) for v in values],
            "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def check_request(model: ModelSpec, layer: int, residual: str, spec: CloudSpec, k: int | None = None) -> int:
    """Refuse, from the model's shape alone (``models.describe``: no weights), a layer, residual or frame
    rank the model cannot give; the CLI calls it before loading, the reports again on the loaded model.

    Args:
        model: the model's attention layout; layer: an index, negative counting from the end;
        residual: one of ``clouds.RESIDUALS``; spec: the clouds; k: the frame rank (O_h only).
    Returns:
        The layer index in 0..n_layers-1.
    Raises:
        ValueError: the layer is out of range, the residual unknown, or k not in 1..d-1 (d = d_model for c,
            else d_head) or not below the points per head.
    """
    index = check_layer(model, layer)
    if residual not in RESIDUALS:
        raise ValueError(f"unknown residual '{residual}'; choose one of {RESIDUALS}")
    if k is not None:
        check_rank(k, model.d_model if residual == "c" else model.d_head, spec.n_points)
    return index
