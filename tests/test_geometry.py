"""Known answers for frames, overlaps, pair groups, the bootstrap and the null models."""

import json

import numpy as np
import pytest
import torch

from atlas_core.geometry import (
    analytic_null_mean,
    bootstrap_ci,
    c_null_in_column_spaces,
    check_rank,
    column_space_frames,
    frame,
    frame_rank,
    frames,
    gaussian_null_clouds,
    haar_cosines,
    haar_frames,
    haar_head_overlaps,
    haar_null,
    head_mean_overlap,
    layer_overlap,
    overlap_matrix,
    overlap_sweep,
    pair_groups,
    principal_cosines,
    projection_overlap,
    source_overlap,
)


def _orthogonal(d, seed=0):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


def _cloud_in(basis, n_points, rng, noise=0.0):
    """Points spread along the columns of basis (d, k) with distinct variances, plus isotropic noise."""
    d, k = basis.shape
    coeffs = rng.standard_normal((n_points, k)) * np.linspace(3.0, 1.0, k)  # (point, k)
    return 5.0 + coeffs @ basis.T + noise * rng.standard_normal((n_points, d))


# --- frames and overlaps -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 7, 11])
def test_frames_sharing_j_of_k_directions(k):
    q = _orthogonal(64)
    rot = _orthogonal(k, seed=1)  # a rotation inside a frame changes nothing
    for j in range(k + 1):
        b_i = q[:, :k] @ rot
        b_j = q[:, list(range(j)) + list(range(k, 2 * k - j))]
        s = principal_cosines(b_i, b_j)
        np.testing.assert_allclose(s, [1.0] * j + [0.0] * (k - j), atol=1e-12)
        assert source_overlap(b_i, b_j) == pytest.approx(j / k)
        assert projection_overlap(b_i, b_j) == pytest.approx(j / k)


def test_frame_recovers_a_known_subspace():
    rng = np.random.default_rng(0)
    basis = _orthogonal(64)[:, :7]
    cloud = _cloud_in(basis, 500, rng, noise=1e-4)
    b = frame(torch.from_numpy(cloud).float(), 7)  # torch input, float32
    assert b.shape == (64, 7)
    np.testing.assert_allclose(b.T @ b, np.eye(7), atol=1e-10)
    assert source_overlap(b, basis) > 0.999
    with pytest.raises(ValueError):
        frame(cloud[:5], 7)  # k > points - 1


def test_overlap_matrix_is_symmetric_with_unit_diagonal():
    b = haar_frames(5, 32, 4, rng=0)
    m = overlap_matrix(b)
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1.0)
    assert m[1, 3] == pytest.approx(source_overlap(b[1], b[3]))
    assert overlap_matrix(b, "projection")[0, 2] == pytest.approx(projection_overlap(b[0], b[2]))


def test_pair_groups_counts():
    g = pair_groups(torch.arange(9) // 3)  # 9 query heads, 3 KV heads
    assert (len(g["all"]), len(g["inter"]), len(g["intra"])) == (36, 27, 9)
    assert np.all(g["all"][:, 0] < g["all"][:, 1])
    assert all((i // 3 == j // 3) for i, j in g["intra"])
    mha = pair_groups(np.arange(8))
    assert (len(mha["inter"]), len(mha["intra"])) == (28, 0)
    mqa = pair_groups(np.zeros(6, dtype=int))
    assert (len(mqa["inter"]), len(mqa["intra"])) == (0, 15)


def test_bootstrap_is_deterministic_and_covers_the_mean():
    v = np.random.default_rng(0).uniform(0.2, 0.4, 40)
    ci = bootstrap_ci(v, seed=3)
    assert ci == bootstrap_ci(v, seed=3)
    assert ci != bootstrap_ci(v, seed=4)
    assert ci[0] < v.mean() < ci[1]
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    with pytest.raises(ValueError):
        bootstrap_ci([])


# --- nulls -----------------------------------------------------------------------------------------------


def test_haar_mean_overlap_matches_the_analytic_approximation():
    """All of d = 64, 128, 256 and k = 4…11 within 0.005 (the worst gap, at d = 64, k = 4, is ≈ 0.0044).

    Estimated with the exact control variate E[Σ s²/k] = k/d, which cuts the Monte Carlo error ~3×, so a
    few thousand pairs resolve the 0.0006 margin of the worst case.
    """
    n = 6000
    for d in (64, 128, 256):
        for k in range(4, 12):
            s = haar_cosines(d, k, n, rng=d * 100 + k)
            o, p = s.mean(-1), (s**2).mean(-1)
            beta = np.cov(o, p)[0, 1] / p.var(ddof=1)
            resid = o - beta * (p - k / d)
            mean, se = resid.mean(), resid.std() / np.sqrt(n)
            assert abs(o.mean() - mean) < 5 * o.std() / np.sqrt(n)
            assert se < 2.5e-4
            assert abs(mean - analytic_null_mean(d, k)) < 0.005, (d, k, mean)


def test_fast_haar_cosines_agree_with_qr_frames():
    for d, k in [(64, 7), (12, 7)]:  # the second takes the d < 2k fallback
        rng = np.random.default_rng(d)
        ref = principal_cosines(haar_frames(3000, d, k, rng), haar_frames(3000, d, k, rng))
        fast = haar_cosines(d, k, 3000, rng)
        for f in (lambda s: s.mean(-1), lambda s: s[:, 0], lambda s: s[:, -1]):
            a, b = f(ref), f(fast)
            assert abs(a.mean() - b.mean()) < 4 * np.hypot(a.std(), b.std()) / np.sqrt(3000)
    b = haar_frames(4, 16, 3, rng=0)
    np.testing.assert_allclose(np.swapaxes(b, 1, 2) @ b, np.broadcast_to(np.eye(3), (4, 3, 3)), atol=1e-12)


def test_haar_null_spread_and_projection_level():
    d, k, n_pairs = 64, 7, 28
    src = haar_null(d, k, n_pairs, n_draws=400, seed=0)
    assert src["draws"].shape == (400,)
    assert src["std"] == pytest.approx(src["pair_std"] / np.sqrt(n_pairs), rel=0.15)
    assert src["mean"] == pytest.approx(src["pair_mean"])
    proj = haar_null(d, k, n_pairs, n_draws=400, seed=0, metric="projection")
    assert abs(proj["mean"] - k / d) < 4 * proj["std"] / np.sqrt(400)
    assert proj["analytic"] == k / d


def test_gaussian_null_keeps_mean_and_covariance_spectrum():
    rng = np.random.default_rng(0)
    basis = _orthogonal(16)[:, :5]
    clouds = np.stack([_cloud_in(basis, 4000, rng, noise=0.1) for _ in range(2)])  # (head, point, d)
    null = gaussian_null_clouds(torch.from_numpy(clouds), seed=1)
    assert null.shape == clouds.shape
    for x, y in zip(clouds, null):
        np.testing.assert_allclose(y.mean(0), x.mean(0), atol=4 * x.std(0).max() / np.sqrt(len(x)))
        ev_x, ev_y = np.linalg.eigvalsh(np.cov(x.T)), np.linalg.eigvalsh(np.cov(y.T))
        np.testing.assert_allclose(ev_y, ev_x, rtol=0.12)
    assert not np.allclose(null, gaussian_null_clouds(clouds, seed=2))


# --- one layer -----------------------------------------------------------------------------------------


def _layer(groups, shared_within_group, seed=0, n_points=300, d=32, k=4):
    """Clouds (head, point, d): heads of one group share a k-subspace if asked, otherwise all independent."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    bases = {}
    clouds = []
    for h, g in enumerate(groups):
        key = g if shared_within_group else h
        if key not in bases:
            bases[key] = np.linalg.qr(rng.standard_normal((d, k)))[0]
        clouds.append(_cloud_in(bases[key], n_points, rng, noise=0.01))
    return np.stack(clouds), groups


def test_layer_overlap_shared_subspace_is_far_above_null():
    clouds, _ = _layer(np.zeros(8, dtype=int), shared_within_group=True)
    r = layer_overlap(clouds, np.arange(8), k=4, null_draws=200)  # MHA labels: all pairs inter
    assert (r.pairs, r.n_pairs, r.n_inter, r.n_intra, r.intra, r.intra_ci) == ("inter", 28, 28, 0, None, None)
    assert r.o_h > 0.99 and r.z > 20
    assert r.ci[0] <= r.o_h <= r.ci[1]
    assert (r.d, r.k, r.n_points, r.matrix.shape) == (32, 4, 300, (8, 8))
    assert r.delta == pytest.approx(r.o_h - r.null_mean)
    assert r.null_analytic == pytest.approx(analytic_null_mean(32, 4))


def test_layer_overlap_independent_subspaces_match_null():
    clouds, groups = _layer(np.arange(8), shared_within_group=False)
    r = layer_overlap(clouds, groups, k=4, null_draws=200)
    assert abs(r.z) < 4
    assert abs(r.o_h - r.null_mean) < 4 * r.null_std


def test_layer_overlap_gqa_and_mqa_splits():
    clouds, groups = _layer(np.arange(9) // 3, shared_within_group=True)
    r = layer_overlap(clouds, groups, k=4, null_draws=100)
    assert (r.pairs, r.n_inter, r.n_intra, r.n_pairs) == ("inter", 27, 9, 27)
    assert r.intra > 0.99 and abs(r.z) < 4 and r.o_h == r.inter
    mqa = layer_overlap(clouds, np.zeros(9, dtype=int), k=4, null_draws=100)
    assert (mqa.pairs, mqa.n_pairs, mqa.inter, mqa.inter_ci) == ("intra-only", 36, None, None)
    assert mqa.o_h == pytest.approx(mqa.all_pairs) and mqa.intra == pytest.approx(mqa.all_pairs)
    assert "matrix" not in mqa.summary() and mqa.summary()["ci"] == list(mqa.ci)
    assert json.loads(json.dumps(r.summary()))["n_intra"] == 9


# --- after W_O -----------------------------------------------------------------------------------------


def test_column_space_frames_are_orthonormal_and_span_w_o():
    w_o = torch.randn(3, 8, 40)  # (head, d_head, d_model)
    b = column_space_frames(w_o)
    assert b.shape == (3, 40, 8)
    np.testing.assert_allclose(np.swapaxes(b, 1, 2) @ b, np.broadcast_to(np.eye(8), (3, 8, 8)), atol=1e-12)
    w = w_o.double().numpy()
    np.testing.assert_allclose(w @ b @ np.swapaxes(b, 1, 2), w, atol=1e-10)  # rows lie in the span


def test_c_null_inside_column_spaces():
    d_head, d_model, k = 16, 64, 4
    rng = np.random.default_rng(0)
    q = _orthogonal(d_model)
    # all heads write to one subspace: the null is the Haar null in d_head, far above the d_model one
    same = np.stack([rng.standard_normal((d_head, d_head)) @ q[:, :d_head].T for _ in range(4)])
    null = c_null_in_column_spaces(same, k, n_draws=100)
    assert null["mean"] == pytest.approx(haar_null(d_head, k, 6, n_draws=200)["mean"], abs=0.02)
    assert null["mean"] > 2 * analytic_null_mean(d_model, k)
    # mutually orthogonal column spaces: no overlap is possible
    orth = np.stack([q[:, h * d_head : (h + 1) * d_head].T for h in range(4)])
    assert c_null_in_column_spaces(orth, k, pairs=[[0, 1], [2, 3]], n_draws=20)["mean"] < 1e-12


def test_layer_overlap_on_c_reports_both_nulls():
    z, groups = _layer(np.arange(4), shared_within_group=False, d=16)
    w_o = np.random.default_rng(1).standard_normal((4, 16, 48))
    c = np.einsum("hpe,hem->hpm", z, w_o)  # (head, point, d_model)
    r = layer_overlap(c, groups, k=4, null_draws=100, w_o=w_o)
    assert r.d == 48 and r.colspace_null_mean is not None
    assert r.colspace_z == pytest.approx((r.o_h - r.colspace_null_mean) / r.colspace_null_std)


def test_haar_null_is_computed_once_per_arguments_and_handed_out_as_a_copy():
    from atlas_core import geometry

    geometry._haar_null.cache_clear()
    a = haar_null(64, 7, 9, n_draws=50, seed=3)
    b = haar_null(64, 7, 9, n_draws=50, seed=3)
    assert geometry._haar_null.cache_info().hits == 1
    assert a == {**b, "draws": a["draws"]} and np.array_equal(a["draws"], b["draws"])
    a["draws"][:] = -1  # a caller's edit does not reach the next caller
    assert (haar_null(64, 7, 9, n_draws=50, seed=3)["draws"] >= 0).all()
    assert haar_null(64, 7, 9, n_draws=50, seed=4)["mean"] != b["mean"]


# --- overlap sweep, the rank rule, per-head means (issue 16) ----------------------------------------------


def _same_result(a, b):
    """Two OverlapResults hold the same numbers, to the bit."""
    assert a.summary() == b.summary()
    assert np.array_equal(a.matrix, b.matrix)


@pytest.mark.parametrize("groups", [[0, 0, 1, 1, 2, 2], [0] * 4, list(range(5))], ids=["gqa", "mqa", "mha"])
def test_overlap_sweep_equals_layer_overlap_at_every_k(groups):
    """One SVD for all k gives exactly what one layer_overlap per k gives (the crossarch chapter's old assert)."""
    clouds = np.random.default_rng(3).standard_normal((len(groups), 60, 12))
    sweep = overlap_sweep(clouds, np.array(groups), [5, 2, 3, 5], n_boot=100, null_draws=40, seed=1)
    assert list(sweep) == [2, 3, 5]  # sorted, repeats dropped
    for k, r in sweep.items():
        _same_result(r, layer_overlap(clouds, np.array(groups), k, n_boot=100, null_draws=40, seed=1))


def test_overlap_sweep_on_c_keeps_the_column_space_null():
    rng = np.random.default_rng(4)
    w_o = rng.standard_normal((4, 6, 20))  # (head, d_head, d_model)
    c = np.einsum("hpd,hdm->hpm", rng.standard_normal((4, 50, 6)), w_o)  # (head, point, d_model)
    sweep = overlap_sweep(c, np.array([0, 0, 1, 1]), [2, 3], n_boot=50, null_draws=200, w_o=w_o)
    for k, r in sweep.items():
        assert r.colspace_null_mean is not None
        _same_result(r, layer_overlap(c, np.array([0, 0, 1, 1]), k, n_boot=50, null_draws=200, w_o=w_o))


@pytest.mark.parametrize("k", [16, 17, 0, -1, 2.5, True, "7"])
def test_rank_rule_refuses_frames_that_fill_the_space(k):
    """Issue 16: k = d_head = 16 gave O_h = 1.000 against a null of 1.000 (std 4e-17), which the atlas chapter
    published with a z-score; now every entry point refuses it with one message naming k."""
    clouds = np.random.default_rng(0).standard_normal((4, 200, 16))
    with pytest.raises(ValueError, match="k = .* must"):
        check_rank(k, 16)
    with pytest.raises(ValueError, match="k = .* must"):
        layer_overlap(clouds, np.array([0, 0, 1, 1]), k, n_boot=20, null_draws=10)
    with pytest.raises(ValueError, match="k = .* must"):
        overlap_sweep(clouds, np.array([0, 0, 1, 1]), [4, k], n_boot=20, null_draws=10)


def test_rank_rule_accepts_up_to_d_minus_one_and_respects_the_point_count():
    assert check_rank(15, 16) == 15 and check_rank(np.int64(3), 16) == 3
    assert check_rank(9, 64, n_points=10) == 9
    with pytest.raises(ValueError, match="n_points = 10"):
        check_rank(10, 64, n_points=10)
    with pytest.raises(ValueError, match="at least one"):
        overlap_sweep(np.zeros((2, 5, 4)), np.array([0, 1]), [])


def test_frame_rank_rounds_half_to_even_and_stays_a_valid_rank():
    assert [frame_rank(v, 16) for v in (6.5, 7.5, 7.49, 0.2, 15.6, 40.0)] == [6, 8, 7, 1, 15, 15]
    with pytest.raises(ValueError, match="finite"):
        frame_rank(float("nan"), 16)


def test_head_mean_overlap_by_hand():
    m = np.array([[1.0, 0.9, 0.2, 0.4],
                  [0.9, 1.0, 0.6, 0.8],
                  [0.2, 0.6, 1.0, 0.7],
                  [0.4, 0.8, 0.7, 1.0]])
    # GQA, groups {0, 1} and {2, 3}: each head against the two heads of the other group
    np.testing.assert_allclose(head_mean_overlap(m, [0, 0, 1, 1]), [0.3, 0.7, 0.4, 0.6])
    # MQA: no inter-group pair, so every other head
    np.testing.assert_allclose(head_mean_overlap(m, [0, 0, 0, 0]), [0.5, 2.3 / 3, 0.5, 1.9 / 3])
    # MHA: every other head is another group
    np.testing.assert_allclose(head_mean_overlap(m, [0, 1, 2, 3]), [0.5, 2.3 / 3, 0.5, 1.9 / 3])
    with pytest.raises(ValueError, match="head_mean_overlap"):
        head_mean_overlap(m, [0, 0, 1])


def test_haar_head_overlaps_draws_layers_then_draws_from_one_generator():
    groups = np.array([0, 0, 1, 1])
    out = haar_head_overlaps(groups, 16, 3, n_layers=2, n_draws=5, seed=7)
    assert out.shape == (5, 8)
    rng = np.random.default_rng(7)  # the reference: the same draws in the same order, one layer at a time
    ref = [[head_mean_overlap(overlap_matrix(haar_frames(4, 16, 3, rng)), groups) for _ in range(2)] for _ in range(5)]
    np.testing.assert_array_equal(out, np.array(ref).reshape(5, 8))
    big = haar_head_overlaps(groups, 64, 7, n_layers=1, n_draws=300, seed=0)
    assert abs(big.mean() - analytic_null_mean(64, 7)) < 0.01  # random frames sit at the Haar level
    with pytest.raises(ValueError, match="k = 16"):
        haar_head_overlaps(groups, 16, 16, 1, 1)
