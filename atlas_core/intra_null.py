"""The chance level of heads that share a KV head: the same keys and values, independent query weights.

Two query heads of one KV group (GQA, MQA) attend over the same keys and average the same value vectors,
so their clouds (z, and the residual ε = z − v[argmax p]) share directions whatever the heads' queries do.
Haar-random frames (``geometry.haar_null``) ignore that and put the chance level of an intra-group pair far
too low: an intra-group O_h above the Haar null says only that the pair reads the same values.

The right null keeps everything a group shares and draws only what makes its heads different heads: each
query head h of the group gets query weights W_Q^{(h)} R_h with R_h a Haar rotation of R^{d_head}, drawn
independently for every head and every draw. Its queries are then q_h R_h (the post-RoPE queries the model
computed, rotated), so each head keeps its own query norms, hence the sharpness of its attention, while
where it looks in key space is independent of its group partners. Keys, values, the scaling, the causal
mask, the sliding window and soft-capping are the layer's own. Each draw recomputes every head's
attention, its z and ε at the sampled points, their top-k frames and the mean overlap over the intra-group
pairs; the draws' mean and s.d. are the null of an intra-group O_h over that many pairs. An observed O_h
above it means the heads of a group look at the same keys more than independent queries would; at it, the
alignment is what sharing the value vectors gives by construction.

Axis vocabulary as in ``geometry``: ``head``, ``kv_head``, ``block``, ``token``, ``point``, ``d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from atlas_core.attention import attention_modules
from atlas_core.clouds import CloudSpec, point_indices
from atlas_core.corpus import token_blocks
from atlas_core.extract import extract
from atlas_core.geometry import check_rank, frames, haar_frames, pair_groups, pair_overlaps
from atlas_core.models import LoadedModel

__all__ = ["GroupAttention", "IntraNullSpec", "group_attention", "intra_group_null", "layer_group_attention",
           "rotated_clouds"]

RESIDUALS = ("eps", "z")


@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: the fields are tensors
class GroupAttention:
    """One layer's queries, keys and values on whole blocks, with the layer's own attention settings.

    Attributes:
        q: (head, block, token, d_head) post-RoPE queries, as the attention scores them.
        k, v: (kv_head, block, token, d_head) post-RoPE keys and values.
        kv_group: (head,) the KV head each query head reads.
        scaling: the logit scale (1/√d_head for most models; Gemma 3's query_pre_attn_scalar^-1/2).
        window: the sliding window (key j is seen from query t when t − window < j ≤ t), or None.
        softcap: the logit soft-cap (cap · tanh(logit / cap)), or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_group: np.ndarray
    scaling: float
    window: int | None = None
    softcap: float | None = None

    def __post_init__(self):
        if self.q.ndim != 4 or self.k.shape != self.v.shape or self.k.ndim != 4:
            raise ValueError(f"q must be (head, block, token, d) and k, v equal (kv_head, block, token, d); got "
                             f"{tuple(self.q.shape)}, {tuple(self.k.shape)}, {tuple(self.v.shape)}")
        if self.q.shape[1:] != self.k.shape[1:] or len(self.kv_group) != self.q.shape[0]:
            raise ValueError("q, k and v must share (block, token, d) and kv_group must name one KV head per query head")


@dataclass(frozen=True, kw_only=True)
class IntraNullSpec:
    """How the shared-value null is drawn.

    Attributes:
        k: frame rank, 1 <= k < d_head (``geometry.check_rank``).
        residual: "eps" (the source's residual) or "z" (the head output).
        n_draws: Monte Carlo draws (each draws a rotation per head), at least 2.
        seed: seeds the rotations.
        metric: "source" (mean principal cosine) or "projection".
    """

    k: int = 7
    residual: str = "eps"
    n_draws: int = 200
    seed: int = 0
    metric: str = "source"

    def __post_init__(self):
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if isinstance(self.n_draws, bool) or not isinstance(self.n_draws, int) or self.n_draws < 2:
            raise ValueError(f"n_draws must be an integer ≥ 2, got {self.n_draws!r}")


def group_attention(att: GroupAttention, q: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities of every head on its own KV head's keys, with the layer's mask and scaling.

    Args:
        att: the layer's keys, values and settings.
        q: (head, block, token, d_head) queries to score, ``att.q`` when None.
    Returns:
        (head, block, query, key) float32 probabilities; rows sum to 1 over the keys each query may see.
    """
    q = att.q if q is None else q
    keys = att.k[torch.as_tensor(att.kv_group)]  # (head, block, token, d)
    logits = torch.einsum("hbtd,hbsd->hbts", q.float(), keys.float()) * att.scaling
    if att.softcap is not None:
        logits = att.softcap * torch.tanh(logits / att.softcap)
    t = torch.arange(q.shape[2])
    seen = t[None, :] <= t[:, None]  # (query, key): causal
    if att.window is not None:
        seen &= t[None, :] > t[:, None] - att.window
    return torch.softmax(logits.masked_fill(~seen, -math.inf), dim=-1)


def rotated_clouds(att: GroupAttention, points: np.ndarray, rotations: torch.Tensor | None = None,
                   residual: str = "eps") -> np.ndarray:
    """Every head's z or ε cloud at the sampled points, each head's queries rotated by its own rotation.

    Args:
        att: the layer's queries, keys, values and settings.
        points: (point,) flat (block, token) indices, block-major (``clouds.point_indices``).
        rotations: (head, d_head, d_head) orthogonal matrices R_h (queries become q_h R_h); None keeps the
            model's queries, and the clouds are then the model's own (``tests/test_intra_null.py``).
        residual: "eps" (z − v[argmax p]) or "z".
    Returns:
        (head, point, d_head) float64
    """
    q = att.q if rotations is None else torch.einsum("hbtd,hde->hbte", att.q.float(), rotations.float())
    probs = group_attention(att, q)  # (head, block, query, key)
    values = att.v[torch.as_tensor(att.kv_group)].float()  # (head, block, token, d)
    z = probs @ values  # (head, block, query, d)
    if residual == "eps":
        top = probs.argmax(-1)  # (head, block, query)
        z = z - torch.gather(values, 2, top[..., None].expand(-1, -1, -1, values.shape[-1]))
    flat = z.reshape(z.shape[0], -1, z.shape[-1])  # (head, block * token, d)
    return flat[:, torch.as_tensor(points)].double().numpy()


def intra_group_null(att: GroupAttention, points: np.ndarray, spec: IntraNullSpec = IntraNullSpec()) -> dict:
    """The null of an intra-group O_h: heads reading the same keys and values with independent query weights.

    Each draw rotates every head's queries by its own Haar rotation (independent across heads and draws),
    recomputes the clouds (``rotated_clouds``), their top-k frames and the mean overlap over the intra-group
    pairs, the same pairs the observed intra-group O_h averages.

    Args:
        att: one layer's queries, keys, values and settings (``layer_group_attention``).
        points: (point,) the sampled flat (block, token) indices of the observed clouds.
        spec: frame rank, residual, draws, seed and metric.
    Returns:
        {"mean", "std" (ddof 1): of the draws, "draws": (draw,), "n_pairs": intra-group pairs per draw,
         "observed": the same statistic on the model's own queries}
    Raises:
        ValueError: no two heads share a KV head (MHA), or k outside 1 <= k < d_head.
    """
    pairs = pair_groups(att.kv_group)["intra"]
    if len(pairs) == 0:
        raise ValueError("no two query heads share a KV head here (MHA): there is no intra-group pair to judge")
    n_heads, d = att.q.shape[0], att.q.shape[-1]
    check_rank(spec.k, d, len(points))

    def statistic(rotations) -> float:
        cloud = rotated_clouds(att, points, rotations, spec.residual)
        return float(pair_overlaps(frames(cloud, spec.k), pairs, spec.metric).mean())

    rng = np.random.default_rng(spec.seed)
    draws = np.array([statistic(torch.from_numpy(haar_frames(n_heads, d, d, rng))) for _ in range(spec.n_draws)])
    return {"mean": float(draws.mean()), "std": float(draws.std(ddof=1)), "draws": draws, "n_pairs": len(pairs),
            "observed": statistic(None)}


def layer_group_attention(lm: LoadedModel, layer: int, spec: CloudSpec) -> GroupAttention:
    """One layer's post-RoPE q, k and v on the blocks a cloud spec samples, with the layer's settings.

    Args:
        lm: a loaded model; layer: its index (negative counts from the end).
        spec: the clouds' blocks (``CloudSpec.block_spec``); its points are ``clouds.point_indices(spec)``.
    Returns:
        ``GroupAttention`` with q (head, block, token, d) and k, v (kv_head, block, token, d).
    """
    layer = layer % lm.spec.n_layers
    blocks = token_blocks(lm, spec.block_spec())
    acts = extract(lm, blocks, [layer], fields=("q", "k", "v"), progress=False)[layer]
    n_block, n_token = blocks.shape
    shape = lambda t: t.reshape(t.shape[0], n_block, n_token, t.shape[-1])  # noqa: E731
    module = attention_modules(lm.model)[layer]
    window = lm.spec.windows[layer]
    softcap = getattr(module.config, "attn_logit_softcapping", None) if hasattr(module, "config") else None
    return GroupAttention(q=shape(acts.q), k=shape(acts.k), v=shape(acts.v), kv_group=acts.kv_group.numpy(),
                          scaling=float(module.scaling), window=window or None, softcap=softcap or None)

