"""The ablation chapter's numbers (atlas_core.ablation): the protocol on a checkpoint, the reading against the
right null, and the mediation statistic on data whose answer is known."""

import math

import numpy as np
import pytest

from atlas_core import claims
from atlas_core.ablation import measure_checkpoint, null_verdict, on_null, partial_correlation, unigram_perplexity
from atlas_core.clouds import head_clouds, kv_groups
from atlas_core.geometry import head_mean_overlap, layer_overlap
from atlas_core.interval import Bootstrap
from atlas_core.intrinsic import layer_profile, per_head
from atlas_core.models import load_model
from atlas_core.protocol import Protocol
from atlas_core.train.config import ArchConfig
from atlas_core.train.model import build_model, load_checkpoint, save_weights
from atlas_core.train.tokenizer import load_tokenizer

TINY = Protocol(corpora=("plays",), k=3, k_range=(3,), n_points=120, n_blocks=3, seq_len=64, seeds=(0,), n_deep=1,
                n_boot=50, null_draws=20, intra_null_draws=5)
BOOT = Bootstrap(n_resamples=300, seed=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


def test_measure_checkpoint_equals_the_protocol_done_by_hand():
    lm = load_model("toy-llama")  # 2 layers, 4 heads in 2 KV groups, d_head 16
    r = measure_checkpoint(lm, TINY)
    groups = kv_groups(lm)
    eps = head_clouds(lm, [0, 1], "eps", TINY.cloud_spec(), progress=False)
    ref = {L: layer_overlap(eps[L], groups, 3, "source", 50, 0, 20) for L in (0, 1)}
    assert r["main"]["o_h"] == ref[1].o_h and r["main"]["z"] == ref[1].z and r["main"]["pairs"] == "inter"
    assert r["main"]["intra_null_std"] > 0  # GQA: the shared-value null of the intra-group pairs was drawn
    assert r["heads"]["layer"] == [0] * 4 + [1] * 4
    assert np.allclose(r["heads"]["overlap"], np.concatenate([head_mean_overlap(ref[L].matrix, groups) for L in (0, 1)]))
    d_int = {L: per_head(eps[L], "twonn") for L in (0, 1)}
    assert np.allclose(r["heads"]["d_int"], np.concatenate([d_int[0], d_int[1]]))
    assert r["profile"] == layer_profile({L: float(v.mean()) for L, v in d_int.items()}, 2)
    assert r["d_head"] == 16 and r["kv_groups"] == [0, 0, 1, 1]


def test_measure_checkpoint_reads_a_trained_checkpoint_under_mha_and_mqa(tmp_path):
    tok = load_tokenizer("plays", 512)
    for kv, intra in ((4, False), (1, True)):
        arch = ArchConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv, d_head=8, d_ff=64, vocab_size=512,
                          max_positions=64)
        folder = tmp_path / f"kv{kv}"
        folder.mkdir()
        save_weights(build_model(arch, 0), arch, folder)
        tok.save_pretrained(str(folder))
        r = measure_checkpoint(load_checkpoint(folder), TINY)
        assert (r["main"]["intra_null_mean"] is not None) == intra
        assert r["main"]["pairs"] == ("intra-only" if kv == 1 else "inter")
        assert on_null(r["main"]).figures["null"] == ("shared-value" if kv == 1 else "haar")


def test_on_null_reads_each_headline_against_its_own_null():
    inter = {"pairs": "inter", "o_h": 0.28, "ci": [0.27, 0.29], "null_mean": 0.279, "null_std": 0.004,
             "intra": None, "intra_ci": None, "intra_null_mean": None, "intra_null_std": None}
    assert on_null(inter).figures["decision"] in (claims.TIE, claims.EQUIVALENT)
    assert on_null({**inter, "o_h": 0.24, "ci": [0.235, 0.245]}).text == "lies below"
    mqa = {"pairs": "intra-only", "o_h": 0.6, "ci": [0.55, 0.65], "null_mean": 0.279, "null_std": 0.004,
           "intra": 0.6, "intra_ci": [0.55, 0.65], "intra_null_mean": 0.59, "intra_null_std": 0.02}
    assert on_null(mqa).figures["null"] == "shared-value" and on_null(mqa).text != "lies above"
    assert on_null({**mqa, "intra_null_mean": 0.4}).text == "lies above"
    with pytest.raises(ValueError, match="shared-value"):
        on_null({**mqa, "intra_null_std": None})


def _inter(excess: float, half: float = 0.005) -> dict:
    """An inter-group headline whose O_h − null is ``excess``, its CI over pairs ±``half``, null s.d. 0.002."""
    o = 0.279 + excess
    return {"pairs": "inter", "o_h": o, "ci": [o - half, o + half], "null_mean": 0.279, "null_std": 0.002,
            "intra": None, "intra_ci": None, "intra_null_mean": None, "intra_null_std": None}


def test_null_verdict_names_every_headline_off_its_null():
    on = {f"v{i}": on_null(_inter(x)) for i, x in enumerate((0.0005, -0.004, 0.006))}
    assert null_verdict(on).label == "on the null" and null_verdict(on).figures["n_at_null"] == 3
    assert null_verdict(on).figures["n_equivalent"] + null_verdict(on).figures["n_tie"] == 3
    off = null_verdict({**on, "mqa at end": on_null(_inter(0.03)), "base at init": on_null(_inter(-0.02))})
    assert off.label == "off the null" and off.figures["off"] == ["mqa at end", "base at init"]
    assert off.text.startswith("2 of 5 lie off their null: mqa at end lies above it; base at init lies below it; "
                               "of the other 3, ")
    one = null_verdict({**on, "mqa at end": on_null(_inter(0.03))})
    assert one.text.startswith("1 of 4 lies off its null: mqa at end lies above it")


def test_null_verdict_keeps_equivalent_apart_from_not_distinguishable():
    """A narrow interval (both spreads) near 0 is equivalence (evidence); a wide one that holds 0 is only a tie."""
    eq = on_null({**_inter(0.0005, half=0.003), "null_std": 0.001})  # ±0.0036: inside ±0.01
    tie = on_null({**_inter(0.02, half=0.005), "null_std": 0.02})  # ±0.04 reaches past ±0.01
    assert eq.figures["decision"] == claims.EQUIVALENT and tie.figures["decision"] == claims.TIE
    v = null_verdict({"a": eq, "b": tie, "c": tie})
    assert v.figures["n_equivalent"] == 1 and v.figures["n_tie"] == 2
    assert v.text == "none of 3 lies off its null (1 equivalent to it within ±0.01, 2 not distinguishable from it at this sample size)"


def test_unigram_perplexity_is_the_smoothed_frequency_model():
    train = np.array([0, 0, 0, 1])  # counts + 1: 4, 2, 1 over 7
    assert unigram_perplexity(train, [0, 1], 3) == pytest.approx(math.exp(-(math.log(4 / 7) + math.log(2 / 7)) / 2))
    uniform = unigram_perplexity(np.arange(50), np.arange(50), 50)
    assert uniform == pytest.approx(50.0)  # every count equal: the vocabulary size
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        unigram_perplexity(train, [3], 3)
    with pytest.raises(ValueError, match="needs"):
        unigram_perplexity([], [1], 3)
    with pytest.raises(ValueError):
        null_verdict({})


def test_partial_correlation_finds_a_within_stratum_effect():
    rng = np.random.default_rng(1)
    strata = np.repeat([32, 64, 128, 256], 30)
    x = rng.normal(size=120) + strata / 32
    y = 0.5 * x + rng.normal(scale=0.5, size=120) - strata / 100
    est = partial_correlation(y, x, strata, BOOT)
    assert 0.4 < est.value < 0.9 and est.lo > 0 and est.units == 120


def test_partial_correlation_removes_what_the_stratum_explains():
    """x and y both follow d_head (a strong raw correlation) but are independent within each d_head: ~0."""
    rng = np.random.default_rng(2)
    strata = np.repeat([32, 64, 128, 256], 30)
    x = rng.normal(size=120) + strata / 16
    y = rng.normal(size=120) + strata / 16
    assert np.corrcoef(x, y)[0, 1] > 0.9
    est = partial_correlation(y, x, strata, BOOT)
    assert est.lo < 0 < est.hi and abs(est.value) < 0.25


def test_partial_correlation_equals_the_regression_with_stratum_intercepts():
    rng = np.random.default_rng(3)
    strata = np.repeat([0, 1, 2], 10)
    x, y = rng.normal(size=30), rng.normal(size=30)
    design = np.column_stack([x, strata == 0, strata == 1, strata == 2]).astype(float)
    resid_y = y - design[:, 1:] @ np.linalg.lstsq(design[:, 1:], y, rcond=None)[0]
    resid_x = x - design[:, 1:] @ np.linalg.lstsq(design[:, 1:], x, rcond=None)[0]
    assert partial_correlation(y, x, strata, BOOT).value == pytest.approx(np.corrcoef(resid_x, resid_y)[0, 1])


def test_partial_correlation_refuses_bad_input():
    with pytest.raises(ValueError, match="one length"):
        partial_correlation([1.0, 2.0, 3.0], [1.0, 2.0], [0, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        partial_correlation([1.0, np.nan, 3.0], [1.0, 2.0, 3.0], [0, 0, 0])
    with pytest.raises(ValueError, match="at least"):
        partial_correlation([1.0], [2.0], [0])
