"""The source work's hard top-1 attention experiment, and a rank-k linear reconstruction of what it loses.

In the chosen layers each head's output z[h,t] = Σ_j p[h,t,j] v[g,j] is replaced by the value of its
most attended key, v[g, argmax_j p[h,t,j]] (g the head's KV group), and perplexity is measured. The part
thrown away is the source's residual ε = z − v[argmax p] (SPEC §4). A rank-k reconstruction puts back
its projection on a per-head affine subspace fitted on a calibration split:

    z_hat = v[argmax p] + μ_h + B_h B_hᵀ (ε − μ_h),

with μ_h (d_head,) and B_h (d_head, k) the mean and top-k PCA frame (SPEC §5) of head h's ε over the
calibration blocks of the unmodified model. At k = d_head, B_h B_hᵀ is the identity and z_hat = z.
Recovered fraction = (PPL_top1 − PPL_recon) / (PPL_top1 − PPL_full). The control replaces B_h by a
Haar-random orthonormal k-frame (same μ_h): how much a rank-k subspace recovers by chance.

The model runs its own code: the registered attention function ``atlas_top1`` calls the model's own
``eager_attention_forward`` and only edits the output of the marked modules.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from atlas_core import interval
from atlas_core.eval import block_nll
from atlas_core.attention import eager_of, intervene, register, state_of, top1_values
from atlas_core.extract import extract
from atlas_core.geometry import frames
from atlas_core.models import LoadedModel

__all__ = [
    "TOP1",
    "Reconstruction",
    "fit_reconstruction",
    "hard_top1",
    "random_reconstruction",
    "top1_experiment",
    "top1_output",
]

TOP1 = "atlas_top1"  # a marked attention module's state inside ``hard_top1``: a _Marked


@dataclass(frozen=True)
class _Marked:
    """A layer run with hard top-1: its ε reconstruction, or None for bare top-1."""

    reconstruction: "Reconstruction | None"


@dataclass(frozen=True)
class Reconstruction:
    """One layer's affine rank-k model of ε: per-head mean and orthonormal frame (fp32)."""

    mean: torch.Tensor  # (head, d_head)
    basis: torch.Tensor  # (head, d_head, k), orthonormal columns

    @property
    def k(self) -> int:
        return self.basis.shape[-1]

    def __post_init__(self):
        if self.mean.dim() != 2:
            raise ValueError(f"mean must be (head, d_head), got {tuple(self.mean.shape)}")
        h, d = self.mean.shape
        if self.basis.dim() != 3 or self.basis.shape[:2] != (h, d):
            raise ValueError(f"basis must be (head, d_head, k) = ({h}, {d}, k), got {tuple(self.basis.shape)}")


def top1_output(value: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Hard top-1 attention output: v[g(h), argmax_j p[h,t,j]] (reference and fast path at once).

    Args:
        value: (batch, kv_head, key, d_head)
        probs: (batch, head, query, key), the model's own attention probabilities
    Returns:
        (batch, query, head, d_head), the layout of eager attention's output
    """
    return top1_values(value, probs).transpose(1, 2)


def _reconstruct(out: torch.Tensor, v_top: torch.Tensor, rec: Reconstruction) -> torch.Tensor:
    """v_top + μ + B Bᵀ (ε − μ) with ε = out − v_top; all (batch, query, head, d_head)."""
    mean = rec.mean.to(out)  # (head, d_head)
    basis = rec.basis.to(out)  # (head, d_head, k)
    centred = out - v_top - mean
    coef = torch.einsum("bthd,hdk->bthk", centred, basis)
    return v_top + mean + torch.einsum("bthk,hdk->bthd", coef, basis)


def top1_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Attention function ``atlas_top1``: hard top-1 in marked modules, plain attention elsewhere.

    A marked module runs the model's own eager attention, whose probabilities pick the argmax key. The
    other layers need no probabilities and run transformers' SDPA attention on the same (additive) mask,
    which gives the same output to fp32 rounding at a fraction of eager's cost (``tests/test_top1.py``
    holds a model with only identity-reconstructed layers marked to the unmodified model).
    """
    mark = state_of(module, TOP1, required=False)
    if mark is None and kwargs.get("softcap") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, probs = eager_of(module)(module, query, key, value, attention_mask, **kwargs)
    if mark is not None:
        rec = mark.reconstruction
        v_top = top1_output(value, probs)
        out = (v_top if rec is None else _reconstruct(out, v_top, rec)).contiguous()
    return out, probs


register(TOP1, top1_attention_forward, owner="atlas_core.top1.hard_top1(lm, layers)")


def _layers(lm: LoadedModel, layers) -> list[int]:
    """Sorted distinct layer indices in 0..n-1 (negative counts from the end), or a clear error."""
    n = lm.spec.n_layers
    layers = [int(l) for l in layers]
    bad = [l for l in layers if not -n <= l < n]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} do not exist; the model has layers 0..{n - 1} (or -{n}..-1)")
    return sorted({l % n for l in layers})


def _check_k(lm: LoadedModel, k: int) -> None:
    d = lm.spec.d_head
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an integer with 1 <= k <= d_head = {d}, got {k!r}")


@contextlib.contextmanager
def hard_top1(lm: LoadedModel, layers, reconstruction: dict[int, Reconstruction] | None = None):
    """Run the model with hard top-1 attention in ``layers`` (plus a reconstruction of ε, if given).

    Args:
        lm: a loaded model.
        layers: layer indices (negative counts from the end).
        reconstruction: {layer: Reconstruction} covering every layer, or None for bare top-1.
    Restores the previous attention implementation and removes the marks on exit, also on error.
    """
    layers = _layers(lm, layers)
    s = lm.spec
    if reconstruction is not None:
        rec_layers = {l % s.n_layers for l in reconstruction}
        missing = [l for l in layers if l not in rec_layers]
        if missing:
            raise ValueError(f"the reconstruction has no entry for layers {missing}")
        reconstruction = {l % s.n_layers: r for l, r in reconstruction.items()}
        for l in layers:
            if reconstruction[l].mean.shape != (s.n_heads, s.d_head):
                raise ValueError(f"layer {l}: reconstruction mean is {tuple(reconstruction[l].mean.shape)}, "
                                 f"the model needs (head, d_head) = ({s.n_heads}, {s.d_head})")
    marks = {l: _Marked(None if reconstruction is None else reconstruction[l]) for l in layers}
    with intervene(lm.model, TOP1, marks):
        yield


def fit_reconstruction(
    lm: LoadedModel, calib_blocks: torch.Tensor, layers, k: int, batch_size: int = 4, progress: bool = False
) -> dict[int, Reconstruction]:
    """Mean and top-k PCA frame of every head's ε on calibration blocks of the unmodified model.

    Args:
        lm: a loaded model.
        calib_blocks: (block, token) token ids, never the evaluation blocks.
        layers: layer indices (negative counts from the end).
        k: frame rank, 1 <= k <= d_head (and below the number of calibration points).
    Returns:
        {layer: Reconstruction}, layers in 0..n-1.
    """
    layers = _layers(lm, layers)
    _check_k(lm, k)
    acts = extract(lm, calib_blocks, layers, fields=("eps",), batch_size=batch_size, progress=progress)
    out = {}
    for l in layers:
        eps = acts[l].eps.double()  # (head, point, d_head)
        basis = torch.from_numpy(frames(eps, k)).float()  # (head, d_head, k)
        out[l] = Reconstruction(mean=eps.mean(dim=1).float(), basis=basis)
    return out


def random_reconstruction(rec: dict[int, Reconstruction], seed: int = 0) -> dict[int, Reconstruction]:
    """The control: the same means, with Haar-random orthonormal k-frames in place of the PCA frames.

    Args:
        rec: {layer: Reconstruction}.
        seed: the random frames are a deterministic function of it.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for l in sorted(rec):
        h, d, k = rec[l].basis.shape
        g = torch.randn(h, d, k, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # exactly Haar
        out[l] = Reconstruction(mean=rec[l].mean.clone(), basis=q.float())
    return out


def top1_experiment(
    lm: LoadedModel,
    eval_blocks: torch.Tensor,
    calib_blocks: torch.Tensor,
    layers,
    k: int = 7,
    random_basis: bool = True,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = False,
    full_nll: torch.Tensor | None = None,
    boot: interval.Bootstrap = interval.DEFAULT,
    reconstruction: dict[int, Reconstruction] | None = None,
) -> dict:
    """Perplexity with full attention, hard top-1 in ``layers``, and top-1 plus the rank-k reconstruction.

    Every figure carries its 95% interval from the paired block bootstrap (:mod:`atlas_core.interval`):
    the settings are scored on the same evaluation blocks and resampled together.

    Args:
        lm: a loaded model.
        eval_blocks: (block, token) evaluation token ids.
        calib_blocks: (block, token) calibration token ids (a different split from ``eval_blocks``).
        layers: layer indices (negative counts from the end).
        k: reconstruction rank, 1 <= k <= d_head.
        random_basis: also run the random-frame control (``ppl_random``, ``recovered_random``).
        seed: seed of the random frames.
        full_nll: (block, token - 1) NLL of ``eval_blocks`` with full attention when already measured
            (``eval.block_nll``), so that several layer settings share one full pass.
        boot: bootstrap settings of the intervals.
        reconstruction: ``fit_reconstruction(lm, calib_blocks, ..., k)`` when already fitted for these
            layers or more (the fit of a layer does not depend on the other layers), so that settings that
            share layers share one calibration pass.
    Returns:
        {"layers", "k", "ppl_full", "ppl_top1", "ppl_recon", "delta_top1", "rel_top1", "recovered",
         ["ppl_random", "recovered_random", "gain", "seed"], "intervals"}; "intervals" maps each figure
        to ``Estimate.as_dict()`` (value, lo, hi, units). rel_top1 = PPL_top1/PPL_full − 1; gain =
        recovered − recovered_random; recovered fractions are NaN when top-1 does no damage.
    Raises:
        ValueError: ``full_nll`` does not have the shape of ``eval_blocks``' predicted tokens, or
            ``reconstruction`` lacks a layer or has another rank.
    """
    layers = _layers(lm, layers)
    _check_k(lm, k)
    expected = (eval_blocks.shape[0], eval_blocks.shape[1] - 1)
    if full_nll is not None and tuple(full_nll.shape) != expected:
        raise ValueError(f"full_nll must be the (block, token - 1) = {expected} NLL of eval_blocks, "
                         f"got {tuple(full_nll.shape)}")
    if reconstruction is None:
        rec = fit_reconstruction(lm, calib_blocks, layers, k, batch_size, progress)
    else:
        found = {l % lm.spec.n_layers: r for l, r in reconstruction.items()}
        if any(l not in found or found[l].k != k for l in layers):
            raise ValueError(f"reconstruction must hold rank-{k} fits of layers {layers}, "
                             f"got ranks {({l: r.k for l, r in found.items()})}")
        rec = {l: found[l] for l in layers}

    def nll() -> torch.Tensor:  # (block, token - 1); hard top-1 runs eager, full attention SDPA
        return block_nll(lm.model, eval_blocks, batch_size, progress)

    nlls = {"full": nll() if full_nll is None else full_nll}
    with hard_top1(lm, layers):
        nlls["top1"] = nll()
    with hard_top1(lm, layers, rec):
        nlls["recon"] = nll()
    if random_basis:
        with hard_top1(lm, layers, random_reconstruction(rec, seed)):
            nlls["random"] = nll()
    est = {f"ppl_{name}": interval.perplexity(v, boot) for name, v in nlls.items()}
    est["delta_top1"] = interval.ppl_difference(nlls["top1"], nlls["full"], boot)
    ratio = interval.ppl_ratio(nlls["top1"], nlls["full"], boot)
    est["rel_top1"] = interval.Estimate(ratio.value - 1, ratio.lo - 1, ratio.hi - 1, ratio.units)
    est["recovered"] = interval.excess_removed(nlls["top1"], nlls["recon"], nlls["full"], boot)
    if random_basis:
        est["recovered_random"] = interval.excess_removed(nlls["top1"], nlls["random"], nlls["full"], boot)
        est["gain"] = interval.excess_removed_difference(nlls["top1"], nlls["recon"], nlls["random"], nlls["full"], boot)
    result = {"layers": layers, "k": k, **{name: e.value for name, e in est.items()}}
    if random_basis:
        result["seed"] = seed
    result["intervals"] = {name: e.as_dict() for name, e in est.items()}
    return result
