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
