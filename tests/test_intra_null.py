"""The shared-value (intra-group) null: same keys and values, independent query weights."""

import numpy as np
import pytest
import torch

from atlas_core.clouds import CloudSpec, point_indices
from atlas_core.corpus import token_blocks
from atlas_core.extract import extract
from atlas_core.geometry import haar_frames, haar_null
from atlas_core.intra_null import (GroupAttention, IntraNullSpec, intra_group_null, layer_group_attention,
                                   rotated_clouds)
from atlas_core.models import load_model

SMALL = CloudSpec(corpus="pydoc", seq_len=24, n_blocks=2, n_points=40, seed=1)


@pytest.mark.parametrize("layer", [0, 1])
def test_unrotated_clouds_are_the_models_own(toy_lm, layer):
    """With no rotation the recomputed attention gives the model's own ε and z (mask, window, scale, GQA)."""
    att = layer_group_attention(toy_lm, layer, SMALL)
    points = point_indices(SMALL)
    acts = extract(toy_lm, token_blocks(toy_lm, SMALL.block_spec()), [layer], fields=("eps", "z"),
                   progress=False)[layer]
    for residual in ("eps", "z"):
        own = getattr(acts, residual)[:, torch.as_tensor(points)].double().numpy()
        np.testing.assert_allclose(rotated_clouds(att, points, None, residual), own, atol=2e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_window_of_the_sliding_families_is_used(family):
    att = layer_group_attention(load_model(f"toy-{family}"), 0, SMALL)
    assert att.window == 8 and SMALL.seq_len > att.window  # the test above then checks the window's edge


def _shared_values(rank: int, d: int = 16, n_kv: int = 2, per_group: int = 3, seed: int = 0) -> GroupAttention:
    """Random queries and keys; each KV head's values confined to a rank-``rank`` subspace of R^d."""
    gen = torch.Generator().manual_seed(seed)
    n_heads = n_kv * per_group
    q = torch.randn(n_heads, 3, 32, d, generator=gen)
    k = torch.randn(n_kv, 3, 32, d, generator=gen)
    basis = torch.linalg.qr(torch.randn(n_kv, d, rank, generator=gen))[0]  # (kv, d, rank)
    v = torch.randn(n_kv, 3, 32, rank, generator=gen) @ basis.transpose(1, 2)[:, None]
    return GroupAttention(q=q, k=k, v=v, kv_group=np.arange(n_heads) // per_group, scaling=d ** -0.5)


def test_values_in_a_k_dimensional_subspace_make_every_pair_align():
    """Heads that average values spanning only k directions share their k-frame whatever their queries: the
    shared-value null is then 1, where Haar frames give about 0.5."""
    att = _shared_values(rank=4)
    points = np.arange(1, 96)
    null = intra_group_null(att, points, IntraNullSpec(k=4, n_draws=5, residual="z"))
    assert null["n_pairs"] == 6 and null["mean"] == pytest.approx(1.0, abs=1e-6)
    assert haar_null(16, 4, 6)["mean"] < 0.7


def test_full_rank_values_give_a_null_between_haar_and_one_with_a_spread():
    att = _shared_values(rank=16)
    points = np.arange(1, 96)
    spec = IntraNullSpec(k=4, n_draws=8, seed=3)
    null = intra_group_null(att, points, spec)
    assert null["draws"].shape == (8,) and null["std"] > 0
    assert haar_null(16, 4, 6)["mean"] < null["mean"] < 1.0
    again = intra_group_null(att, points, spec)
    np.testing.assert_array_equal(again["draws"], null["draws"])  # seeded
    other = intra_group_null(att, points, IntraNullSpec(k=4, n_draws=8, seed=4))
    assert not np.array_equal(other["draws"], null["draws"])


def test_rotating_queries_changes_where_heads_look_but_not_the_values_they_read():
    att = _shared_values(rank=16)
    points = np.arange(1, 96)
    rot = torch.from_numpy(haar_frames(att.q.shape[0], 16, 16, 0))
    own, turned = rotated_clouds(att, points, None, "z"), rotated_clouds(att, points, rot, "z")
    assert not np.allclose(own, turned)
    eye = torch.eye(16).expand(att.q.shape[0], 16, 16)
    np.testing.assert_allclose(rotated_clouds(att, points, eye, "z"), own, atol=1e-6)


def test_refusals():
    att = _shared_values(rank=16)
    mha = GroupAttention(q=att.q[:2], k=att.k, v=att.v, kv_group=np.array([0, 1]), scaling=0.25)
    with pytest.raises(ValueError, match="no two query heads share a KV head"):
        intra_group_null(mha, np.arange(1, 96), IntraNullSpec(k=4, n_draws=2))
    with pytest.raises(ValueError, match="k = 16 must satisfy"):
        intra_group_null(att, np.arange(1, 96), IntraNullSpec(k=16, n_draws=2))
    with pytest.raises(ValueError, match="residual"):
        IntraNullSpec(residual="c")
    with pytest.raises(ValueError, match="n_draws"):
        IntraNullSpec(n_draws=1)
    with pytest.raises(ValueError, match="one KV head per query head"):
        GroupAttention(q=att.q, k=att.k, v=att.v, kv_group=np.array([0]), scaling=0.25)
