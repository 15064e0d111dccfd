"""The decode benchmark runs end to end on a toy model and its memory figures agree with the accounting."""

import pytest

from atlas_core.cli import main
from atlas_core.kvquant.bench import bench_kvquant


def test_bench_reports_every_cache_and_memory_matches_accounting():
    r = bench_kvquant("toy-llama", n_ctx=96, steps=2, rounds=1, group=8, rank=2, chunk=32)
    caches = r["caches"]
    assert set(caches) == {"fp", "per-token", "kivi", "headq"} and caches["fp"]["ratio_vs_fp"] == 1.0
    assert all(c["step_s"] > 0 for c in caches.values()) and r["headq_vs_per_token"] > 0
    for name in ("per-token", "kivi", "headq"):  # d_head 16: packed rows are whole bytes
        assert caches[name]["held_bits_per_element"] == pytest.approx(caches[name]["accounted_bits_per_element"])
        assert caches[name]["storage_bytes"] * 4 < caches["fp"]["held_bytes"]  # 2-bit codes vs fp32
    assert caches["headq"]["held_bits_per_element"] > caches["per-token"]["held_bits_per_element"]


def test_cli_bench_kvquant_rejects_bad_input(capsys):
    assert main(["bench", "kvquant", "--model", "toy-llama", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
