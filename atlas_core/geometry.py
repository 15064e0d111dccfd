"""Head geometry: frames of per-head clouds, their overlaps, and the chance levels they are judged against.

Axis vocabulary: ``head``, ``point``, ``d`` (the cloud's dimension: ``d_head`` for z and ε, ``d_model``
for c), ``k`` (frame rank), ``pair`` (a pair of heads, i < j) and ``draw`` (one Monte Carlo draw).
Everything is computed in numpy float64; torch tensors are accepted wherever arrays are.

Definitions (SPEC §5). The frame of a cloud X (point, d) is the top-k right singular vectors of
X − mean(X). For two frames, s = singular values of Bᵢᵀ Bⱼ (cosines of the principal angles); the
source overlap is O = mean(s), the projection overlap is P = Σ s² / k (exactly k/d in expectation for
random frames). O_h of a layer is the mean of O over head pairs, inter-KV-group pairs being the headline
under GQA, as in the source work. Every overlap comes with its null: Haar-random k-frames in R^d over
the same number of pairs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from atlas_core.interval import Bootstrap

__all__ = [
    "OverlapResult",
    "analytic_null_mean",
    "bootstrap_ci",
    "c_null_in_column_spaces",
    "check_rank",
    "column_space_frames",
    "frame",
    "frame_rank",
    "frames",
    "gaussian_null_clouds",
    "haar_cosines",
    "haar_frames",
    "haar_head_overlaps",
    "haar_null",
    "head_mean_overlap",
    "layer_overlap",
    "overlap_sweep",
    "overlap_matrix",
    "pair_groups",
    "pair_overlaps",
    "principal_cosines",
    "projection_overlap",
    "source_overlap",
]

METRICS = ("source", "projection")
_CHUNK = 50_000  # pairs simulated at once (bounds memory at k = 11 to a few tens of MB per array)


def _array(x) -> np.ndarray:
    """A float64 numpy copy of a numpy array or a torch tensor (any device, any dtype)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _rng(seed_or_rng) -> np.random.Generator:
    return seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)


# --- frames and overlaps -------------------------------------------------------------------------------


def frame(cloud, k: int) -> np.ndarray:
    """Top-k principal directions of one centred cloud.

    Args:
        cloud: (point, d)
        k: frame rank, at most min(point − 1, d)
    Returns:
        (d, k) orthonormal columns, ordered by decreasing singular value
    """
    return frames(_array(cloud)[None], k)[0]


def frames(clouds, k: int) -> np.ndarray:
    """Top-k principal directions of every head's centred cloud.

    Args:
        clouds: (head, point, d)
        k: frame rank, at most min(point − 1, d)
    Returns:
        (head, d, k)
    """
    x = _array(clouds)
    _, n_points, d = x.shape
    if not 1 <= k <= min(n_points - 1, d):
        raise ValueError(f"k = {k} needs 1 <= k <= min(points - 1, d) = {min(n_points - 1, d)}")
    x = x - x.mean(axis=1, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)  # vt: (head, min(point, d), d)
    return vt[:, :k].transpose(0, 2, 1)


def principal_cosines(b_i, b_j) -> np.ndarray:
    """Cosines of the principal angles between two frames (leading batch axes broadcast).

    Args:
        b_i: (..., d, k) orthonormal columns
        b_j: (..., d, k) orthonormal columns
    Returns:
        (..., k) singular values of b_iᵀ b_j in decreasing order, clipped to [0, 1]
    """
    m = np.swapaxes(_array(b_i), -1, -2) @ _array(b_j)  # (..., k, k)
    return np.clip(np.linalg.svd(m, compute_uv=False), 0.0, 1.0)


def _score(cosines: np.ndarray, metric: str) -> np.ndarray:
    """Overlap from cosines (..., k) -> (...): the mean cosine, or the mean squared cosine."""
    if metric == "source":
        return cosines.mean(-1)
    if metric == "projection":
        return (cosines**2).mean(-1)
    raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")


def source_overlap(b_i, b_j) -> np.ndarray:
    """The source work's overlap O: the mean principal cosine (not squared, not the max).

    Args:
        b_i, b_j: (..., d, k)
    Returns:
        (...) in [0, 1]; chance level ≈ (8/(3π))·√(k/d), see ``analytic_null_mean``
    """
    return _score(principal_cosines(b_i, b_j), "source")


def projection_overlap(b_i, b_j) -> np.ndarray:
    """Projection overlap P = Σ s² / k = ‖b_iᵀ b_j‖²_F / k.

    Args:
        b_i, b_j: (..., d, k)
    Returns:
        (...) in [0, 1]; exactly k/d in expectation for independent random frames
    """
    return _score(principal_cosines(b_i, b_j), "projection")


def pair_overlaps(frames_, pairs, metric: str = "source") -> np.ndarray:
    """Overlap of the listed head pairs.

    Args:
        frames_: (head, d, k)
        pairs: (pair, 2) head indices
    Returns:
        (pair,)
    """
    b = _array(frames_)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return _score(principal_cosines(b[pairs[:, 0]], b[pairs[:, 1]]), metric)


def overlap_matrix(frames_, metric: str = "source") -> np.ndarray:
    """Overlap between every two heads.

    Args:
        frames_: (head, d, k)
        metric: "source" (mean cosine) or "projection" (mean squared cosine)
    Returns:
        (head, head), symmetric, ones on the diagonal
    """
    b = _array(frames_)
    i, j = np.triu_indices(len(b), 1)
    out = np.eye(len(b))
    out[i, j] = out[j, i] = pair_overlaps(b, np.stack([i, j], 1), metric)
    return out


def pair_groups(kv_group) -> dict[str, np.ndarray]:
    """Head pairs i < j, all of them and split by whether the two heads share a KV head.

    Args:
        kv_group: (head,) the KV head of each query head
    Returns:
        {"all", "inter", "intra"}: each (pair, 2) int64; "inter" = different KV heads, "intra" = same
    """
    g = np.asarray(_array(kv_group), dtype=np.int64)
    i, j = np.triu_indices(len(g), 1)
    pairs = np.stack([i, j], 1).astype(np.int64)
    same = g[i] == g[j]
    return {"all": pairs, "inter": pairs[~same], "intra": pairs[same]}


def bootstrap_ci(values, n_resamples: int = 2000, level: float = 0.95, seed: int = 0, statistic=np.mean) -> tuple[float, float]:
    """Percentile bootstrap CI of a statistic (the mean by default) over pairs, deterministic under a seed.

    Pairs that share a head are not independent, so this interval describes the spread over the pair
    set, not sampling error of the heads themselves.

    Args:
        values: (pair,) at least one value
        statistic: reduces (resample, pair) along ``axis=1``, e.g. ``np.mean`` or ``np.median``.
    Returns:
        (lo, hi)
    """
    v = _array(values).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    boot = Bootstrap(n_resamples=n_resamples, level=level, seed=seed)  # the one home of resampling (interval.py)
    return boot.interval(statistic(v[boot.draws(v.size)], axis=1))  # statistic over (resample, pair)


# --- nulls -----------------------------------------------------------------------------------------------


def haar_frames(n: int, d: int, k: int, rng=0) -> np.ndarray:
    """n Haar-random orthonormal k-frames in R^d (reference sampler).

    QR of a Gaussian matrix, with the signs of R's diagonal moved into Q so the law is exactly Haar.

    Args:
        rng: a numpy Generator or a seed
    Returns:
        (n, d, k)
    """
    g = _rng(rng).standard_normal((n, d, k))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]


def haar_cosines(d: int, k: int, n: int, rng=0) -> np.ndarray:
    """Principal cosines of n independent pairs of Haar k-frames in R^d, in O(k³) per pair (fast path).

    By invariance one frame may be fixed to the first k axes; the cosines are then the singular values
    of the top k×k block of a Haar frame Q = G R⁻¹ (G Gaussian (d, k), RᵀR = GᵀG). With G₁ the top block
    and GᵀG = G₁ᵀG₁ + W, W ~ Wishart_k(d − k) drawn by Bartlett's decomposition, the cosines are the
    singular values of C⁻¹G₁ᵀ with CCᵀ = GᵀG. Falls back to ``haar_frames`` when d < 2k.
    ``tests/test_geometry.py`` holds it to the reference.

    Returns:
        (n, k) in decreasing order, clipped to [0, 1]
    """
    rng = _rng(rng)
    if d < 2 * k:
        return principal_cosines(haar_frames(n, d, k, rng), np.eye(d)[:, :k])
    g1 = rng.standard_normal((n, k, k))
    low = np.tril(rng.standard_normal((n, k, k)), -1)  # Bartlett factor of W
    low[:, np.arange(k), np.arange(k)] = np.sqrt(rng.chisquare(d - k - np.arange(k), size=(n, k)))
    gram = np.swapaxes(g1, 1, 2) @ g1 + low @ np.swapaxes(low, 1, 2)  # GᵀG, (n, k, k)
    m = np.linalg.solve(np.linalg.cholesky(gram), np.swapaxes(g1, 1, 2))
    return np.clip(np.linalg.svd(m, compute_uv=False), 0.0, 1.0)


def analytic_null_mean(d: int, k: int) -> float:
    """Large-d approximation of the mean source overlap O of two Haar k-frames in R^d: (8/(3π))·√(k/d).

    √d·BᵢᵀBⱼ is close to a k×k Gaussian matrix whose singular values, scaled by √k, follow the
    quarter-circle law with mean 8/(3π). Finite k lowers the true value slightly and finite d/k raises it;
    for d ∈ {64, 128, 256} and k = 4…11 it is within 0.005 of the exact mean (largest gap at d = 64, k = 4).
    """
    return 8.0 / (3.0 * math.pi) * math.sqrt(k / d)


def haar_null(d: int, k: int, n_pairs: int, n_draws: int = 500, seed: int = 0, metric: str = "source") -> dict:
    """Monte Carlo null of a mean overlap over n_pairs pairs of Haar-random k-frames in R^d.

    Each draw is the mean over n_pairs independent random pairs, so the spread of the draws is the one
    expected for an O_h computed from that many pairs. Independent pairs are exact for the mean and the
    std even when real pairs share heads: for Haar frames, O(i, j) and O(i, l) are independent (given
    Bᵢ, Bⱼ and Bₗ are still Haar), so the pairwise covariances vanish.

    Returns:
        {"mean": mean of the draws, "std": their std (ddof 1), "draws": (draw,),
         "pair_mean", "pair_std": mean and std of a single pair's overlap,
         "analytic": (8/(3π))√(k/d) for "source", k/d for "projection"}
    """
    # A pure function of its arguments, asked for again and again with the same ones (every layer of a
    # depth profile, every sampling seed and corpus of a model): computed once per process (its Haar SVDs
    # were a third of the crossarch chapter's time), handed out as a copy.
    null = _haar_null(d, k, n_pairs, n_draws, seed, metric)
    return {**null, "draws": null["draws"].copy()}


@functools.lru_cache(maxsize=256)
def _haar_null(d: int, k: int, n_pairs: int, n_draws: int, seed: int, metric: str) -> dict:
    rng = np.random.default_rng(seed)
    total = n_draws * n_pairs
    values = np.concatenate(
        [_score(haar_cosines(d, k, min(_CHUNK, total - s), rng), metric) for s in range(0, total, _CHUNK)]
    )
    draws = values.reshape(n_draws, n_pairs).mean(1)
    analytic = analytic_null_mean(d, k) if metric == "source" else k / d
    return {
        "mean": float(draws.mean()),
        "std": float(draws.std(ddof=1)),
        "draws": draws,
        "pair_mean": float(values.mean()),
        "pair_std": float(values.std(ddof=1)),
        "analytic": analytic,
    }


def gaussian_null_clouds(clouds, seed: int = 0) -> np.ndarray:
    """Each head's cloud replaced by a Gaussian cloud with the same mean, covariance and point count.

    The second null of SPEC §5: its frames equal the real ones up to sampling noise (a frame depends on
    the covariance only), so the overlap it gives separates what second moments explain from what any
    non-Gaussian ("manifold") structure adds, and its intrinsic dimension is that of a full Gaussian.

    Args:
        clouds: (head, point, d)
    Returns:
        (head, point, d)
    """
    x = _array(clouds)
    n_points = x.shape[1]
    mean = x.mean(axis=1, keepdims=True)  # (head, 1, d)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)  # covariance = vtᵀ diag(s²/(point−1)) vt
    z = np.random.default_rng(seed).standard_normal((x.shape[0], n_points, s.shape[1]))
    return mean + (z * (s / math.sqrt(n_points - 1))[:, None, :]) @ vt


# --- after W_O: the gauge-invariant comparison ----------------------------------------------------------


def column_space_frames(w_o) -> np.ndarray:
    """Orthonormal basis of the subspace of R^{d_model} each head can write to.

    W_O^{(h)} is (d_head, d_model) as ``extract.head_out_proj`` gives it: c[h] = z[h] W_O^{(h)}, so c[h]
    lies in the span of W_O^{(h)}'s rows (its "column space" as a map into the residual stream).

    Args:
        w_o: (head, d_head, d_model)
    Returns:
        (head, d_model, d_head)
    """
    _, _, vt = np.linalg.svd(_array(w_o), full_matrices=False)  # (head, d_head, d_model)
    return vt.transpose(0, 2, 1)


def c_null_in_column_spaces(
    w_o, k: int, pairs=None, n_draws: int = 200, seed: int = 0, metric: str = "source"
) -> dict:
    """Null of a mean c-frame overlap: a random k-frame inside each head's own W_O column space.

    Frames of c[h] necessarily lie in the d_head-dimensional column space of W_O^{(h)}, so the right
    chance level draws, in each draw, one Haar k-frame inside every head's column space and averages the
    overlap over the same pairs. It conditions on how the column spaces themselves sit: the plain Haar
    null in R^{d_model} is what it would be if they were random, and it is too low when they are more
    aligned than chance (report both; the gap measures W_O's own alignment). Pairs sharing a head are
    correlated here, so the draws keep the real head structure.

    Args:
        w_o: (head, d_head, d_model)
        pairs: (pair, 2) head indices, all pairs when None
    Returns:
        {"mean", "std": mean and std (ddof 1) of the draws, "draws": (draw,)}
    """
    basis = column_space_frames(w_o)  # (head, d_model, d_head)
    n_heads, _, d_head = basis.shape
    pairs = pair_groups(np.arange(n_heads))["all"] if pairs is None else np.asarray(pairs).reshape(-1, 2)
    rng = np.random.default_rng(seed)
    draws = np.empty(n_draws)
    for t in range(n_draws):
        b = basis @ haar_frames(n_heads, d_head, k, rng)  # (head, d_model, k)
        draws[t] = pair_overlaps(b, pairs, metric).mean()
    return {"mean": float(draws.mean()), "std": float(draws.std(ddof=1)), "draws": draws}


# --- one layer -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: the matrix field is an array
class OverlapResult:
    """O_h of one layer beside its nulls; ``pairs`` names the pair set of the headline ``o_h``."""

    o_h: float  # headline: inter-group mean, or all pairs when there are no inter pairs (MQA)
    ci: tuple[float, float]
    pairs: str  # "inter" (GQA, and MHA where every pair is inter) or "intra-only" (MQA)
    n_pairs: int
    inter: float | None
    inter_ci: tuple[float, float] | None
    n_inter: int
    intra: float | None  # None under MHA
    intra_ci: tuple[float, float] | None
    n_intra: int
    all_pairs: float
    null_mean: float  # Haar k-frames in R^d over n_pairs pairs
    null_std: float
    null_analytic: float
    delta: float  # o_h − null_mean
    z: float  # delta / null_std
    d: int
    k: int
    n_points: int
    metric: str
    matrix: np.ndarray  # (head, head) overlap matrix
    colspace_null_mean: float | None = None  # c clouds only: frames inside each head's W_O column space
    colspace_null_std: float | None = None
    colspace_z: float | None = None

    def summary(self) -> dict:
        """Every field but the matrix, as JSON-ready Python values."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "matrix"}
        return {f: list(v) if isinstance(v, tuple) else v for f, v in out.items()}


def _mean_ci(values: np.ndarray, n_boot: int, seed: int):
    if values.size == 0:
        return None, None
    return float(values.mean()), bootstrap_ci(values, n_boot, seed=seed)


def check_rank(k, d: int, n_points: int | None = None) -> int:
    """The one rule for a frame rank k that an overlap can be read from: an integer, 1 <= k < d (and k < point).

    A frame of rank d spans the whole space, so every pair of them overlaps exactly 1 and so does every
    Haar frame: the overlap and its null say nothing (the z-score is then noise over a null std of ~0).
    The CLI (``measure.overlap_report``), the chapters (through ``layer_overlap`` and ``overlap_sweep``)
    and the chapters' parameter pre-check all call this.

    Args:
        k: frame rank
        d: the clouds' dimension (d_head for ε and z, d_model for c)
        n_points: points per cloud, when known (a centred cloud of N points spans at most N − 1 directions)
    Returns:
        k as an int
    Raises:
        ValueError: k not an integer, k < 1, k >= d or k >= n_points
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k = {k!r} must be an integer frame rank")
    limit = d if n_points is None else min(d, n_points)
    if not 1 <= k < limit:
        points = "" if n_points is None else f" and the n_points = {n_points}"
        raise ValueError(f"k = {k} must satisfy 1 <= k < d = {d}{points} (a frame of rank d spans the whole "
                         f"space: every overlap is 1); choose k below {limit}")
    return int(k)


def frame_rank(d_int: float, d: int) -> int:
    """The source work's per-model frame rank: a mean intrinsic dimension rounded, kept inside 1 <= k < d.

    Args:
        d_int: mean intrinsic dimension over heads
        d: the clouds' dimension
    Returns:
        round(d_int) (half to even, as Python rounds) clipped to [1, d − 1]
    """
    if not math.isfinite(d_int):
        raise ValueError(f"d_int = {d_int} must be finite to give a frame rank")
    return int(min(max(round(float(d_int)), 1), d - 1))


def layer_overlap(
    clouds,
    kv_group,
    k: int,
    metric: str = "source",
    n_boot: int = 2000,
    seed: int = 0,
    null_draws: int = 500,
    w_o=None,
) -> OverlapResult:
    """O_h of one layer with its inter/intra split, bootstrap CIs, Haar null, difference and z-score.

    Args:
        clouds: (head, point, d) — ε or z (d = d_head) or c (d = d_model)
        kv_group: (head,) KV head of each query head (arange(head) under MHA)
        k: frame rank, 1 <= k < d (``check_rank``)
        w_o: (head, d_head, d_model), only for c clouds: adds the null inside the W_O column spaces
    Returns:
        OverlapResult; under MQA (no inter pairs) the headline is over all pairs, ``pairs="intra-only"``
    Raises:
        ValueError: k outside 1 <= k < d, fewer than two heads
    """
    x = _array(clouds)
    _, n_points, d = x.shape
    check_rank(k, d, n_points)
    return _frames_overlap(frames(x, k), n_points, kv_group, metric, n_boot, seed, null_draws, w_o)


def overlap_sweep(
    clouds,
    kv_group,
    ks,
    metric: str = "source",
    n_boot: int = 2000,
    seed: int = 0,
    null_draws: int = 500,
    w_o=None,
) -> dict[int, OverlapResult]:
    """``layer_overlap`` at every rank in ``ks`` from one SVD per head.

    The top-k frame is the first k columns of the top-max(ks) frame (the same right singular vectors), so
    each result equals ``layer_overlap(clouds, kv_group, k, ...)`` exactly: the same pairs, bootstrap and
    nulls go through the same code path (``tests/test_geometry.py`` holds them equal).

    Args:
        clouds: (head, point, d)
        kv_group: (head,)
        ks: frame ranks, each 1 <= k < d (``check_rank``)
        w_o: (head, d_head, d_model), only for c clouds
    Returns:
        {k: OverlapResult} in increasing k
    Raises:
        ValueError: no rank, or a rank outside 1 <= k < d
    """
    x = _array(clouds)
    _, n_points, d = x.shape
    ks = sorted({check_rank(k, d, n_points) for k in ks})
    if not ks:
        raise ValueError("overlap_sweep needs at least one frame rank k")
    b = frames(x, ks[-1])  # (head, d, k_max)
    return {k: _frames_overlap(b[..., :k], n_points, kv_group, metric, n_boot, seed, null_draws, w_o) for k in ks}


def _frames_overlap(b, n_points, kv_group, metric, n_boot, seed, null_draws, w_o) -> OverlapResult:
    """``layer_overlap`` from the heads' frames b (head, d, k)."""
    _, d, k = b.shape
    matrix = overlap_matrix(b, metric)
    groups = pair_groups(kv_group)
    if len(groups["all"]) == 0:
        raise ValueError("layer_overlap needs at least two heads")
    val = {name: matrix[p[:, 0], p[:, 1]] for name, p in groups.items()}
    inter, inter_ci = _mean_ci(val["inter"], n_boot, seed)
    intra, intra_ci = _mean_ci(val["intra"], n_boot, seed)
    label = "inter" if inter is not None else "intra-only"
    head = groups["inter"] if inter is not None else groups["all"]
    o_h, ci = (inter, inter_ci) if inter is not None else _mean_ci(val["all"], n_boot, seed)
    null = haar_null(d, k, len(head), null_draws, seed, metric)
    col = {}
    if w_o is not None:
        c_null = c_null_in_column_spaces(w_o, k, head, max(50, null_draws // 4), seed, metric)
        col = dict(
            colspace_null_mean=c_null["mean"],
            colspace_null_std=c_null["std"],
            colspace_z=(o_h - c_null["mean"]) / c_null["std"],
        )
    return OverlapResult(
        o_h=o_h, ci=ci, pairs=label, n_pairs=len(head),
        inter=inter, inter_ci=inter_ci, n_inter=len(groups["inter"]),
        intra=intra, intra_ci=intra_ci, n_intra=len(groups["intra"]),
        all_pairs=float(val["all"].mean()),
        null_mean=null["mean"], null_std=null["std"], null_analytic=null["analytic"],
        delta=o_h - null["mean"], z=(o_h - null["mean"]) / null["std"],
        d=d, k=k, n_points=n_points, metric=metric, matrix=matrix, **col,
    )


# --- per head ------------------------------------------------------------------------------------------


def head_mean_overlap(matrix, kv_group) -> np.ndarray:
    """Each head's mean overlap with the heads of other KV groups (with all other heads under MQA).

    Args:
        matrix: (head, head) overlap matrix (``overlap_matrix``, ``OverlapResult.matrix``)
        kv_group: (head,) KV head of each query head
    Returns:
        (head,); under MQA (a single KV head, no inter-group pair) the mean over every other head
    Raises:
        ValueError: matrix not square, kv_group of another length, or fewer than two heads
    """
    m = _array(matrix)
    g = np.asarray(kv_group).ravel()
    if m.ndim != 2 or m.shape[0] != m.shape[1] or len(g) != len(m) or len(g) < 2:
        raise ValueError(f"head_mean_overlap needs a (head, head) matrix with head >= 2 and one KV group per "
                         f"head; got matrix {m.shape} and {len(g)} groups")
    partner = g[:, None] != g[None, :]  # (head, head): pairs across KV groups
    if not partner.any():  # MQA: a single KV head, no inter-group pair exists
        partner = ~np.eye(len(g), dtype=bool)
    return (m * partner).sum(1) / partner.sum(1)


def haar_head_overlaps(kv_group, d: int, k: int, n_layers: int, n_draws: int, seed: int = 0) -> np.ndarray:
    """``head_mean_overlap`` of Haar-random frames in place of the heads' own, over layers and draws.

    The null of a per-head statistic (its correlation with d_int, say): every head of each of ``n_layers``
    layers gets an independent Haar k-frame in R^d in every draw. One Generator seeded with ``seed`` draws
    the layers of draw 0 first, then those of draw 1, and so on.

    Args:
        kv_group: (head,) KV head of each query head (the same in every layer)
        d, k: frame dimension and rank, 1 <= k < d
        n_layers: layers per draw
        n_draws: draws
    Returns:
        (draw, layer * head), layer-major within a draw (as ``np.repeat(layers, head)`` labels it)
    """
    check_rank(k, d)
    g = np.asarray(kv_group).ravel()
    rng = np.random.default_rng(seed)

    def one_layer() -> np.ndarray:  # (head,)
        return head_mean_overlap(overlap_matrix(haar_frames(len(g), d, k, rng)), g)

    return np.array([np.concatenate([one_layer() for _ in range(n_layers)]) for _ in range(n_draws)])
