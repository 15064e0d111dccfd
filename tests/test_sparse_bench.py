import pytest
import torch

from atlas_core.sparse.bench import bench_sparse_decode, page_recall, speedup_estimate
from atlas_core.sparse.kept import SparseConfig


def test_bench_reports_every_kernel_and_ratio():
    r = bench_sparse_decode(contexts=(512, 1024), heads=4, kv_heads=2, d_head=16, rounds=2, steps=2)
    assert [row["n"] for row in r["rows"]] == [512, 1024]
    for row in r["rows"]:
        assert row["dense_s"] > 0 and row["topk_s"] > 0 and row["pages_s"] > 0
        assert row["speedup_pages"] == pytest.approx(row["dense_s"] / row["pages_s"])
        assert row["speedup_pages_lo"] <= row["speedup_pages"] <= row["speedup_pages_hi"]
        assert row["bytes_ratio_pages"] > row["bytes_ratio_topk"] > 1
        assert 0 <= row["index_recall"] <= 1


def test_speedup_interval_pairs_rounds():
    """median(dense) / median(kernel) with an interval from resampling rounds in pairs: equal rounds give a
    degenerate interval; a machine whose speed drifts over rounds but hits both kernels alike still gives the
    ratio exactly, while unpaired noise widens it."""
    est = speedup_estimate([2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0])
    assert (est.value, est.lo, est.hi, est.units) == (2.0, 2.0, 2.0, 4)
    drift = speedup_estimate([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert drift.value == 2.0 and drift.lo <= 2.0 <= drift.hi
    noisy = speedup_estimate([2.0, 2.4, 1.6, 2.2, 1.8, 2.0], [1.0, 0.9, 1.1, 1.0, 1.05, 0.95])
    assert noisy.lo < noisy.value < noisy.hi
    with pytest.raises(ValueError, match="same rounds"):
        speedup_estimate([1.0, 2.0], [1.0])


def test_bench_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        bench_sparse_decode(contexts=(512,), heads=5, kv_heads=2)
    with pytest.raises(ValueError, match="budget"):
        bench_sparse_decode(contexts=(64,))


def test_pages_of_one_key_recall_everything():
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(4, 16, generator=gen), torch.randn(2, 300, 16, generator=gen)
    r = page_recall(q, keys, SparseConfig(anchors=1, window=8, topk=10, page_size=1))
    assert r == {"index_recall": 1.0, "mass_recall": 1.0}


def test_certified_bench_reports_ratios_certificate_and_oracle():
    from atlas_core.sparse.bench import bench_certified_decode

    cfg = SparseConfig(selector="certified", eps=1e-2, bound="min", rank=4, window=16, page_size=8)
    r = bench_certified_decode((512, 1024), cfg, heads=4, kv_heads=2, d_head=16, rounds=1, steps=1)
    for row in r["rows"]:
        assert row["speedup_certified"] == pytest.approx(row["dense_s"] / row["certified_s"])
        assert row["violations"] == 0 and row["m"] <= row["certificate"] + 1e-12 <= cfg.eps + 1e-12
        assert 0 < row["oracle_key_bytes"] <= 1 and row["oracle_key_bytes"] <= row["key_bytes"] + 1e-9
        assert 0 <= row["topk_mass_recall"] <= 1


def test_certified_bench_on_real_keys_tiles_past_the_prompt(tmp_path, monkeypatch):
    from atlas_core.sparse.bench import bench_certified_decode
    from atlas_core.sparse.realkeys import real_keys

    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    real = real_keys("toy-llama", (256, 512), n_query=2)
    cfg = SparseConfig(selector="certified", eps=1e-2, window=16, page_size=8, bound="minmax")
    r = bench_certified_decode((256, 512, 1024), cfg, real, rounds=1, steps=1)
    assert [row["tiled"] for row in r["rows"]] == [False, False, True]
    assert [row["queries"] for row in r["rows"]] == [2, 2, 1]
    assert all(row["violations"] == 0 for row in r["rows"])
    with pytest.raises(ValueError, match="no queries at context 300"):
        bench_certified_decode((300,), cfg, real, rounds=1, steps=1)
    with pytest.raises(ValueError, match="selector='certified'"):
        bench_certified_decode((256,), SparseConfig(), real)


def test_cli_certified_bench_prints_json_and_refuses_a_rank_without_residual(capsys):
    import json

    from atlas_core.book.cli import main

    base = ["bench", "sparse-decode", "--selector", "certified", "--context", "512", "--heads", "4", "--kv-heads", "2",
            "--d-head", "16", "--rounds", "1", "--steps", "1", "--window", "16", "--page-size", "8", "--eps", "0.01"]
    assert main([*base, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["n"] == 512 and row["violations"] == 0 and "speedup_certified" in row
    assert main([*base, "--rank", "16", "--bound", "lowrank"]) == 2
    assert "rank (16) must be below d_head (16)" in capsys.readouterr().err
    assert main(["sparse", "--model", "toy-llama", "--selector", "certified", "--rank", "16", "--bound", "min",
                 "--prompt-tokens", "128", "--gen-tokens", "8", "--seq-len", "128", "--eval-tokens", "256", "--window", "8"]) == 2
    assert "--rank (16) must be below d_head (16)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["sparse", "--model", "toy-llama", "--eps", "0.5"], "--eps goes with --selector certified"),
    (["sparse", "--model", "toy-llama", "--selector", "pages", "--bound", "centroid"], "--bound goes with --selector certified"),
    (["sparse", "--model", "toy-llama", "--selector", "certified", "--topk", "5"], "--topk does not apply to --selector certified"),
    (["sparse", "--model", "toy-llama", "--selector", "certified", "--head-average"], "head_average does not apply"),
    (["bench", "sparse-decode", "--context", "512", "--eps", "0.5"], "--eps goes with --selector certified"),
    (["bench", "sparse-decode", "--context", "512", "--max-pages", "3"], "--max-pages goes with --selector certified"),
])
def test_cli_refuses_flags_that_do_not_apply(argv, message, capsys):
    """Each was silently ignored before (the fresh-user test of issue 18)."""
    from atlas_core.book.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
