import pytest

from atlas_core.clouds import CloudSpec
from atlas_core.measure import id_report, overlap_report
from atlas_core.models import load_model

SMALL = CloudSpec(corpus="pydoc", seq_len=64, n_blocks=3, n_points=120, seed=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))


def test_overlap_report_fields_and_gqa_split():
    r = overlap_report(load_model("toy-llama"), k=4, spec=SMALL, null_draws=100, n_boot=200, progress=False)
    assert r["pairs"] == "inter" and r["n_inter"] == 4 and r["n_intra"] == 2 and r["n_pairs"] == 4
    assert r["ci"][0] <= r["o_h"] <= r["ci"][1]
    assert r["d"] == 16 and r["k"] == 4 and r["n_points"] == 120
    assert r["z"] == pytest.approx((r["o_h"] - r["null_mean"]) / r["null_std"])


def test_overlap_on_c_adds_column_space_null():
    r = overlap_report(load_model("toy-gpt2"), k=4, residual="c", spec=SMALL, null_draws=100, n_boot=200, progress=False)
    assert r["d"] == 64 and r["colspace_null_mean"] is not None


def test_first8_and_errors():
    lm = load_model("toy-gpt2")
    r = overlap_report(lm, k=3, heads="first8", spec=SMALL, null_draws=50, n_boot=100, progress=False)
    assert r["n_heads"] == 4  # fewer than 8 heads: all of them
    with pytest.raises(ValueError, match="k = 16 must satisfy"):
        overlap_report(lm, k=16, spec=SMALL, progress=False)
    with pytest.raises(ValueError, match="layer"):
        overlap_report(lm, layer=9, spec=SMALL, progress=False)
    with pytest.raises(ValueError, match="head set"):
        overlap_report(lm, heads="some", spec=SMALL, progress=False)


def test_id_report_per_head():
    r = id_report(load_model("toy-mistral"), estimator="twonn", spec=SMALL, progress=False)
    assert len(r["per_head"]) == 4 and 0 < r["mean"] < 16
    with pytest.raises(ValueError, match="estimator"):
        id_report(load_model("toy-mistral"), estimator="nope", spec=SMALL, progress=False)
