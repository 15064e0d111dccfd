"""prefixed_glue: keys get the chapter prefix, numpy scalars become Python numbers, g returns None (no stray output)."""

import myst_nb
import numpy as np

from atlas_core.glue import prefixed_glue


def test_prefix_and_python_numbers(monkeypatch):
    seen = []
    monkeypatch.setattr(myst_nb, "glue", lambda key, value, display: seen.append((key, value, display)))
    g = prefixed_glue("kv")
    assert g("ppl", np.float64(2.5)) is None and g("label", "fp") is None
    assert seen == [("kv_ppl", 2.5, False), ("kv_label", "fp", False)]
    assert type(seen[0][1]) is float


def test_formatting_helpers():
    from atlas_core.glue import glue_key, listing, number, span, with_ci

    assert glue_key("xa", "qwen2.5-coder-0.5b", "o_h") == "xa_qwen2_5_coder_0_5b_o_h"
    assert glue_key("ppl", "Qwen/Qwen2.5", 7) == "ppl_Qwen_Qwen2_5_7"
    assert number(0.28449) == "0.284" and number(np.float64(2.0), ".1f") == "2.0"
    assert number(None) == number(float("nan")) == number(float("inf")) == "—"
    assert with_ci(0.2911, (0.2849, 0.298)) == "0.291 [0.285, 0.298]" and with_ci(None, None) == "—"
    assert with_ci(1.5, [1.0, 2.25], ".2f") == "1.50 [1.00, 2.25]"
    assert [listing(x) for x in ([], ["a"], ["a", "b"], ["a", "b", "c"])] == [
        "none in this run", "a", "a and b", "a, b and c"]
    assert listing([], empty="none") == "none"
    assert span([0.2811, 0.2814], ".3f") == "0.281" and span([-0.012, 0.031], "+.3f") == "-0.012 to +0.031"
    assert span([], ".2f") == "n/a"


def test_estimates_and_rows_are_glued_with_their_intervals():
    from atlas_core.glue import Glue, estimate_text, row_interval
    from atlas_core.interval import Estimate

    seen = []
    g = Glue("nqp", glue=lambda key, value, display: seen.append((key, value)))
    g.estimate("ppl_rtn_3", Estimate(value=475.2, lo=377.6, hi=580.9, units=16), ".2f")
    assert seen == [("nqp_ppl_rtn_3", 475.2), ("nqp_ppl_rtn_3_lo", 377.6), ("nqp_ppl_rtn_3_hi", 580.9),
                    ("nqp_ppl_rtn_3_ci", "475.20 [377.60, 580.90]")]
    seen.clear()
    g.row("pg_recall", {"index_recall": 0.5, "index_recall_lo": 0.4, "index_recall_hi": np.float32(0.6)}, "index_recall")
    assert [k for k, _ in seen] == ["nqp_pg_recall", "nqp_pg_recall_lo", "nqp_pg_recall_hi"]
    assert all(type(v) is float for _, v in seen)
    assert estimate_text(16476.0, 12048.0, 23392.0, ".2f") == "16,476 [12,048, 23,392]"  # failed runs: no decimals
    assert estimate_text(999.0, 12.0, 1200.0, ",.1f") == "999.0 [12.0, 1,200.0]"  # one separator for every interval
    assert estimate_text(float("nan"), float("nan"), float("nan"), ".2f") == "— [—, —]"
    assert row_interval({"kl": 0.04, "kl_lo": 0.03, "kl_hi": 0.05}, "kl", ".3f") == "0.040 [0.030, 0.050]"


def test_jsonable_writes_estimates_as_their_figures():
    from atlas_core.cache import jsonable
    from atlas_core.interval import Estimate

    assert jsonable({"a": Estimate(value=1.0, lo=0.5, hi=2.0, units=3)}) == {
        "a": {"value": 1.0, "lo": 0.5, "hi": 2.0, "units": 3}}


def test_results_json_is_strict_undefined_figures_are_null(tmp_path):
    import json

    from atlas_core.cache import write_json

    write_json(tmp_path / "r.json", {"excess_removed": {"value": float("nan"), "lo": 1.0}, "x": [float("inf"), 2.0]})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"excess_removed": {"value": None, "lo": 1.0}, "x": [None, 2.0]}
