"""Rotate-then-quantize (SPEC §8): Ŵ = Q(W U) Uᵀ for an orthogonal U (in, in).

Bases: the identity (plain RTN), an eigenbasis (of the activation Fisher or of H), a Haar-random
rotation, and a randomized Hadamard transform. Hadamard matrices exist for powers of two; a layer whose
width is not one (576 = 9·64 in smollm2) gets a block-diagonal transform of the largest power-of-two
block dividing it, with random signs and a random permutation of the columns, still orthogonal.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn

__all__ = ["eigenbasis", "eigh_descending", "haar", "hadamard", "lambda_scaled_quantize", "randomized_hadamard", "rotate_quantize"]


def rotate_quantize(w: torch.Tensor, u: torch.Tensor, spec: WQuantSpec) -> torch.Tensor:
    """Q(W U) Uᵀ. w: (out, in); u: (in, in) orthogonal. Returns (out, in) fp32."""
    u = u.double()
    return (quantize_rtn((w.double() @ u).float(), spec).double() @ u.T).float()


def eigh_descending(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (in,) and eigenvectors (in, in, as columns) of a symmetric matrix, by decreasing eigenvalue."""
    vals, vecs = torch.linalg.eigh(cov.double())
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def eigenbasis(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric matrix (in, in), by decreasing eigenvalue, as columns."""
    return eigh_descending(cov)[1]


def haar(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) fp64 matrix (QR of a Gaussian with the sign fix).

    A function of (n, seed) only, so it is drawn once per pair and copied on later calls (every layer of one
    width, at every bit width, uses the same one: 210 QRs per model and run otherwise).
    """
    return _haar(n, seed).clone()


@lru_cache(maxsize=16)
def _haar(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), scaled to be orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def randomized_hadamard(n: int, seed: int) -> torch.Tensor:
    """Orthogonal (n, n): random signs, a random permutation, block-diagonal Hadamard of the largest 2^m | n."""
    gen = torch.Generator().manual_seed(seed)
    block = n & -n  # largest power of two dividing n
    h = torch.block_diag(*[hadamard(block)] * (n // block))
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    perm = torch.randperm(n, generator=gen)
    return (signs[:, None] * h)[perm]


def lambda_scaled_quantize(w: torch.Tensor, cov: torch.Tensor, spec: WQuantSpec, power: float = 0.5,
                           eigh: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The source's "Fisher with λ-scaled grid", as we read it (its code is not public).

    In the eigenbasis U of ``cov`` (eigenvalues λ), coordinate j is scaled by s_j ∝ λ_j^power before
    rounding and unscaled after, so directions of high curvature get a finer grid:
    Ŵ = [Q(W U diag(s)) diag(s)⁻¹] Uᵀ, with s normalised to geometric mean 1.

    Args:
        w: (out, in); cov: (in, in) symmetric PSD (the activation Fisher).
        eigh: its (eigenvalues, eigenvectors) by decreasing eigenvalue, when already computed.
    """
    lam, u = eigh if eigh is not None else eigh_descending(cov)
    lam = lam.clamp_min(0)
    s = (lam + 1e-12 * lam.max().clamp_min(1e-30)) ** power
    s = s / s.log().mean().exp()
    rotated = w.double() @ u * s
    return ((quantize_rtn(rotated.float(), spec).double() / s) @ u.T).float()
