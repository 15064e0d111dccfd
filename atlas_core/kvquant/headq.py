"""HeadQ (a reconstruction from the paper's abstract): a low-rank side code in a query basis.

Per KV head, calibration queries of every query head of its group give Σ_q = E[q qᵀ] (post-RoPE queries,
the coordinates the cache holds keys in); U_r holds its top-r eigenvectors. Each cached key stores,
besides its quantized code k̂_j, a side code c_j = Q_b′(U_rᵀ(k_j − k̂_j)) ∈ R^r (per-token asymmetric
min–max over its r entries, fp16 scale and zero). The corrected logit is

    (q·k̂_j + (U_rᵀq)·ĉ_j)/√d  =  q·(k̂_j + U_r ĉ_j)/√d,

so the cache applies the correction to the keys it returns (k̃_j = k̂_j + U_r ĉ_j): identical logits,
values untouched. Bits per key element = b + 32/g + (r·b′ + 32)/d.

Whitened basis (``basis="whitened"``): the score-space error the side code should minimise is
E[(q·(k̃ − k))²] = tr(Σ_q Σ_e), Σ_e the residual key-error covariance. With δ = k − k̂ and Σ_δ its
calibration covariance under the same base quantizer, the best rank-r linear correction k̃ = k̂ + D Eᵀδ in
that metric is Eckart–Young in whitened coordinates δ′ = Σ_q^½ δ: V_r = top-r eigenvectors of
Σ_q^½ Σ_δ Σ_q^½, encoder E = Σ_q^½ V_r, decoder D = Σ_q^{-½} V_r (EᵀD = I_r; the residual weighted error is
the sum of the d − r smallest eigenvalues). Σ_q's eigenvalues are floored at ``FLOOR`` × its largest before
the inverse root (directions queries never read need no correction anyway: their weight is ~0). The side
code stores r codes per key as the query basis does, so the bits are the same; it decodes with D instead
of the encoder. Source: weighted PCA / reduced-rank regression (Eckart & Young 1936 in the Σ_q metric;
Izenman 1975); related: SQuat (2025) keeps the key error orthogonal to a query subspace.

Controls: ``sign=-1`` (wrong-sign correction k̂ − U_r ĉ), a random orthonormal basis of rank r, a key-PCA
basis (top-r eigenvectors of the calibration *key error* covariance E[(k − k̂)(k − k̂)ᵀ] under the same
base quantizer: the best rank-r basis in storage space), and a null-space perturbation (large key error
along the directions of Σ_q's smallest eigenvalues).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atlas_core.extract import extract
from atlas_core.kvquant import rope
from atlas_core.kvquant.quant import OVERHEAD_BITS, QTensor, QuantSpec, check_bits, dequantize, quantize
from atlas_core.models import LoadedModel

BASES = ("query", "random", "key-pca", "whitened")  # "whitened" has a decoder apart from its encoder
FLOOR = 1e-6  # Σ_q's eigenvalues floored at FLOOR × the largest before Σ_q^{-½} (whitened basis)


@dataclass(frozen=True, kw_only=True)
class SideCode:
    """Side-code settings and the per-layer encoders, {layer: (kv_head, d_head, r)}, and decoders.

    ``decoders`` None: each basis is orthonormal and decodes itself (k̃ = k̂ + U_r ĉ); otherwise
    {layer: (kv_head, d_head, r)} with the bases' layers and shapes (the whitened basis: k̃ = k̂ + D ĉ).
    Raises ValueError for bits outside 1..8, a sign other than ±1, or decoders that do not match the bases.
    """

    bases: dict
    bits: int = 4  # b′, 1..8 (``quant.check_bits``)
    sign: float = 1.0  # -1.0: the wrong-sign control
    decoders: dict | None = None  # None: decoder = encoder (orthonormal bases)

    def __post_init__(self):
        check_bits(self.bits, "side-code bits")
        if self.sign not in (1.0, -1.0):
            raise ValueError(f"sign must be 1.0 or -1.0 (the wrong-sign control), got {self.sign!r}")
        if self.decoders is not None and (sorted(self.decoders) != sorted(self.bases) or any(
                self.decoders[l].shape != self.bases[l].shape for l in self.bases)):
            raise ValueError("decoders must have the bases' layers and shapes (kv_head, d_head, r)")

    def decoder(self, layer: int) -> torch.Tensor:
        """The decoder (kv_head, d_head, r) of ``layer``: its basis unless ``decoders`` holds one."""
        return self.bases[layer] if self.decoders is None else self.decoders[layer]

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
    """k̃ = k̂ + sign · D ĉ, (batch, kv_head, key, d_head), D = ``basis`` (kv_head, d_head, r): the decoder
    (``SideCode.decoder``; the encoder U_r itself for orthonormal bases); ``inplace`` overwrites a contiguous k̂."""
    b, h, t, d = k_hat.shape
    coef = dequantize(side, spec, k_hat.dtype).reshape(b * h, t, -1)  # (batch·kv_head, key, r)
    basis_t = basis.to(k_hat.dtype).transpose(-1, -2).expand(b, h, -1, -1).reshape(b * h, -1, d)  # (b·h, r, d)
    # one fused k̂ + sign · ĉ U_rᵀ per (batch, head): a decode step runs this over the whole history, and
    # in place it skips allocating a history-sized tensor (≈3× faster on CPU)
    if inplace:
        return k_hat.view(b * h, t, d).baddbmm_(coef, basis_t, alpha=sign).view(b, h, t, d)
    return torch.baddbmm(k_hat.reshape(b * h, t, d), coef, basis_t, alpha=sign).view(b, h, t, d)


def headq_keys(k: torch.Tensor, key_spec: QuantSpec, side: SideCode, basis: torch.Tensor,
               decoder: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then correct keys (batch, kv_head, key, d_head) in one go (for offline metrics).

    ``basis`` encodes and ``decoder`` (kv_head, d_head, r) decodes; None: the basis decodes itself.
    """
    k_hat = dequantize(quantize(k, key_spec), key_spec)
    codes = encode_side(k, k_hat, basis, side.spec())
    return apply_side(k_hat, codes, basis if decoder is None else decoder, side.spec(), side.sign)


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


def key_error_covariance(k: torch.Tensor, key_spec: QuantSpec, seq_len: int, cos_sin: rope.CosSin | None = None) -> torch.Tensor:
    """E[(k − k̂)(k − k̂)ᵀ] per KV head from post-RoPE k (kv_head, point, d_head) in blocks of ``seq_len`` points.

    ``cos_sin`` (the layer's RoPE tables): k̂ is quantized pre-RoPE as the cache does with ``pre_rope`` (keys
    un-rotated at their positions 0 … seq_len − 1 in the block, quantized, rotated back); the error is
    still post-RoPE, where side codes live.
    """
    n_kv, n, d = k.shape
    usable = n // seq_len * seq_len
    blocks = k[:, :usable].reshape(n_kv, -1, seq_len, d)  # (kv_head, block, token, d_head)
    if key_spec.axis == "channel":
        blocks = blocks[:, :, : seq_len // key_spec.group * key_spec.group]
    if cos_sin is None:
        k_hat = dequantize(quantize(blocks, key_spec), key_spec)
    else:
        cos, sin = (t.to(blocks) for t in cos_sin(torch.arange(blocks.shape[2])))  # (token, rotary dim)
        k_hat = rope.rotate(dequantize(quantize(rope.unrotate(blocks, cos, sin), key_spec), key_spec), cos, sin)
    err = (k_hat - blocks).reshape(n_kv, -1, d).double()
    return err.transpose(1, 2) @ err / err.shape[1]


def whitened_bases(sigma_q: torch.Tensor, sigma_delta: torch.Tensor, r: int, floor: float = FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r linear key-error correction in the Σ_q metric: (encoder E, decoder D), each (..., d, r).

    V_r = top-r eigenvectors of Σ_q^½ Σ_δ Σ_q^½; E = Σ_q^½ V_r, D = Σ_q^{-½} V_r, so EᵀD = I_r and the
    correction D Eᵀδ minimises tr(Σ_q Σ_e) over rank-r linear maps (Eckart & Young 1936 on δ′ = Σ_q^½ δ;
    Izenman 1975). Columns are ordered by the error they remove, so the first r′ < r columns are the
    rank-r′ solution.

    Args:
        sigma_q: (..., d, d) query covariance; its eigenvalues are floored at ``floor`` × the largest
            (per matrix) before the inverse root.
        sigma_delta: (..., d, d) key-error covariance E[δδᵀ] under the base quantizer.
        r: rank, 1..d.
    Returns:
        (E, D), fp32, (..., d, r) each.
    Raises:
        ValueError: r outside 1..d, or a floor outside (0, 1].
    """
    d = sigma_q.shape[-1]
    if not 1 <= r <= d:
        raise ValueError(f"rank must be in 1..{d}, got {r}")
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    lam, w = torch.linalg.eigh(sigma_q.double())  # ascending, (..., d) and (..., d, d)
    lam = lam.clamp(min=floor * lam[..., -1:].clamp(min=torch.finfo(torch.float64).tiny))
    root = (w * lam.sqrt()[..., None, :]) @ w.transpose(-1, -2)  # Σ_q^½
    inv_root = (w * lam.rsqrt()[..., None, :]) @ w.transpose(-1, -2)  # Σ_q^{-½}
    whitened = root @ sigma_delta.double() @ root
    v = torch.linalg.eigh((whitened + whitened.transpose(-1, -2)) / 2)[1][..., -r:].flip(-1)  # (..., d, r), largest first
    return (root @ v).float(), (inv_root @ v).float()


@torch.no_grad()
def key_error_covariances(lm: LoadedModel, blocks: torch.Tensor, key_spec: QuantSpec, pre_rope: bool = False) -> dict[int, torch.Tensor]:
    """Σ_δ of every layer, {layer: (kv_head, d_head, d_head)}: post-RoPE keys of calibration blocks (block,
    token) quantized by ``key_spec`` a block at a time (``key_error_covariance``), pre-RoPE if ``pre_rope``.

    Raises:
        ValueError: ``pre_rope`` on a model without RoPE (``rope.rotary_tables``).
    """
    tables = rope.rotary_tables(lm.model) if pre_rope else [None] * lm.spec.n_layers
    acts = extract(lm, blocks, list(range(lm.spec.n_layers)), fields=("k",), progress=False)
    return {l: key_error_covariance(a.k, key_spec, blocks.shape[1], tables[l]) for l, a in acts.items()}


@torch.no_grad()
def query_covariances(lm: LoadedModel, blocks: torch.Tensor) -> dict[int, torch.Tensor]:
    """Σ_q of every layer, {layer: (kv_head, d_head, d_head)}, from calibration blocks (block, token)."""
    acts = extract(lm, blocks, list(range(lm.spec.n_layers)), fields=("q",), progress=False)
    return {layer: query_covariance(a.q, a.kv_group, lm.spec.n_kv_heads) for layer, a in acts.items()}


@torch.no_grad()
def calibrate_side(
    lm: LoadedModel,
    blocks: torch.Tensor,
    rank: int,
    basis: str = "query",
    key_spec: QuantSpec | None = None,
    seed: int = 0,
    pre_rope: bool = False,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """Per-layer encoders and decoders, ({layer: (kv_head, d_head, rank)}, same or None), from calibration blocks.

    Args:
        blocks: (block, token) calibration token ids; never the evaluation split.
        basis: "query" (HeadQ: top eigenvectors of Σ_q), "random" (seeded), "key-pca" (top eigenvectors of
            the key-error covariance under ``key_spec``), or "whitened" (``whitened_bases`` from Σ_q and the
            key-error covariance under ``key_spec``; the only kind with a decoder apart from its encoder).
        key_spec: the base key quantizer (needed by "key-pca" and "whitened"); ``pre_rope``: it quantizes
            keys before RoPE (the key error is measured that way; side codes stay post-RoPE).
    Returns:
        (encoders, decoders): decoders None for the orthonormal kinds (each basis decodes itself).
    Raises:
        ValueError: an unknown basis, or "key-pca"/"whitened" without ``key_spec``.
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if basis in ("key-pca", "whitened") and key_spec is None:
        raise ValueError(f"the {basis} basis needs the base key quantizer (key_spec)")
    spec = lm.spec
    if basis == "random":
        return {l: random_basis(spec.n_kv_heads, spec.d_head, rank, seed + l) for l in range(spec.n_layers)}, None
    if basis == "query":
        return {l: top_eigenvectors(sigma, rank) for l, sigma in query_covariances(lm, blocks).items()}, None
    errors = key_error_covariances(lm, blocks, key_spec, pre_rope)
    if basis == "key-pca":
        return {l: top_eigenvectors(cov, rank) for l, cov in errors.items()}, None
    pairs = {l: whitened_bases(sigma, errors[l], rank) for l, sigma in query_covariances(lm, blocks).items()}
    return {l: e for l, (e, _) in pairs.items()}, {l: d for l, (_, d) in pairs.items()}


def calibrate(
    lm: LoadedModel,
    blocks: torch.Tensor,
    rank: int,
    basis: str = "query",
    key_spec: QuantSpec | None = None,
    seed: int = 0,
    pre_rope: bool = False,
) -> dict[int, torch.Tensor]:
    """Per-layer orthonormal bases {layer: (kv_head, d_head, rank)}: ``calibrate_side`` for "query", "random"
    and "key-pca".

    Raises:
        ValueError: "whitened" (its decoder differs from its encoder: use ``calibrate_side``), or as
            ``calibrate_side``.
    """
    if basis == "whitened":
        raise ValueError("the whitened basis has a decoder apart from its encoder: use calibrate_side")
    return calibrate_side(lm, blocks, rank, basis, key_spec, seed, pre_rope)[0]


def null_space_perturbation(k: torch.Tensor, sigma: torch.Tensor, n_dirs: int, size: float, seed: int) -> torch.Tensor:
    """Add Gaussian error of std ``size`` to keys (kv_head, key, d_head) along Σ_q's ``n_dirs`` weakest directions."""
    _, vecs = torch.linalg.eigh(sigma)  # (kv_head, d, d), ascending eigenvalues
    weak = vecs[..., :n_dirs].float()  # (kv_head, d_head, n_dirs)
    gen = torch.Generator().manual_seed(seed)
    noise = size * torch.randn(*k.shape[:-1], n_dirs, generator=gen)  # (kv_head, key, n_dirs)
    return k + torch.einsum("hkn,hdn->hkd", noise, weak)
