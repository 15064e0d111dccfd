"""The source work's measurement protocol on one model, with this book's controls (the crossarch chapter).

The protocol: the deepest layer; N points per head from the first blocks of a corpus; the residual ε in
each head's value coordinates; frames of rank k; O = mean principal cosine; inter-KV-group pairs as the
headline under grouped-query attention; a bootstrap CI over pairs; the Haar null (``geometry``). The
controls repeat it on z and on c = W_O z, at every k of a sweep, on further corpora, sampling seeds and
layers, and set each head's d_int against its mean overlap (``stats``), with Haar frames as the null.
Intra-group pairs (heads that share a KV head) are judged against the shared-value null instead
(``intra_null``: the same keys and values, each head's queries independently rotated).

``measure_model`` returns every number the chapter prints for one model; the chapter only formats them.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np

from atlas_core.clouds import CloudSpec, head_clouds, kv_groups, out_proj, point_indices, subsample
from atlas_core.geometry import (OverlapResult, check_rank, frame_rank, haar_head_overlaps, head_mean_overlap,
                                 layer_overlap, overlap_sweep)
from atlas_core.intra_null import IntraNullSpec, intra_group_null, layer_group_attention
from atlas_core.intrinsic import per_head_dropped
from atlas_core.models import LoadedModel, load_model
from atlas_core import interval
from atlas_core.stats import spearman_by_group, spearman_null


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """What the crossarch chapter measures on each model; the first corpus and seed are the protocol's own."""

    corpora: tuple[str, ...] = ("britannica", "pydoc", "plays")
    k: int = 7  # headline frame rank
    k_range: tuple[int, ...] = (4, 5, 6, 7, 8, 9, 10, 11)
    n_points: int = 1200
    n_blocks: int = 12
    seq_len: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)  # point-sampling seeds
    n_deep: int = 3  # deepest layers for the Spearman test and the depth spread
    mid_depth: float = 0.5  # relative depth of the extra layer in the depth spread
    n_boot: int = 2000
    null_draws: int = 500
    n_perm: int = 20_000
    spearman_null_draws: int = 1000
    intra_null_draws: int = 200  # draws of the shared-value null of intra-group pairs (``intra_null``)

    def cloud_spec(self, corpus: str | None = None, seed: int | None = None, n_points: int | None = None) -> CloudSpec:
        """The clouds of one corpus and seed (the protocol's own by default)."""
        return CloudSpec(corpus=self.corpora[0] if corpus is None else corpus, seq_len=self.seq_len,
                         n_blocks=self.n_blocks, n_points=self.n_points if n_points is None else n_points,
                         seed=self.seeds[0] if seed is None else seed)

    def check(self, d_head: int, n_layers: int) -> None:
        """Refuse a protocol a model of this shape cannot run: every k must be a frame rank below d_head.

        Raises:
            ValueError: a k outside 1 <= k < d_head (``geometry.check_rank``), or n_deep outside 1..n_layers
        """
        for kk in (self.k, *self.k_range):
            check_rank(kk, d_head, self.n_points)
        if not 1 <= self.n_deep <= n_layers:
            raise ValueError(f"n_deep = {self.n_deep} must be between 1 and the model's {n_layers} layers")


def model_clouds(lm: LoadedModel, p: Protocol) -> dict:
    """Every cloud the protocol needs from one model (from the disk cache or one extraction each).

    Returns:
        {"spec": ModelSpec dict, "groups": (head,), "deep", "mid": layers, "depth_layers": [layer],
         "eps": {layer: (head, point, d_head)}, "z": (head, point, d_head), "w_o": (head, d_head, d_model),
         "full": (head, eligible, d_head) ε at every eligible position of the deepest layer,
         "corpora": {corpus: (head, point, d_head)} the deepest layer's ε on each further corpus}
    """
    s = lm.spec
    p.check(s.d_head, s.n_layers)
    deep = s.n_layers - 1
    mid = int(round(p.mid_depth * (s.n_layers - 1)))
    depth_layers = sorted({*range(s.n_layers - p.n_deep, s.n_layers), mid})
    proto = p.cloud_spec()
    every = p.cloud_spec(n_points=p.n_blocks * (p.seq_len - 1))  # every eligible point: each seed is a subsample
    return dict(
        spec=s.as_dict(), groups=kv_groups(lm), deep=deep, mid=mid, depth_layers=depth_layers,
        eps=head_clouds(lm, depth_layers, "eps", proto, progress=False),
        z=head_clouds(lm, [deep], "z", proto, progress=False)[deep],
        w_o=out_proj(lm, deep),
        full=head_clouds(lm, [deep], "eps", every, progress=False)[deep],
        corpora={c: head_clouds(lm, [deep], "eps", p.cloud_spec(corpus=c), progress=False)[deep] for c in p.corpora[1:]},
    )


def intrinsic_dims(cloud) -> dict[str, np.ndarray]:
    """Per-head intrinsic dimension, (head,), with the TwoNN line fit and the source's biased variant.

    Duplicate points are dropped (``intrinsic.per_head_dropped``); their count is not reported here.
    """
    return {"twonn": per_head_dropped(cloud, "twonn")[0], "twonn_source": per_head_dropped(cloud, "twonn-source")[0]}


def protocol_overlap(cloud, groups, p: Protocol, w_o=None) -> OverlapResult:
    """The protocol's O_h (rank p.k, mean principal cosine) with its nulls; ``w_o`` for c clouds."""
    return layer_overlap(cloud, groups, p.k, "source", p.n_boot, p.seeds[0], p.null_draws, w_o)


def overlap_summary(result: OverlapResult, cloud=None) -> dict:
    """JSON-ready ``OverlapResult.summary()``, with the mean and per-head d_int of ``cloud`` when given."""
    out = result.summary()
    if cloud is not None:
        ids = intrinsic_dims(cloud)
        out.update({f"d_int_{e}": float(v.mean()) for e, v in ids.items()})
        out.update({f"d_int_{e}_per_head": v.tolist() for e, v in ids.items()})
    return out


def intra_null(lm: LoadedModel, layer: int, p: Protocol) -> dict | None:
    """The shared-value null of the protocol's intra-group O_h (ε, rank p.k) in one layer: heads reading the
    same keys and values with independent query weights (``intra_null.intra_group_null``), on the protocol's
    own blocks and points.

    Args:
        lm: the loaded model; layer: its index (the protocol's deepest layer).
        p: the protocol (its clouds, k, first seed and ``intra_null_draws``).
    Returns:
        {"mean", "std": of the draws, "n_pairs": intra-group pairs, "n_draws", "observed": the same statistic on
        the model's own queries (the protocol's intra-group O_h up to floating-point error)}; None when no two
        query heads share a KV head (MHA).
    """
    if len(np.unique(kv_groups(lm))) == lm.spec.n_heads:
        return None
    spec = p.cloud_spec()
    null = intra_group_null(layer_group_attention(lm, layer, spec), point_indices(spec),
                            IntraNullSpec(k=p.k, n_draws=p.intra_null_draws, seed=p.seeds[0]))
    return {"mean": null["mean"], "std": null["std"], "n_pairs": null["n_pairs"], "n_draws": p.intra_null_draws,
            "observed": null["observed"]}


def measure_model(name: str, p: Protocol) -> dict:
    """Every number of the crossarch chapter for one model; the model is loaded, read and freed first.

    Returns:
        {"spec", "deep", "mid", "kv_groups", "main": {"eps"|"z"|"c": summary}, "sweep": {k: summary},
         "k_id", "at_k_id": summary at the source's per-model k, "depth": {layer: summary},
         "seeds": {seed: summary}, "corpora": {corpus: summary}, "spearman": the per-head test and its null};
        main["eps"] also holds "intra_null_mean", "intra_null_std" and "intra_null_z" (the intra-group O_h against
        the shared-value null, ``intra_null``; None under MHA)
    Raises:
        ValueError: a protocol the model cannot run (``Protocol.check``)
    """
    lm = load_model(name)
    x = model_clouds(lm, p)
    shared = intra_null(lm, x["deep"], p)
    del lm
    gc.collect()  # one model in memory at a time
    groups, deep, d_head = x["groups"], x["deep"], x["spec"]["d_head"]
    c = np.einsum("hpd,hdm->hpm", x["z"], x["w_o"])  # (head, point, d_model): c_h = W_O^(h) z_h

    depth_res = {L: protocol_overlap(x["eps"][L], groups, p) for L in x["depth_layers"]}
    main = {"eps": overlap_summary(depth_res[deep], x["eps"][deep]),
            "z": overlap_summary(protocol_overlap(x["z"], groups, p), x["z"]),
            "c": overlap_summary(protocol_overlap(c, groups, p, x["w_o"]), c)}
    main["eps"].update(intra_null_summary(main["eps"]["intra"], shared))
    sweep = {kk: r.summary() for kk, r in overlap_sweep(x["eps"][deep], groups, p.k_range, "source", p.n_boot,
                                                         p.seeds[0], p.null_draws).items()}
    k_id = frame_rank(main["eps"]["d_int_twonn_source"], d_head)  # the source's per-model k
    at_k_id = sweep.get(k_id) or layer_overlap(x["eps"][deep], groups, k_id, "source", p.n_boot, p.seeds[0],
                                               p.null_draws).summary()
    seeds = {sd: subsample(x["full"], p.cloud_spec(seed=sd))  # equal to head_clouds at that seed (tested)
             for sd in p.seeds if sd != p.seeds[0]}
    return dict(
        spec=x["spec"], deep=deep, mid=x["mid"], kv_groups=groups.tolist(), main=main, sweep=sweep,
        k_id=k_id, at_k_id=at_k_id, depth={L: r.summary() for L, r in depth_res.items()},
        seeds={p.seeds[0]: main["eps"]} | {sd: overlap_summary(protocol_overlap(cl, groups, p), cl)
                                           for sd, cl in seeds.items()},
        corpora={p.corpora[0]: main["eps"]} | {cn: overlap_summary(protocol_overlap(cl, groups, p), cl)
                                               for cn, cl in x["corpora"].items()},
        spearman=_spearman(x, depth_res, main, p),
    )


def intra_null_summary(intra: float | None, null: dict | None) -> dict:
    """{"intra_null_mean", "intra_null_std", "intra_null_n_pairs", "intra_null_z"}: an intra-group O_h against its
    shared-value null (``intra_null``); every value None when there is no intra-group pair, the z-score NaN when
    the null has no spread (values confined to k directions: every draw gives the same overlap)."""
    if intra is None or null is None:
        return dict.fromkeys(("intra_null_mean", "intra_null_std", "intra_null_n_pairs", "intra_null_z"))
    return {"intra_null_mean": null["mean"], "intra_null_std": null["std"], "intra_null_n_pairs": null["n_pairs"],
            "intra_null_z": (intra - null["mean"]) / null["std"] if null["std"] > 0 else float("nan")}


def _spearman(x: dict, depth_res: dict, main: dict, p: Protocol) -> dict:
    """Per-head d_int (TwoNN) against mean inter-group overlap in each deep layer and pooled, beside the same
    test with Haar-random frames in place of the heads' frames (the real d_int kept)."""
    groups, deep, d_head = x["groups"], x["deep"], x["spec"]["d_head"]
    layers = list(range(deep - p.n_deep + 1, deep + 1))
    dint = {L: main["eps"]["d_int_twonn_per_head"] if L == deep else intrinsic_dims(x["eps"][L])["twonn"]
            for L in layers}
    xs = np.concatenate([dint[L] for L in layers])  # (layer * head,)
    ys = np.concatenate([head_mean_overlap(depth_res[L].matrix, groups) for L in layers])
    labels = np.repeat(layers, len(groups))
    null_y = haar_head_overlaps(groups, d_head, p.k, len(layers), p.spearman_null_draws, p.seeds[0])  # (draw, n)
    null = spearman_null(xs, null_y, labels, p.n_perm, p.seeds[0])
    return dict(layers=layers, d_int=xs.tolist(), head_overlap=ys.tolist(), layer=labels.tolist(),
                mqa=main["eps"]["pairs"] != "inter", real=spearman_by_group(xs, ys, labels, p.n_perm, p.seeds[0]),
                ci=_rho_intervals(xs, ys, labels), haar_first=null["first"], haar_rho=null["rho"])


def _rho_intervals(xs: np.ndarray, ys: np.ndarray, labels: np.ndarray) -> dict:
    """{layer: (lo, hi), ..., "pooled": (lo, hi)} 95% intervals of Spearman's rho, heads resampled
    (``interval.spearman``); NaN where a layer has too few heads or a constant side."""
    out = {}
    for key, m in [*((L.item(), labels == L) for L in np.unique(labels)), ("pooled", np.ones_like(labels, bool))]:
        try:
            est = interval.spearman(xs[m], ys[m])
            out[key] = (est.lo, est.hi)
        except ValueError:  # fewer than MIN_UNITS heads
            out[key] = (float("nan"), float("nan"))
    return out
