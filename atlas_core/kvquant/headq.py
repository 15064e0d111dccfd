"""HeadQ (a reconstruction from the paper's abstract): a low-rank side code in a query basis.

Per KV head, calibration queries of every query head of its group give Σ_q = E[q qᵀ] (post-RoPE queries,
the coordinates the cache holds keys in); U_r holds its top-r eigenvectors. Each cached key stores,
besides its quantized code k̂_j, a side code c_j = Q_b′(U_rᵀ(k_j − k̂_j)) ∈ R^r (per-token asymmetric
min–max over its r entries, fp16 scale and zero). The corrected logit is

    (q·k̂_j + (U_rᵀq)·ĉ_j)/√d  =  q·(k̂_j + U_r ĉ_j)/√d,

so the cache applies the correction to the keys it returns (k̃_j = k̂_j + U_r ĉ_j): identical logits,
values untouched. Bits per key element = b + 32/g + (r·b′ + 32)/d.

Controls: ``sign=-1`` (wrong-sign correction k̂ − U_r ĉ), a random orthonormal basis of rank r, a key-PCA
basis (top-r eigenvectors of the calibration *key error* covariance E[(k − k̂)(k − k̂)ᵀ] under the same
base quantizer: the best rank-r basis in storage space), and a null-space perturbation (large key error
along the directions of Σ_q's smallest eigenvalues).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atlas_core.extract import extract
from atlas_core.kvquant.quant import OVERHEAD_BITS, QTensor, QuantSpec, check_bits, dequantize, quantize
from atlas_core.models import LoadedModel

BASES = ("query", "random", "key-pca")


@dataclass(frozen=True, kw_only=True)
class SideCode:
    """Side-code settings and the per-layer bases, {layer: (kv_head, d_head, r)}."""

    bases: dict
    bits: int = 4  # b′, 1..8 (``quant.check_bits``)
    sign: float = 1.0  # -1.0: the wrong-sign control

    def __post_init__(self):
        check_bits(self.bits, "side-code bits")
        if self.sign not in (1.0, -1.0):
            raise ValueError(f"sign must be 1.0 or -1.0 (the wrong-sign control), got {self.sign!r}")

    @property
    def rank(self) -> int:
        return next(iter(self.bases.values())).shape[-1]

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group=self.rank, axis="token")

    def bits_per_element(self, d_head: int) -> float:
        return (self.rank * self.bits + 2 * OVERHEAD_BITS) / d_head


def encode_side(k: torch.Tensor, k_hat: torch.Tensor, basis: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Side codes of keys (batch, kv_head, key, d_head) in basis (kv_head, d_head, r): Q(U_rᵀ(k − k̂))."""
    coef = torch.einsum("bhtd,hdr->bhtr", k - k_hat, basis)  # (batch, kv_head, key, r)
    return quantize(coef, spec)


def apply_side(k_hat: torch.Tensor, side: QTensor, basis: torch.Tensor, spec: QuantSpec, sign: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """k̃ = k̂ + sign · U_r ĉ, (batch, kv_head, key, d_head); ``inplace`` overwrites a contiguous k̂."""
    b, h, t, d = k_hat.shape
    coef = dequantize(side, spec, k_hat.dtype).reshape(b * h, t, -1)  # (batch·kv_head, key, r)
    basis_t = basis.to(k_hat.dtype).transpose(-1, -2).expand(b, h, -1, -1).reshape(b * h, -1, d)  # (b·h, r, d)
    # one fused k̂ + sign · ĉ U_rᵀ per (batch, head): a decode step runs this over the whole history, and
    # in place it skips allocating a history-sized tensor (≈3× faster on CPU)
    if inplace:
        return k_hat.view(b * h, t, d).baddbmm_(coef, basis_t, alpha=sign).view(b, h, t, d)
    return torch.baddbmm(k_hat.reshape(b * h, t, d), coef, basis_t, alpha=sign).view(b, h, t, d)


def headq_keys(k: torch.Tensor, key_spec: QuantSpec, side: SideCode, basis: torch.Tensor) -> torch.Tensor:
    """Quantize then correct keys (batch, kv_head, key, d_head) in one go (for offline metrics)."""
    k_hat = dequantize(quantize(k, key_spec), key_spec)
    codes = encode_side(k, k_hat, basis, side.spec())
    return apply_side(k_hat, codes, basis, side.spec(), side.sign)


# ----------------------------------------------------------------------------------------------------------------
# Calibration.


def query_covariance(q: torch.Tensor, kv_group: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Σ_q per KV head from q (head, point, d_head) and kv_group (head,) -> (kv_head, d_head, d_head)."""
    d = q.shape[-1]
    sigma = torch.zeros(n_kv, d, d, dtype=torch.float64)
    for h in range(n_kv):
        qs = q[kv_group == h].reshape(-1, d).double()  # (group heads * point, d_head)
        sigma[h] = qs.T @ qs / len(qs)
    return sigma


def top_eigenvectors(sigma: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors of symmetric (..., d, d) -> (..., d, r), largest first, fp32."""
    _, vecs = torch.linalg.eigh(sigma)  # ascending
    return vecs[..., -r:].flip(-1).float()


def random_basis(n_kv: int, d: int, r: int, seed: int) -> torch.Tensor:
    """Random orthonormal (kv_head, d_head, r) bases (QR of a Gaussian)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_kv, d, r, generator=gen, dtype=torch.float64))
    return q.float()


def key_error_covariance(k: torch.Tensor, key_spec: QuantSpec, seq_len: int) -> torch.Tensor:
    """E[(k − k̂)(k − k̂)ᵀ] per KV head from k (kv_head, point, d_head) in blocks of ``seq_len`` points."""
    n_kv, n, d = k.shape
    usable = n // seq_len * seq_len
    blocks = k[:, :usable].reshape(n_kv, -1, seq_len, d)  # (kv_head, block, token, d_head)
    if key_spec.axis == "channel":
        blocks = blocks[:, :, : seq_len // key_spec.group * key_spec.group]
    err = (dequantize(quantize(blocks, key_spec), key_spec) - blocks).reshape(n_kv, -1, d).double()
    return err.transpose(1, 2) @ err / err.shape[1]


@torch.no_grad()
def query_covariances(lm: LoadedModel, blocks: torch.Tensor) -> dict[int, torch.Tensor]:
    """Σ_q of every layer, {layer: (kv_head, d_head, d_head)}, from calibration blocks (block, token)."""
    acts = extract(lm, blocks, list(range(lm.spec.n_layers)), fields=("q",), progress=False)
    return {layer: query_covariance(a.q, a.kv_group, lm.spec.n_kv_heads) for layer, a in acts.items()}


@torch.no_grad()
def calibrate(
    lm: LoadedModel,
    blocks: torch.Tensor,
    rank: int,
    basis: str = "query",
    key_spec: QuantSpec | None = None,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Per-layer bases {layer: (kv_head, d_head, rank)} from calibration blocks (the "calib" split).

    Args:
        blocks: (block, token) calibration token ids; never the evaluation split.
        basis: "query" (HeadQ: top eigenvectors of Σ_q), "random" (seeded), or "key-pca" (top
            eigenvectors of the key-error covariance under ``key_spec``).
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    spec = lm.spec
    if basis == "random":
        return {l: random_basis(spec.n_kv_heads, spec.d_head, rank, seed + l) for l in range(spec.n_layers)}
    if basis == "query":
        return {l: top_eigenvectors(sigma, rank) for l, sigma in query_covariances(lm, blocks).items()}
    acts = extract(lm, blocks, list(range(spec.n_layers)), fields=("k",), progress=False)
    return {l: top_eigenvectors(key_error_covariance(a.k, key_spec, blocks.shape[1]), rank) for l, a in acts.items()}


def null_space_perturbation(k: torch.Tensor, sigma: torch.Tensor, n_dirs: int, size: float, seed: int) -> torch.Tensor:
    """Add Gaussian error of std ``size`` to keys (kv_head, key, d_head) along Σ_q's ``n_dirs`` weakest directions."""
    _, vecs = torch.linalg.eigh(sigma)  # (kv_head, d, d), ascending eigenvalues
    weak = vecs[..., :n_dirs].float()  # (kv_head, d_head, n_dirs)
    gen = torch.Generator().manual_seed(seed)
    noise = size * torch.randn(*k.shape[:-1], n_dirs, generator=gen)  # (kv_head, key, n_dirs)
    return k + torch.einsum("hkn,hdn->hkd", noise, weak)
