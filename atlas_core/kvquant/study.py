"""The offline key-error study (SPEC §9): which measure of key error predicts attention KL.

The model's own queries, keys and values of a few layers are read once (``extract``); each KV head's keys
are then quantized in several ways (``key_variants``: per-token and per-channel codes, HeadQ in three
bases, a null-space perturbation of the same key MSE as 2-bit per-token codes), and every query head's
key MSE, logit MSE, Fisher form and attention KL are measured under its layer's mask (``error_rows``).
"""

from __future__ import annotations

import math

import torch

from atlas_core.kvquant import headq, metrics
from atlas_core.kvquant.quant import QuantSpec, dequantize, quantize

__all__ = ["error_rows", "key_variants", "split_blocks", "study_layers"]

NAMED_LAYERS = ("first", "middle", "last")


def study_layers(text: str, n_layers: int) -> list[int]:
    """Layer indices from a comma list of names (first, middle, last) and indices (negative: from the end).

    Args:
        text: e.g. "first,middle,last" or "0,-1"; middle is ``n_layers // 2``.
        n_layers: the model's decoder layers.
    Returns:
        Sorted distinct indices in 0 … n_layers − 1.
    Raises:
        ValueError: an empty list, an unknown name, or an index outside −n_layers … n_layers − 1.
    """
    named = {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}
    out = set()
    for token in (t.strip() for t in str(text).split(",")):
        if token in named:
            out.add(named[token])
            continue
        try:
            index = int(token)
        except ValueError:
            raise ValueError(f"layers: {token!r} is neither one of {', '.join(NAMED_LAYERS)} nor a layer index") from None
        if not -n_layers <= index < n_layers:
            raise ValueError(f"layers: {index} does not exist; the model has layers 0..{n_layers - 1} (or -{n_layers}..-1)")
        out.add(index % n_layers)
    return sorted(out)


def split_blocks(t: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Per-head activations of ``n_blocks`` equal blocks read in one extraction, one block per row.

    Args:
        t: (head, block·token, d_head), as ``extract`` returns q, k or v of a (block, token) batch.
        n_blocks: the blocks of that batch.
    Returns:
        (head, block, token, d_head), a view.
    Raises:
        ValueError: the point axis is not a whole number of blocks.
    """
    if n_blocks < 1 or t.shape[1] % n_blocks:
        raise ValueError(f"{t.shape[1]} points do not split into {n_blocks} equal blocks")
    return t.reshape(t.shape[0], n_blocks, t.shape[1] // n_blocks, t.shape[-1])


def key_variants(k: torch.Tensor, *, bits, group: int, query_basis: torch.Tensor, sigma_q: torch.Tensor, rank: int,
                 side_bits: int, null_dirs: int, seed: int) -> dict[str, torch.Tensor]:
    """The studied key configurations of one layer: what attention would see of its keys under each.

    Per-token codes (groups of ``group`` channels) and KIVI's per-channel codes (groups of ``group``
    tokens) at each of ``bits``; HeadQ at 2 bits on per-token codes with a rank-``rank`` side code in the
    query basis, a random orthonormal basis and the key-PCA basis (top eigenvectors of these keys' own
    2-bit error covariance); and Gaussian noise along Σ_q's ``null_dirs`` weakest directions, sized to
    the key MSE of 2-bit per-token codes.

    Args:
        k: (kv_head, block, token, d_head) keys (post-RoPE, as cached); each block is quantized alone.
        bits: key bits of the per-token and per-channel rows, e.g. [2, 3, 4] (must include 2: the
            null-space noise is sized to the 2-bit per-token row).
        query_basis: (kv_head, d_head, ≥ rank) eigenvectors of Σ_q, largest first.
        sigma_q: (kv_head, d_head, d_head) calibration query second moment Σ_q.
        seed: seeds the random basis and the null-space noise (the chapter passes seed + layer).
    Returns:
        {name: (kv_head, block, token, d_head) dequantized keys}: "per-token {b}b", "KIVI {b}b" per b,
        "HeadQ 2b", "random basis 2b", "key-PCA basis 2b", "null-space", in that order.
    Raises:
        ValueError: 2 not in ``bits``.
    Source: HeadQ (Ruiz-Williams 2026, abstract) as reconstructed in ``headq``; KIVI (Liu et al. 2024).
    """
    if 2 not in bits:
        raise ValueError(f"key_variants sizes the null-space noise to 2-bit per-token keys: bits must include 2, got {bits}")
    n_kv, _, n_token, d_head = k.shape
    out = {}
    for b in bits:
        for name, axis in (("per-token", "token"), ("KIVI", "channel")):
            spec = QuantSpec(bits=b, group=group, axis=axis)
            out[f"{name} {b}b"] = dequantize(quantize(k, spec), spec)
    base = QuantSpec(bits=2, group=group, axis="token")
    key_pca = headq.top_eigenvectors(headq.key_error_covariance(k.flatten(1, 2), base, n_token), rank)
    bases = {"HeadQ 2b": query_basis[..., :rank], "random basis 2b": headq.random_basis(n_kv, d_head, rank, seed),
             "key-PCA basis 2b": key_pca}
    for name, basis in bases.items():
        side = headq.SideCode(bases={0: basis}, bits=side_bits)
        out[name] = torch.stack([headq.headq_keys(k[:, i : i + 1].transpose(0, 1), base, side, basis)[0]
                                 for i in range(k.shape[1])], 1)  # one block at a time, (kv_head, token, d_head) each
    mse_2b = (out["per-token 2b"] - k).pow(2).mean()
    size = math.sqrt(mse_2b.item() * d_head / null_dirs)  # the same key MSE as 2-bit per-token
    flat = headq.null_space_perturbation(k.flatten(1, 2), sigma_q, null_dirs, size, seed)
    out["null-space"] = flat.reshape(k.shape)
    return out


def error_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_group: torch.Tensor,
               variants: dict[str, torch.Tensor], mask: torch.Tensor, scale: float) -> list[dict]:
    """Every error measure of every query head under every key configuration of one layer.

    Args:
        q: (head, block, query, d_head); k, v: (kv_head, block, key, d_head), the true keys and values.
        kv_group: (head,) the KV head each query head reads.
        variants: {config: (kv_head, block, key, d_head) keys} (``key_variants``).
        mask: (query, key) keys seen (``metrics.causal_mask``); scale: the layer's logit scale.
    Returns:
        [{"head", "config", "key_mse", "logit_mse", "fisher", "kl", "output_error"}], configs outer,
        heads inner; each figure averaged over blocks and queries (``metrics.key_error_report``).
    """
    rows = []
    for config, k_hat in variants.items():
        for h in range(q.shape[0]):
            kv = int(kv_group[h])
            rows.append({"head": h, "config": config, **metrics.key_error_report(q[h], k[kv], k_hat[kv], v[kv], mask, scale)})
    return rows
