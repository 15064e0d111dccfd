"""Seeded, paired block bootstrap: the one place every quoted figure gets its 95% interval (SPEC §11).

The resampling unit is a block of text for teacher-forced figures and a prompt for greedy ones. A figure
is a statistic of per-unit sums: a perplexity is exp(Σ_units NLL / Σ_units tokens), a KL or top-1
agreement the ratio of the units' sums to their counts, so units of unequal length weigh by their tokens.
Methods compared with each other are measured on the same units and resampled *together*: one draw of
unit indices is shared by every method in a comparison (``draws``), so the interval of a difference or a
ratio reflects how the methods differ on the same text, not how the texts differ.

Each resample draws ``units`` indices with replacement (a NumPy ``Generator`` seeded with ``seed``); the
interval is the percentile interval of the statistic over ``n_resamples`` draws (Efron & Tibshirani 1993,
ch. 13). A comparison whose interval contains the null value (0 for a difference, 1 for a ratio) is "not
distinguishable at this sample size" (``Estimate.distinguishable``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["MIN_UNITS", "check_units", "Bootstrap", "Estimate", "UnitSums", "unit_sums", "perplexity", "ppl_ratio", "ppl_difference",
           "excess_removed", "excess_removed_difference", "mean", "mean_difference", "median", "ratio_of_means", "share", "format_estimate",
           "format_number", "interval_text", "number_spec", "SIG3"]


MIN_UNITS = 2  # one unit resamples to itself: a zero-width "interval" that would call any difference real


def check_units(n: int, what: str = "blocks") -> None:
    """Refuse a sample too small to carry an interval (the CLI, the chapters' checks and the library share it).

    Raises:
        ValueError: fewer than ``MIN_UNITS`` units.
    """
    if n < MIN_UNITS:
        raise ValueError(f"an interval needs at least {MIN_UNITS} {what} (the bootstrap resamples them; one resamples "
                         f"to itself), got {n}")


@dataclass(frozen=True, kw_only=True)
class Bootstrap:
    """How intervals are drawn: resamples, level and the seed of the unit draws (SPEC §11: 2,000, 95%)."""

    n_resamples: int = 2000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.n_resamples < 1:
            raise ValueError(f"n_resamples must be ≥ 1, got {self.n_resamples}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must lie in (0, 1), got {self.level}")

    def draws(self, units: int) -> np.ndarray:
        """(resample, unit) indices drawn with replacement; the same for every call with the same ``units``.

        Raises:
            ValueError: fewer than one unit.
        """
        if units < 1:
            raise ValueError("a bootstrap needs at least one unit (block or prompt)")
        return np.random.default_rng(self.seed).integers(0, units, size=(self.n_resamples, units))

    def interval(self, resampled: np.ndarray) -> tuple[float, float]:
        """Percentile interval of a statistic's resampled values (resample,); NaN draws are ignored."""
        tail = (1 - self.level) / 2
        resampled = np.asarray(resampled, dtype=np.float64)
        if np.isnan(resampled).all():  # undefined in every draw (e.g. no excess to remove)
            return math.nan, math.nan
        lo, hi = np.nanquantile(resampled, [tail, 1 - tail])
        return float(lo), float(hi)


DEFAULT = Bootstrap()


@dataclass(frozen=True)
class Estimate:
    """A figure, its interval and the number of resampled units."""

    value: float
    lo: float
    hi: float
    units: int

    def distinguishable(self, null: float = 0.0) -> bool:
        """True when the interval excludes ``null`` (0 for a difference, 1 for a ratio); False when undefined."""
        if any(math.isnan(x) for x in (self.value, self.lo, self.hi)):
            return False
        return not self.lo <= null <= self.hi

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "units": self.units}

    def __format__(self, spec: str) -> str:
        return format_estimate(self, spec or ".3g")


def auto_spec(lo: float, hi: float, digits: int = 2, max_decimals: int = 6) -> str:
    """A fixed-point format whose last decimal is the interval's ``digits``-th significant digit, so that the
    precision follows what the interval supports: a ratio 104.3 [78.8, 137.7] reads "104 [79, 138]" and one of
    1.00123 [1.00071, 1.00168] keeps its fifth decimal.

    Args:
        lo, hi: the interval's ends; digits: significant digits of its width (≥ 1).
    Returns:
        ".{n}f" with n = digits − 1 − floor(log10(hi − lo)), clipped to [0, max_decimals]; ".3f" when the width is
        0 (to within float rounding) or undefined.
    """
    width = hi - lo
    if not (math.isfinite(width) and width > 1e-9 * max(abs(lo), abs(hi), 1.0)):  # no width beyond float rounding
        return ".3f"
    return f".{min(max(digits - 1 - math.floor(math.log10(width)), 0), max_decimals)}f"


_SIGNED_ZERO = re.compile(r"[-+−]0(?:[.,]0*)?(?:e[-+]?0+)?(?:[%×])?")

SIG3 = "sig3"  # three significant figures (a perplexity: "158", "23.7", "16,476"); see ``number_spec``


def unsigned_zero(text: str) -> str:
    """A formatted number that rounds to zero, without its sign: "-0.000" → "0.000", "+0.000%" → "0.000%"
    (a sign on a printed zero says nothing and reads as a defect); any other text unchanged."""
    return text[1:] if _SIGNED_ZERO.fullmatch(text) else text


def format_number(x, spec: str = ".3f") -> str:
    """``x`` formatted with ``spec``; "—" for None, NaN or infinity (a figure that was not measured); a value
    that rounds to zero prints unsigned (``unsigned_zero``)."""
    if x is None or not np.isfinite(x):
        return "—"
    if spec.lstrip("+") == SIG3:  # three significant figures of this number (``number_spec``)
        spec = number_spec(spec, x, x, x)
    return unsigned_zero(format(x, spec))


def number_spec(spec: str, value, lo, hi) -> str:
    """The format spec the book's number rules give a figure "value [lo, hi]" asked for with ``spec``.

    The rules (Methods, "Number formats"), one place for every interval the book prints:
      * "auto": the precision the interval supports (``auto_spec``); ``SIG3``: three significant figures
        of the value (a perplexity); either may carry a leading "+"; any other spec is used as given.
      * a fixed-point figure of 1,000 or more prints as an integer with thousands separators (a failed
        run's perplexity reads in the thousands: "16,476 [12,048, 23,392]").
      * a signed quantity prints a sign on every number: when any of the three is negative, "+" is added
        ("−0.050 [−0.247, +0.154]", not "−0.050 [−0.247, 0.154]"); a bound of a signed interval that would
        print as zero but is not gets the digits that show its sign ("[−0.00004, +0.022]", not "[0.000, …]",
        so that a reader sees whether 0 is inside; ``interval_text``).
    Args:
        spec: a Python format spec (".3f", "+.1%", ".3g"), "auto" or ``SIG3``; value, lo, hi: the figure.
    Returns:
        the spec to format all three numbers with.
    """
    finite = [abs(x) for x in (value, lo, hi) if x is not None and np.isfinite(x)]
    sign, base = ("+", spec[1:]) if spec.startswith("+") else ("", spec)  # "+auto", "+sig3": a signed difference
    if base == "auto":
        spec = sign + auto_spec(lo, hi)
    elif base == SIG3:
        top = abs(value) if value is not None and np.isfinite(value) and value != 0 else max(finite, default=1.0) or 1.0
        spec = f"{sign}.{max(0, 2 - math.floor(math.log10(top)))}f"
    if spec.endswith("f") and "," not in spec and finite and max(finite) >= 1000:
        spec = ("+" if spec.startswith("+") else "") + ",.0f"
    negative = any(format_number(x, spec).startswith(("-", "−")) for x in (value, lo, hi))
    if negative and not spec.startswith(("+", "-", " ")):
        spec = "+" + spec
    return spec


def interval_text(value, lo, hi, spec: str = ".3g") -> str:
    """"value [lo, hi]": the three numbers in one format (``number_spec``), the bounds after ", "; "—" for a
    number that was not measured; the value alone when all three print the same (an interval with no spread
    at this precision says nothing a bare value does not: "111.7%", not "111.7% [111.7%, 111.7%]")."""
    spec = number_spec(spec, value, lo, hi)
    shown = [format_number(x, spec) for x in (value, lo, hi)]
    if shown[0] != "—" and shown[0] == shown[1] == shown[2]:  # no spread at this precision (a count, a ceiling)
        return shown[0]
    if any(re.search(r"[1-9]", t) for t in shown):  # an interval that is not all zeros: show its bounds' signs
        shown[1:] = [_bound(lo, spec), _bound(hi, spec)]
    return f"{shown[0]} [{shown[1]}, {shown[2]}]"


def _bound(x, spec: str) -> str:
    """A bound of a signed interval that would print as zero but is not, with the digits that show its sign
    ("-0.00004", not "0.000": whether 0 lies inside is what a verdict on a difference reads)."""
    text = format_number(x, spec)
    if not (spec.startswith("+") and spec[-1] in "f%" and x and np.isfinite(x) and not re.search(r"[1-9]", text)):
        return text
    scale = 100.0 if spec.endswith("%") else 1.0
    return format_number(x, f"+.{-math.floor(math.log10(abs(x) * scale))}{spec[-1]}")


def format_estimate(est: Estimate, spec: str = ".3g") -> str:
    """"value [lo, hi]" of an Estimate, each number formatted by ``spec`` under the book's rules
    (``interval_text``; e.g. ".2f", ".1%", "auto", ``SIG3``)."""
    return interval_text(est.value, est.lo, est.hi, spec)


@dataclass(frozen=True)
class UnitSums:
    """Per-unit sums and counts of a per-token quantity: total (unit,) and count (unit,)."""

    total: np.ndarray
    count: np.ndarray

    def __post_init__(self):
        if self.total.shape != self.count.shape or self.total.ndim != 1:
            raise ValueError(f"total and count must be equal (unit,) vectors, got {self.total.shape} and {self.count.shape}")
        if (self.count <= 0).any():
            raise ValueError("every unit must hold at least one token")

    def __len__(self) -> int:
        return len(self.total)

    def mean(self) -> float:
        return float(self.total.sum() / self.count.sum())

    def resampled_mean(self, idx: np.ndarray) -> np.ndarray:
        """Ratio of sums over each draw of units, (resample,)."""
        return self.total[idx].sum(1) / self.count[idx].sum(1)


def unit_sums(values) -> UnitSums:
    """Per-unit sums of a per-token quantity (NLL, KL, 0/1 agreement, discarded mass).

    Args:
        values: a (unit, token) tensor or array, or a sequence of per-unit 1-D ones (lengths may differ);
            NaN entries (positions that do not count) are left out of both the sum and the count.
    Returns:
        ``UnitSums`` in float64.
    """
    if isinstance(values, UnitSums):
        return values
    if getattr(values, "ndim", 2) != 2 and not isinstance(values, (list, tuple)):
        raise ValueError(f"pass per-token values as (unit, token) or a list of per-unit vectors, got shape "
                         f"{tuple(values.shape)}: a flat vector would make every token its own unit")
    total, count = [], []
    for row in values:
        r = row.detach().double().cpu().numpy() if hasattr(row, "detach") else np.asarray(row, dtype=np.float64)  # a torch tensor
        r = r.ravel()
        keep = ~np.isnan(r)
        total.append(r[keep].sum())
        count.append(keep.sum())
    return UnitSums(np.asarray(total, dtype=np.float64), np.asarray(count, dtype=np.float64))


def _paired(*parts: UnitSums) -> int:
    n = len(parts[0])
    if any(len(p) != n for p in parts):
        raise ValueError(f"paired figures need the same units for every method, got {[len(p) for p in parts]} units")
    if any(not np.array_equal(p.count, parts[0].count) for p in parts):
        raise ValueError("paired figures need the same tokens in every unit for every method (counts differ)")
    return n


def _estimate(value: float, resampled: np.ndarray, units: int, boot: Bootstrap) -> Estimate:
    """An Estimate; an undefined value (NaN: e.g. no excess to remove) has an undefined interval too (a few
    draws can define the statistic where the whole sample does not, and would give a bare [lo, hi])."""
    lo, hi = boot.interval(resampled) if math.isfinite(value) or math.isinf(value) else (math.nan, math.nan)
    return Estimate(float(value), lo, hi, units)


def estimate(value: float, resampled, units: int, boot: Bootstrap = DEFAULT) -> Estimate:
    """An ``Estimate`` from a statistic's value and its values on ``boot``'s draws (resample,), for statistics
    computed elsewhere on the same draws (``boot.draws(units)``)."""
    return _estimate(value, resampled, units, boot)


def perplexity(nll, boot: Bootstrap = DEFAULT) -> Estimate:
    """Perplexity exp(Σ NLL / Σ tokens) with its block-bootstrap interval.

    Args:
        nll: per-token NLL in nats, (block, token) or per-block vectors, or their ``UnitSums``.
    """
    s = unit_sums(nll)
    idx = boot.draws(len(s))
    return _estimate(math.exp(s.mean()), np.exp(s.resampled_mean(idx)), len(s), boot)


def ppl_ratio(nll_a, nll_b, boot: Bootstrap = DEFAULT) -> Estimate:
    """PPL_a / PPL_b on the same blocks, paired; distinguishable when the interval excludes 1."""
    a, b = unit_sums(nll_a), unit_sums(nll_b)
    idx = boot.draws(_paired(a, b))
    return _estimate(math.exp(a.mean() - b.mean()), np.exp(a.resampled_mean(idx) - b.resampled_mean(idx)), len(a), boot)


def ppl_difference(nll_a, nll_b, boot: Bootstrap = DEFAULT) -> Estimate:
    """PPL_a − PPL_b on the same blocks, paired; distinguishable when the interval excludes 0."""
    a, b = unit_sums(nll_a), unit_sums(nll_b)
    idx = boot.draws(_paired(a, b))
    diff = np.exp(a.resampled_mean(idx)) - np.exp(b.resampled_mean(idx))
    return _estimate(math.exp(a.mean()) - math.exp(b.mean()), diff, len(a), boot)


def excess_removed(nll_base, nll_method, nll_fp, boot: Bootstrap = DEFAULT) -> Estimate:
    """(PPL_base − PPL_method)/(PPL_base − PPL_fp), the three paired on the same blocks.

    1 = all of the baseline's excess perplexity removed, 0 = none. A draw where the baseline does not
    exceed fp leaves the fraction undefined (NaN) and out of the percentiles.
    """
    base, method, fp = (unit_sums(x) for x in (nll_base, nll_method, nll_fp))
    idx = boot.draws(_paired(base, method, fp))
    pb, pm, pf = (np.exp(s.resampled_mean(idx)) for s in (base, method, fp))
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(pb > pf, (pb - pm) / (pb - pf), np.nan)
    vb, vm, vf = (math.exp(s.mean()) for s in (base, method, fp))
    value = (vb - vm) / (vb - vf) if vb > vf else math.nan  # no excess over fp: nothing to remove
    return _estimate(value, frac, len(base), boot)


def excess_removed_difference(nll_base, nll_a, nll_b, nll_fp, boot: Bootstrap = DEFAULT) -> Estimate:
    """excess_removed(a) − excess_removed(b) = (PPL_b − PPL_a)/(PPL_base − PPL_fp), the four paired.

    How much more of the baseline's excess method a removes than method b (e.g. a fitted frame against a
    random one); distinguishable when the interval excludes 0. Draws where the baseline does not exceed fp
    are NaN and left out, as in ``excess_removed``.
    """
    base, a, b, fp = (unit_sums(x) for x in (nll_base, nll_a, nll_b, nll_fp))
    idx = boot.draws(_paired(base, a, b, fp))
    pbase, pa, pb, pf = (np.exp(s.resampled_mean(idx)) for s in (base, a, b, fp))
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.where(pbase > pf, (pb - pa) / (pbase - pf), np.nan)
    vbase, va, vb, vf = (math.exp(s.mean()) for s in (base, a, b, fp))
    value = (vb - va) / (vbase - vf) if vbase != vf else math.nan
    return _estimate(value, diff, len(base), boot)


def mean(values, boot: Bootstrap = DEFAULT) -> Estimate:
    """Token-weighted mean of a per-token quantity (KL, 0/1 agreement, discarded mass) over units."""
    s = unit_sums(values)
    return _estimate(s.mean(), s.resampled_mean(boot.draws(len(s))), len(s), boot)


def mean_difference(values_a, values_b, boot: Bootstrap = DEFAULT) -> Estimate:
    """mean(a) − mean(b) on the same units, paired."""
    a, b = unit_sums(values_a), unit_sums(values_b)
    idx = boot.draws(_paired(a, b))
    return _estimate(a.mean() - b.mean(), a.resampled_mean(idx) - b.resampled_mean(idx), len(a), boot)


def share(flags: Sequence[bool], boot: Bootstrap = DEFAULT) -> Estimate:
    """Share of units where a flag holds (e.g. prompts identical through the horizon), prompts resampled."""
    idx = boot.draws(len(flags))
    x = np.asarray(flags, dtype=np.float64).reshape(len(flags), -1)  # (unit, run)
    return _estimate(x.mean(), x[idx].reshape(len(idx), -1).mean(1), len(x), boot)


def median(values, boot: Bootstrap = DEFAULT, statistic: Callable = np.median) -> Estimate:
    """Median (or another ``statistic``) of per-unit values, (unit,) or (unit, run): each drawn unit
    brings all its runs (runs that share a prompt are resampled together)."""
    idx = boot.draws(len(values))
    x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)  # (unit, run)
    if np.isnan(x).any():
        raise ValueError("median: NaN among the per-unit values; drop or resolve them first")
    return _estimate(float(statistic(x.ravel())), statistic(x[idx].reshape(len(idx), -1), axis=1), len(x), boot)


def _ratio_of_interleaved(x: np.ndarray, axis=None) -> np.ndarray:
    """mean(a)/mean(b) of interleaved (a, b) values (..., 2·unit), a ``statistic`` for ``median``."""
    return x[..., 0::2].mean(-1) / x[..., 1::2].mean(-1)


def ratio_of_means(a, b, boot: Bootstrap = DEFAULT) -> Estimate:
    """mean(a) / mean(b) over paired units, each drawn unit bringing its a and its b.

    Args:
        a, b: (unit,) per-unit values measured on the same units (e.g. one (layer, head) pair's attention
            KL under two key quantizers).
    Returns:
        ``Estimate`` of the ratio with its percentile interval (units resampled with replacement).
    Raises:
        ValueError: a and b of different lengths, or NaN among them (``median``'s message).
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"ratio_of_means needs a and b on the same units, got {a.size} and {b.size} values")
    return median(np.stack([a, b], axis=1), boot, statistic=_ratio_of_interleaved)  # (unit, 2)


def spearman(x, y, boot: Bootstrap = DEFAULT) -> Estimate:
    """Spearman's rho of paired values (e.g. heads' intrinsic dimension against their overlap), pairs resampled.

    Each draw takes n units with replacement and ranks their pairs afresh (average ranks for ties); a draw
    whose x or y is constant has no rho and is left out of the percentiles. With (unit, run) input each
    drawn unit brings all its runs (e.g. a head measured under several quantizers: the runs of one head are
    not independent, so the head is the unit). The units are treated as exchangeable, so the interval says
    how much rho moves with the units drawn, not with the text.

    Args:
        x, y: (unit,) or (unit, run) values of the same units and runs, units >= ``MIN_UNITS``, no NaN.
    Returns:
        ``Estimate`` of rho (the plain Spearman rho of all pairs) with its percentile interval.
    Raises:
        ValueError: x and y of different lengths, fewer than ``MIN_UNITS`` pairs, or NaN among them.
    Source: Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), §6 (the paired bootstrap of a
    correlation coefficient).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim not in (1, 2) or np.isnan(x).any() or np.isnan(y).any():
        raise ValueError(f"spearman needs x and y of the same units (and runs) without NaN, got shapes "
                         f"{x.shape} and {y.shape}")
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)  # (unit, run)
    check_units(len(x), "units")
    idx = boot.draws(len(x))  # (resample, unit)

    return _estimate(float(_rho(_flat(x)[None], _flat(y)[None])[0]), _rho(_flat(x[idx]), _flat(y[idx])), len(x), boot)


def spearman_difference(x_a, x_b, y, boot: Bootstrap = DEFAULT) -> Estimate:
    """rho(x_a, y) − rho(x_b, y) on the same drawn units: does predictor a rank y better than predictor b?

    Args:
        x_a, x_b, y: (unit,) or (unit, run) values of the same units and runs (as ``spearman``).
    Returns:
        ``Estimate`` of the difference of the two Spearman rhos with its paired percentile interval.
    Raises:
        ValueError: shapes differ, NaN, or fewer than ``MIN_UNITS`` units.
    """
    a, b = spearman(x_a, y, boot), spearman(x_b, y, boot)  # validates; same draws (the seed fixes them)
    xa, xb, yy = (np.asarray(t, dtype=np.float64).reshape(len(t), -1) for t in (x_a, x_b, y))
    idx = boot.draws(len(yy))
    resampled = _rho(_flat(xa[idx]), _flat(yy[idx])) - _rho(_flat(xb[idx]), _flat(yy[idx]))
    return _estimate(a.value - b.value, resampled, len(yy), boot)


def _flat(t: np.ndarray) -> np.ndarray:
    """(..., unit, run) -> (..., unit·run)."""
    return t.reshape(*t.shape[:-2], -1)


def _rho(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis, (..., n) pairs -> (...); NaN where a side is constant."""
    from scipy.stats import rankdata

    rx = rankdata(xs, axis=-1) - (xs.shape[-1] + 1) / 2
    ry = rankdata(ys, axis=-1) - (ys.shape[-1] + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant draw: 0 / 0 = NaN
        return (rx * ry).sum(-1) / np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
