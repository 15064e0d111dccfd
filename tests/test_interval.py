"""The paired block bootstrap: values, pairing, determinism, and a plain-loop reference."""

import math

import numpy as np
import pytest
import torch

from atlas_core import interval
from atlas_core.interval import Bootstrap


def _nll(seed, blocks=12, tokens=50, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(blocks, tokens, generator=g) * 4 + shift).double()


def test_perplexity_value_is_exp_mean_and_interval_brackets_it():
    nll = _nll(0)
    est = interval.perplexity(nll)
    assert est.value == pytest.approx(math.exp(nll.mean().item()))
    assert est.lo < est.value < est.hi and est.units == 12


def test_unequal_blocks_weigh_by_tokens():
    rows = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([4.0])]
    assert interval.perplexity(rows).value == pytest.approx(math.exp(7 / 4))


def test_nan_positions_are_left_out():
    rows = torch.tensor([[1.0, float("nan")], [3.0, 3.0]])
    assert interval.mean(rows).value == pytest.approx(7 / 3)


def test_plain_loop_reference():
    """Each draw recomputed by hand (a loop over resamples) gives the same percentile interval."""
    a, b = _nll(1), _nll(2, shift=0.3)
    boot = Bootstrap(n_resamples=200, seed=5)
    est = interval.ppl_ratio(a, b, boot)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 12, size=(200, 12))
    ratios = [math.exp(a[i].mean().item() - b[i].mean().item()) for i in idx]  # equal-length blocks
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    assert (est.lo, est.hi) == pytest.approx((lo, hi), rel=1e-12)


def test_paired_difference_of_identical_methods_is_exactly_zero():
    a = _nll(3)
    est = interval.ppl_difference(a, a.clone())
    assert (est.value, est.lo, est.hi) == (0.0, 0.0, 0.0)
    assert not est.distinguishable()


def test_pairing_narrows_a_shared_block_effect():
    """Two methods that differ by a small constant on blocks that differ a lot: paired is tight, and
    a ratio's interval excludes 1."""
    block = torch.linspace(0, 3, 20)[:, None]
    a = block + _nll(4, blocks=20) * 0.01
    b = a + 0.02
    est = interval.ppl_ratio(b, a)
    assert est.distinguishable(null=1.0)
    assert est.hi - est.lo < 1e-3
    wide = interval.perplexity(a)
    assert wide.hi / wide.lo > 1.5


def test_same_seed_same_interval_and_seed_matters():
    a = _nll(6)
    assert interval.perplexity(a) == interval.perplexity(a)
    assert interval.perplexity(a, Bootstrap(seed=1)) != interval.perplexity(a, Bootstrap(seed=2))


def test_excess_removed():
    fp = _nll(7)
    base = fp + 0.5
    half = fp + 0.25
    est = interval.excess_removed(base, half, fp)
    pb, ph, pf = (math.exp(x.mean().item()) for x in (base, half, fp))
    assert est.value == pytest.approx((pb - ph) / (pb - pf))
    assert est.lo <= est.value <= est.hi


def test_excess_removed_difference_is_the_paired_difference_of_two_fractions():
    fp = _nll(7)
    base, a, b = fp + 0.5, fp + 0.1, fp + 0.3
    boot = Bootstrap(n_resamples=300, seed=2)
    est = interval.excess_removed_difference(base, a, b, fp, boot)
    ea, eb = interval.excess_removed(base, a, fp, boot), interval.excess_removed(base, b, fp, boot)
    assert est.value == pytest.approx(ea.value - eb.value)
    assert est.lo <= est.value <= est.hi and est.distinguishable(0.0)
    same = interval.excess_removed_difference(base, a, a, fp, boot)
    assert same.value == same.lo == same.hi == 0.0 and not same.distinguishable(0.0)


def test_unpaired_units_refused():
    with pytest.raises(ValueError, match="same units"):
        interval.ppl_ratio(_nll(0, blocks=5), _nll(1, blocks=6))


def test_median_and_share_resample_prompts_with_all_their_runs():
    steps = np.array([[1, 2], [30, 40], [128, 128]])
    est = interval.median(steps)
    assert est.value == pytest.approx(np.median(steps)) and est.units == 3
    s = interval.share([[False, True], [True, True], [False, False]])
    assert s.value == pytest.approx(0.5) and 0 <= s.lo <= s.hi <= 1


def test_format_and_bad_config():
    est = interval.Estimate(1.0, 0.5, 2.0, 3)
    assert f"{est:.2f}" == "1.00 [0.50, 2.00]"
    with pytest.raises(ValueError):
        Bootstrap(level=1.5)
    with pytest.raises(ValueError):
        Bootstrap().draws(0)


def test_one_unit_is_refused_by_the_shared_check():
    interval.check_units(2)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        interval.check_units(1)


def test_no_excess_over_fp_gives_an_undefined_fraction_not_a_number():
    """A baseline below fp has no excess to remove: NaN value and interval, never 'distinguishable'."""
    fp = _nll(8)
    est = interval.excess_removed(fp - 0.1, fp - 0.05, fp)
    assert math.isnan(est.value) and math.isnan(est.lo) and math.isnan(est.hi)
    assert not est.distinguishable()


def test_flat_vectors_and_unpaired_tokens_are_refused():
    with pytest.raises(ValueError, match="flat vector"):
        interval.perplexity(np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="same tokens"):
        interval.ppl_ratio(_nll(0), _nll(1)[:, :5])


def test_empty_and_nan_inputs_get_the_modules_message():
    with pytest.raises(ValueError, match="at least one unit"):
        interval.median([])
    with pytest.raises(ValueError, match="at least one unit"):
        interval.share([])
    with pytest.raises(ValueError, match="NaN"):
        interval.median([1.0, float("nan"), 3.0])


def test_ratio_of_means_resamples_each_units_pair_together():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(1, 2, 30), rng.uniform(2, 4, 30)
    boot = interval.Bootstrap(n_resamples=500, seed=7)
    est = interval.ratio_of_means(a, b, boot)
    idx = boot.draws(30)  # (resample, unit): a unit's a and b drawn together
    lo, hi = np.quantile(a[idx].mean(1) / b[idx].mean(1), [0.025, 0.975])
    assert est.value == pytest.approx(a.mean() / b.mean(), rel=1e-12)
    assert (est.lo, est.hi) == pytest.approx((lo, hi), rel=1e-12) and est.units == 30


def test_ratio_of_means_needs_the_same_units():
    with pytest.raises(ValueError, match="same units"):
        interval.ratio_of_means([1.0, 2.0], [1.0, 2.0, 3.0])


def test_an_undefined_value_has_no_interval():
    base = torch.tensor([[1.01, 1.0], [1.99, 2.0]])  # the baseline's excess over fp: 0.005 in one block, -0.005 in the other
    fp = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    est = interval.excess_removed(base, fp, fp)  # no excess overall: undefined, and so is its interval
    assert math.isnan(est.value) and math.isnan(est.lo) and math.isnan(est.hi)  # was lo = hi = 1.0


def test_spearman_matches_scipy_and_its_interval_moves_with_the_pairs():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = -0.6 * x + rng.normal(size=40)
    y[:3] = y[3]  # ties
    est = interval.spearman(x, y)
    assert est.value == pytest.approx(spearmanr(x, y).statistic) and est.units == 40
    assert est.lo < est.value < est.hi < 0  # clearly negative at n = 40
    assert interval.spearman(x, rng.normal(size=40)).distinguishable(0) is False
    with pytest.raises(ValueError, match="same units"):
        interval.spearman(x, y[:-1])
    with pytest.raises(ValueError, match="at least"):
        interval.spearman(x[:1], y[:1])
    # (unit, run): each unit's runs are drawn together; rho itself is the rho of every pair
    xs, ys = x.reshape(10, 4), y.reshape(10, 4)
    clustered = interval.spearman(xs, ys)
    assert clustered.value == pytest.approx(est.value) and clustered.units == 10
    assert clustered.hi - clustered.lo > 0
    # a better predictor of y against a worse one, paired on the same draws
    better = interval.spearman_difference(y + 0.1 * rng.normal(size=40), x, y)
    assert better.value == pytest.approx(interval.spearman(y + 0.1 * rng.normal(size=40), y).value - est.value, abs=0.05)
    assert better.lo > 0
    same = interval.spearman_difference(x, x, y)
    assert same.value == 0 and same.lo == same.hi == 0


def test_auto_spec_follows_the_interval_width():
    from atlas_core.interval import Estimate, auto_spec, format_estimate

    assert format_estimate(Estimate(104.3195, 78.7532, 137.6599, 8), "auto") == "104 [79, 138]"
    assert format_estimate(Estimate(1.00123, 1.00071, 1.00168, 8), "auto") == "1.00123 [1.00071, 1.00168]"
    assert f"{Estimate(0.9572, 0.76, 1.31, 5):auto}" == "0.96 [0.76, 1.31]"
    assert auto_spec(1.0, 1.0) == ".3f" and auto_spec(float("nan"), 1.0) == ".3f"
    assert auto_spec(0.0, 1e-8) == ".6f"  # capped
    assert auto_spec(1.05, 1.05 + 1e-15) == ".3f"  # a width of float rounding is no width


def test_a_printed_zero_carries_no_sign():
    from atlas_core.glue import estimate_text, number
    from atlas_core.interval import Estimate, unsigned_zero

    assert unsigned_zero("-0.000") == "0.000" and unsigned_zero("+0.000%") == "0.000%" and unsigned_zero("-0") == "0"
    assert unsigned_zero("-0.001") == "-0.001" and unsigned_zero("+0.5") == "+0.5" and unsigned_zero("0.000") == "0.000"
    assert estimate_text(0.011, -0.00004, 0.022, "+.3f") == "+0.011 [-0.00004, +0.022]"  # 0 is inside: shown
    assert estimate_text(0.011, 0.0003, 0.022, "+.3f") == "+0.011 [+0.0003, +0.022]"  # 0 is outside: shown
    assert estimate_text(0.011, 0.0, 0.022, "+.3f") == "+0.011 [0.000, +0.022]"  # a true zero stays a zero
    assert estimate_text(0.02, -0.00004, 0.04, "+.1%") == "+2.0% [-0.004%, +4.0%]"
    assert number(-1e-9, "+.3%") == "0.000%"
    assert format(Estimate(1e-7, -1e-7, 2e-7, 3), "+.3f") == "0.000"  # no spread at this precision: the value alone
    assert format(Estimate(1.117, 1.1168, 1.1172, 3), ".1%") == "111.7%"


def test_every_interval_follows_one_set_of_number_rules():
    """One format per figure: a sign on every number of a signed quantity, × on every number of a ratio,
    thousands as integers with separators, three significant figures for SIG3, ", " between the bounds."""
    from atlas_core.glue import estimate_text, times_text, with_ci
    from atlas_core.interval import SIG3, Estimate, format_estimate, interval_text

    assert with_ci(-0.050, (-0.247, 0.154)) == "-0.050 [-0.247, +0.154]"  # the upper bound keeps its sign
    assert format_estimate(Estimate(-0.0055, -0.0122, 0.00124, 4)) == "-0.0055 [-0.0122, +0.00124]"
    assert estimate_text(0.05, 0.01, 0.09, ".2f") == "0.05 [0.01, 0.09]"  # nothing negative: no signs added
    assert times_text(1.43, 1.05, 1.61) == "1.43× [1.05×, 1.61×]"
    assert interval_text(157.941, 123.824, 194.003, SIG3) == "158 [124, 194]"
    assert interval_text(23.730, 21.41, 26.32, SIG3) == "23.7 [21.4, 26.3]"
    assert interval_text(869.049, 729.752, 1029.18, SIG3) == "869 [730, 1,029]"
    assert interval_text(2449442.0, 1738801.0, 3536008.0, SIG3) == "2,449,442 [1,738,801, 3,536,008]"
    assert interval_text(float("nan"), 1.0, 2.0, SIG3) == "— [1.00, 2.00]"
    for text in (estimate_text(16476.0, 12048.0, 23392.0, ".3f"), interval_text(1.5, 1.0, 2.0, ".2f")):
        assert " to " not in text and text.count(", ") == 1
    assert interval_text(0.2311, -0.05, 0.52, "+" + SIG3) == "+0.231 [-0.050, +0.520]"
    assert interval_text(1.0012, 1.0007, 1.0017, "+auto") == "+1.0012 [+1.0007, +1.0017]"
