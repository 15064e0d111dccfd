"""The crossarch chapter's per-model measurement (atlas_core.protocol) against the library pieces it chains."""

import numpy as np
import pytest

from atlas_core.clouds import head_clouds, kv_groups
from atlas_core.geometry import head_mean_overlap, layer_overlap
from atlas_core.intrinsic import per_head
from atlas_core.models import load_model
from atlas_core.clouds import point_indices
from atlas_core.intra_null import IntraNullSpec, intra_group_null, layer_group_attention
from atlas_core.protocol import (Protocol, intra_null, intra_null_summary, intrinsic_dims, measure_model,
                                 overlap_summary, protocol_overlap)
from atlas_core.stats import spearman_by_group

TINY = Protocol(corpora=("pydoc", "britannica"), k=3, k_range=(2, 3, 5), n_points=120, n_blocks=3, seq_len=64,
                seeds=(0, 4), n_deep=2, mid_depth=0.5, n_boot=50, null_draws=20, n_perm=50, spearman_null_draws=6,
                intra_null_draws=5)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))


def test_measure_model_equals_the_protocol_done_by_hand():
    r = measure_model("toy-llama", TINY)
    lm = load_model("toy-llama")  # 2 layers, 4 heads in 2 KV groups, d_head 16
    groups = kv_groups(lm)
    eps = head_clouds(lm, [0, 1], "eps", TINY.cloud_spec(), progress=False)
    ref = layer_overlap(eps[1], groups, 3, "source", 50, 0, 20)
    assert r["deep"] == 1 and r["main"]["eps"]["o_h"] == ref.o_h and r["main"]["eps"]["ci"] == list(ref.ci)
    assert r["main"]["eps"]["d_int_twonn"] == per_head(eps[1], "twonn").mean()
    assert r["sweep"][3] == ref.summary() and sorted(r["sweep"]) == [2, 3, 5]
    # another seed: the subsample of every point equals the clouds sampled at that seed
    seed4 = head_clouds(lm, [1], "eps", TINY.cloud_spec(seed=4), progress=False)[1]
    assert r["seeds"][4]["o_h"] == layer_overlap(seed4, groups, 3, "source", 50, 0, 20).o_h
    assert r["seeds"][0] is r["main"]["eps"] and list(r["corpora"]) == ["pydoc", "britannica"]
    # the per-head test: d_int against mean inter-group overlap, two deepest layers pooled
    xs = np.concatenate([per_head(eps[L], "twonn") for L in (0, 1)])
    ys = np.concatenate([head_mean_overlap(layer_overlap(eps[L], groups, 3, "source", 50, 0, 20).matrix, groups)
                         for L in (0, 1)])
    assert r["spearman"]["real"] == spearman_by_group(xs, ys, np.repeat([0, 1], 4), 50, 0)
    assert r["spearman"]["haar_rho"]["pooled"].shape == (6,)
    from atlas_core import interval

    pooled = interval.spearman(xs, ys)  # heads resampled; each layer alone has 4 heads
    assert r["spearman"]["ci"]["pooled"] == (pooled.lo, pooled.hi) and set(r["spearman"]["ci"]) == {0, 1, "pooled"}


def test_protocol_refuses_what_the_model_cannot_run():
    """k = d_head (16 on toy-llama) used to be dropped from crossarch's sweep without a word; now it is refused."""
    with pytest.raises(ValueError, match="k = 16 must satisfy"):
        Protocol(k_range=(4, 16)).check(16, 2)
    with pytest.raises(ValueError, match="n_deep = 3"):
        Protocol().check(64, 2)
    Protocol().check(64, 30)
    with pytest.raises(ValueError, match="k = 16"):
        measure_model("toy-llama", Protocol(k=16, k_range=(16,), n_points=120, n_blocks=3, seq_len=64, n_deep=2))


def test_summary_adds_the_cloud_d_int():
    x = np.random.default_rng(0).standard_normal((4, 80, 8))
    res = protocol_overlap(x, np.array([0, 0, 1, 1]), TINY)
    out = overlap_summary(res, x)
    ids = intrinsic_dims(x)
    assert out["o_h"] == res.o_h and out["k"] == 3
    assert out["d_int_twonn_source"] == ids["twonn_source"].mean() and out["d_int_twonn_per_head"] == ids["twonn"].tolist()
    assert "d_int_twonn" not in overlap_summary(res)


def test_intra_group_pairs_get_the_shared_value_null():
    """measure_model judges the intra-group O_h against heads reading the same keys and values with independent
    queries (intra_null), on the protocol's own points: its unrotated statistic is the protocol's intra O_h."""
    r = measure_model("toy-llama", TINY)["main"]["eps"]
    lm = load_model("toy-llama")
    by_hand = intra_group_null(layer_group_attention(lm, 1, TINY.cloud_spec()), point_indices(TINY.cloud_spec()),
                               IntraNullSpec(k=3, n_draws=5, seed=0))
    assert r["intra_null_mean"] == by_hand["mean"] and r["intra_null_std"] == by_hand["std"]
    assert r["intra_null_n_pairs"] == by_hand["n_pairs"] == r["n_intra"] == 2  # toy-llama: 2 heads per KV head
    assert r["intra_null_z"] == pytest.approx((r["intra"] - by_hand["mean"]) / by_hand["std"])
    assert by_hand["observed"] == pytest.approx(r["intra"], abs=1e-4)
    assert intra_null(lm, 1, TINY)["n_draws"] == 5
    assert intra_null(load_model("toy-gpt2"), 1, TINY) is None  # MHA: no two heads share a KV head


def test_intra_null_summary_without_intra_pairs_or_spread():
    assert set(intra_null_summary(None, None).values()) == {None}  # MHA: no intra-group pair
    flat = intra_null_summary(1.0, {"mean": 1.0, "std": 0.0, "n_pairs": 3})
    assert np.isnan(flat["intra_null_z"]) and flat["intra_null_mean"] == 1.0
    assert intra_null_summary(0.6, {"mean": 0.5, "std": 0.05, "n_pairs": 3})["intra_null_z"] == pytest.approx(2.0)
