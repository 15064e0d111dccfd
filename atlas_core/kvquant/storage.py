"""Key codes compared at equal storage: the Pareto set of perplexity against measured bits, and the
equal-storage verdict against KIVI (issue 19).

Storage is what a real cache held at the end of a run (``experiment.evaluate``'s ``bits_key``/``bits_value``:
codes, fp16 scales and zeros, side codes and the fp windows, counted from the tensors), never a formula. Two
methods are "at equal storage" when their measured bits per key element differ by at most ``TOLERANCE``
bits; a method "fits" a storage when it holds no more than that plus ``TOLERANCE``. Every perplexity
carries its 95% paired block-bootstrap interval (``atlas_core.interval``), and the equal-storage verdict
rests on the paired difference to KIVI: a difference whose interval contains 0 is "not distinguishable".
"""

from __future__ import annotations

import math
from dataclasses import replace

from atlas_core import interval
from atlas_core.claims import direction, lower_verdict
from atlas_core.interval import Estimate
from atlas_core.kvquant.experiment import KVMethod, Runs
from atlas_core.kvquant.quant import check_bits

__all__ = ["FAMILIES", "NEW_CODES", "TOLERANCE", "as_json", "at_storage", "budget_methods", "equal_storage", "family",
           "pareto_front", "pareto_methods", "pareto_rows", "study", "study_methods", "versus"]

NEW_CODES = ("query-tc", "hadamard", "random-rotation")  # the key codes of issue 19 (``KVMethod.method``)
TOLERANCE = 1e-3  # bits per key element: measured storages closer than this are equal


def pareto_methods(kbits=(2, 3), group: int = 32, values: bool = False, rank: int = 8, pre_rope: bool = True) -> list[KVMethod]:
    """Every method of the Pareto figure at the given key bits: baselines, HeadQ and the new key codes.

    Args:
        kbits: key bits of each family (the transform code's budget is kbits + 32/group bits per key element,
            the per-channel quantizer's own storage).
        group: quantization group (channels per token, or tokens per channel).
        values: False: K-only (values dense); True: values per token at the key bits (full KV).
        rank: HeadQ's side-code rank.
        pre_rope: include the pre-RoPE methods (False for a model without RoPE, e.g. GPT-2, which refuses them).
    Returns:
        fp first, then per family and bits: per-token, KIVI, KIVI with Lloyd-Max grids, KIVI pre-RoPE,
        HeadQ (query basis), HeadQ (whitened basis), Hadamard, random rotation, query-aware transform coding
        (uniform, Lloyd-Max and static grids, post- and pre-RoPE).
    Raises:
        ValueError: a setting ``KVMethod`` refuses (bits outside 1..8, group or rank < 1).
    """
    out = [KVMethod(method="fp")]
    for b in kbits:
        v = b if values else None
        common = dict(kbits=b, vbits=v, group=group)
        out += [KVMethod(method="per-token", **common), KVMethod(method="kivi", **common),
                KVMethod(method="kivi", grid="lloyd-max", **common), KVMethod(method="kivi", pre_rope=True, **common),
                KVMethod(method="headq", rank=rank, **common), KVMethod(method="headq", rank=rank, basis="whitened", **common),
                KVMethod(method="hadamard", **common), KVMethod(method="random-rotation", **common),
                KVMethod(method="query-tc", **common), KVMethod(method="query-tc", grid="lloyd-max", **common),
                KVMethod(method="query-tc", grid="static", **common), KVMethod(method="query-tc", pre_rope=True, **common)]
    return [m for m in out if pre_rope or not m.pre_rope]


def family(method: KVMethod) -> str:
    """The curve a method belongs to on the Pareto figure: its name, grid, basis and RoPE side, not its bits."""
    name = method.method
    if getattr(method, "basis", "query") == "whitened":
        name += " (whitened)"
    if getattr(method, "grid", "uniform") != "uniform":
        name += f" {method.grid}"
    return name + (" pre-RoPE" if method.pre_rope else "")


def pareto_rows(runs: Runs, methods: list[KVMethod]) -> list[dict]:
    """One row per method: label, family, measured bits per key and value element, perplexity with interval.

    Args:
        runs: the evaluations (each method run once, on the same blocks).
        methods: what to show (``pareto_methods``).
    Returns:
        [{"label", "family", "method" (``KVMethod``), "bits_key", "bits_value", "ppl" (``Estimate``),
        "on_front" (bool, ``pareto_front``)}], in the order given.
    """
    rows = [{"label": runs(m)["label"], "family": family(m), "method": m, "bits_key": runs(m)["bits_key"],
             "bits_value": runs(m)["bits_value"], "ppl": runs(m)["ppl"]} for m in methods]
    front = set(pareto_front([(r["label"], r["bits_key"] + r["bits_value"], r["ppl"].value) for r in rows]))
    return [r | {"on_front": r["label"] in front} for r in rows]


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the points no other point dominates (no more bits and lower perplexity, or fewer bits and no
    higher perplexity), sorted by bits.

    Args:
        points: [(label, bits, perplexity)].
    """
    front = []
    for label, bits, ppl in sorted(points, key=lambda p: (p[1], p[2])):
        if not front or ppl < front[-1][2]:
            front.append((label, bits, ppl))
    return [label for label, _, _ in front]


def at_storage(runs: Runs, reference: KVMethod, candidates: list[KVMethod]) -> list[KVMethod]:
    """The candidates whose measured bits per key element and per value element fit the reference's."""
    ref = runs(reference)
    fits = lambda r: all(r[k] <= ref[k] + TOLERANCE for k in ("bits_key", "bits_value"))  # noqa: E731
    return [m for m in candidates if fits(runs(m))]


def equal_storage(runs: Runs, candidates: list[KVMethod], kbits: int = 2, group: int = 32, values: bool = False) -> dict:
    """The best candidate key code within the storage KIVI-``kbits`` actually holds, against KIVI and fp.

    The reference is ``KVMethod(method="kivi", kbits, group, vbits)`` with its measured bits; the best
    candidate is the one of lowest perplexity among those that fit that storage (``at_storage``). Its
    excess removed is (PPL_KIVI − PPL_best)/(PPL_KIVI − PPL_fp), and the verdict rests on the paired
    difference PPL_best − PPL_KIVI.

    Args:
        runs: the evaluations on one set of blocks.
        candidates: the new key codes (``KVMethod``) to choose from.
        kbits, group: KIVI's key bits and group; values: full KV (values at ``kbits``) or K-only.
    Returns:
        {"best": label, "best_method": ``KVMethod``, "bits_key", "bits_value", "ppl" (``Estimate``),
        "kivi": {"label", "bits_key", "bits_value", "ppl"}, "ppl_fp" (``Estimate``), "excess_removed"
        (``Estimate``), "difference" (``Estimate``, PPL_best − PPL_KIVI), "verdict" (a sentence),
        "fits": labels of every candidate that fit}.
    Raises:
        ValueError: no candidate fits KIVI's storage.
    """
    kivi = KVMethod(method="kivi", kbits=kbits, group=group, vbits=kbits if values else None)
    fitting = at_storage(runs, kivi, candidates)
    if not fitting:
        raise ValueError(f"no candidate holds at most KIVI-{kbits}'s {runs(kivi)['bits_key']:.3f} bits per key element")
    best = min(fitting, key=lambda m: runs(m)["ppl"].value)
    fp, boot = KVMethod(method="fp"), runs.setup.boot
    nll_best, nll_kivi, nll_fp = runs.nll(best), runs.nll(kivi), runs.nll(fp)
    removed = interval.excess_removed(nll_kivi, nll_best, nll_fp, boot)
    diff = interval.ppl_difference(nll_best, nll_kivi, boot)
    return {"best": runs(best)["label"], "best_method": best, "bits_key": runs(best)["bits_key"],
            "bits_value": runs(best)["bits_value"], "ppl": runs(best)["ppl"],
            "kivi": {"label": runs(kivi)["label"], "bits_key": runs(kivi)["bits_key"],
                     "bits_value": runs(kivi)["bits_value"], "ppl": runs(kivi)["ppl"]},
            "ppl_fp": runs(fp)["ppl"], "excess_removed": removed, "difference": diff,
            "verdict": _verdict(runs(best)["label"], removed, diff),
            "fits": [runs(m)["label"] for m in fitting]}


def _verdict(label: str, removed: Estimate, diff: Estimate) -> str:
    found = direction(diff, 0.0)
    share = f"{removed.value:.1%} [{removed.lo:.1%}, {removed.hi:.1%}]" if not math.isnan(removed.value) else "an undefined share"
    if found == "lower":
        return f"{label} is lower than KIVI at the same storage: it removes {share} of KIVI's excess over fp"
    if found == "higher":
        return f"{label} is higher than KIVI at the same storage (removes {share} of KIVI's excess)"
    return f"{label} and KIVI are not distinguishable at this sample size (removes {share} of KIVI's excess)"


def versus(runs: Runs, method: KVMethod, others: list[KVMethod]) -> dict[str, str]:
    """``claims.lower_verdict`` of ``method`` against each of ``others`` (paired, the same blocks): {label: text}."""
    boot = runs.setup.boot
    return {runs(o)["label"]: lower_verdict(runs.nll(method), runs.nll(o), runs(method)["label"], runs(o)["label"], boot).text
            for o in others}


def as_json(entry):
    """``equal_storage``'s entry (or ``study``'s result, or any nesting of dicts and lists) as plain JSON data:
    every ``Estimate`` as {value, lo, hi, units}, no ``KVMethod`` (a list of them is dropped too), dict keys
    as strings (``study``'s key bits)."""
    def method_like(v):
        return isinstance(v, KVMethod) or (isinstance(v, list) and v and all(isinstance(m, KVMethod) for m in v))

    def plain(x):
        if isinstance(x, Estimate):
            return x.as_dict()
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items() if not method_like(v)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(entry)


def budget_methods(method: KVMethod, budgets) -> list[KVMethod]:
    """``method`` at each budget (bits per key element, codes + scales + zeros): a query-tc curve."""
    return [replace(method, budget=float(b)) for b in budgets]


def study_methods(kbits=(2, 3), group: int = 32, values: bool = False, rank: int = 8,
                  families: tuple[str, ...] | None = None, pre_rope: bool = True, d_head: int | None = None) -> list[KVMethod]:
    """The methods ``study`` runs: ``pareto_methods`` cut to ``families``, with the references every verdict reads.

    fp and KIVI (uniform grid) at each bits are always kept (the equal-storage reference), and per-token at each
    bits when query-tc is kept (``versus`` pairs query-tc with it).

    Args:
        kbits: distinct key bits, each 1..8; group, values, rank: as ``pareto_methods``.
        families: ``FAMILIES`` names to keep; None: every family the model can run.
        pre_rope: whether the model has RoPE; False drops the pre-RoPE families (and refuses them when named).
        d_head: the model's head width, if known: hadamard is dropped (refused when named) unless it is a power
            of two, and every kept method is checked on it (``KVMethod.check_head``: per-token groups divide it,
            HeadQ's rank is at most it).
    Raises:
        ValueError: no or repeated key bits; an unknown family; a family named that the model cannot run (pre-RoPE
            without RoPE, hadamard on heads not a power of two wide); any setting ``KVMethod`` refuses.
    """
    kbits = tuple(kbits)
    if not kbits or len(set(kbits)) != len(kbits):
        raise ValueError(f"key bits (--bits) must name one or more distinct widths, got {list(kbits)}")
    for b in kbits:
        check_bits(b, "key bits (--bits)")
    if families is not None:
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise ValueError(f"families must be among {FAMILIES}, got {list(families)}")
    cannot = {f: "the model has no RoPE (GPT-2): pre-RoPE keys do not apply" for f in FAMILIES
              if f.endswith("pre-RoPE") and not pre_rope}
    if d_head is not None and d_head & (d_head - 1):
        cannot["hadamard"] = f"the Walsh-Hadamard rotation needs d_head a power of two, got {d_head}"
    for f in families or ():
        if f in cannot:
            raise ValueError(f"families: {f!r} cannot run on this model: {cannot[f]}")
    methods = [m for m in pareto_methods(kbits, group, values, rank, pre_rope) if family(m) not in cannot]
    if families is not None:
        wanted = set(families) | {"kivi"} | ({"per-token"} if "query-tc" in families else set())
        methods = [m for m in methods if m.method == "fp" or family(m) in wanted]
    for m in methods if d_head is not None else ():
        m.check_head(d_head)
    return methods


def study(runs: Runs, kbits=(2, 3), group: int = 32, values: bool = False, families: tuple[str, ...] | None = None,
          rank: int = 8, progress=None, pre_rope: bool | None = None) -> dict:
    """The whole equal-storage comparison on one model: every method's row, and per key bits the best new key
    code against KIVI at KIVI's measured storage, and query-tc against per-token and KIVI at the same bits.

    Args:
        runs: the evaluations (calibration blocks given: the new codes calibrate on them).
        kbits: key bits of the families (each b is compared with KIVI-b).
        group: quantization group; values: full KV (values at the key bits) or K-only.
        families: keep only these ``family`` names (``study_methods``: fp, KIVI, and per-token beside query-tc,
            are always kept); None: every method the model can run.
        rank: HeadQ's side-code rank.
        progress: a callable wrapping an iterable (e.g. tqdm), or None.
        pre_rope: whether to run the pre-RoPE methods; None: when the model has RoPE (not GPT-2). The methods
            are checked on the model's head width (``study_methods``' d_head).
    Returns:
        {"methods": the ``KVMethod`` list run, "rows": ``pareto_rows``, "equal_storage": {b: ``equal_storage``
        entry (None when no new code fits)}, "versus": {b: ``versus`` of query-tc-b against per-token-b and
        KIVI-b ({} when query-tc is not run)}}.
    Raises:
        ValueError: as ``study_methods``.
    """
    if pre_rope is None:
        pre_rope = runs.lm.spec.family != "gpt2"
    methods = study_methods(kbits, group, values, rank, families, pre_rope, runs.lm.spec.d_head)
    for m in (progress or (lambda x: x))(methods):
        runs(m)
    rows = pareto_rows(runs, methods)
    entries, against = {}, {}
    for b in kbits:
        cands = [m for m in methods if m.kbits == b and m.method in NEW_CODES]
        v = b if values else None
        try:
            entries[b] = equal_storage(runs, cands, kbits=b, group=group, values=values)
        except ValueError:
            entries[b] = None
        tc = KVMethod(method="query-tc", kbits=b, vbits=v, group=group)
        others = [KVMethod(method=m, kbits=b, vbits=v, group=group) for m in ("per-token", "kivi")]
        against[b] = versus(runs, tc, others) if any(m.canonical() == tc.canonical() for m in methods) else {}
    return {"methods": methods, "rows": rows, "equal_storage": entries, "versus": against}


FAMILIES = tuple(dict.fromkeys(family(m) for m in pareto_methods((2,))[1:]))  # every curve of the figure (CLI choices)
