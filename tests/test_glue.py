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
