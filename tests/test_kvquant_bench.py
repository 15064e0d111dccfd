"""The decode benchmark runs end to end on a toy model; its memory figures are measured from the bytes held."""

import json

import pytest

from atlas_core.book.cli import main
from atlas_core.kvquant import fused
from atlas_core.kvquant.bench import bench_kv_decode, bench_kvquant


def test_bench_reports_every_cache_and_its_memory():
    r = bench_kvquant("toy-llama", n_ctx=96, steps=2, rounds=3, group=8, rank=2, chunk=32)
    caches = r["caches"]
    for c in caches.values():  # median step over the fp's, with a paired interval over the 3 rounds
        assert 0 < c["ratio_vs_fp_lo"] <= c["ratio_vs_fp"] <= c["ratio_vs_fp_hi"]
        assert c["ratio_vs_fp"] == pytest.approx(c["step_s"] / caches["fp"]["step_s"])
    plain = {"fp", "per-token", "kivi", "headq"}
    assert set(caches) == (plain | {f"{m}-fused" for m in plain - {"fp"}} if fused.available() else plain)
    assert caches["fp"]["ratio_vs_fp"] == 1.0 and r["fused"] == fused.available()
    assert all(c["step_s"] > 0 for c in caches.values()) and r["headq_vs_per_token"] > 0
    assert caches["fp"]["held_bits_per_element"] == 32.0  # fp32 keys and values, measured
    if r["fused"]:
        assert r["headq_vs_per_token_fused"] > 0 and set(r["fused_vs_plain"]) == {"per-token", "kivi", "headq"}
        for name in ("per-token", "kivi", "headq"):  # the same storage fused or not
            assert caches[f"{name}-fused"]["held_bytes"] == caches[name]["held_bytes"]
    for name in ("per-token", "kivi", "headq"):
        assert caches[name]["storage_bytes"] * 4 < caches["fp"]["held_bytes"]  # 2-bit codes vs fp32
        assert caches[name]["held_bits_per_element"] < 16 and caches[name]["memo_bytes"] == 0
    assert caches["headq"]["held_bits_per_element"] > caches["per-token"]["held_bits_per_element"]


def test_cli_bench_kvquant_rejects_bad_input(capsys):
    assert main(["bench", "kvquant", "--model", "toy-llama", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.skipif(not fused.available(), reason="numba is not installed")
def test_kv_decode_bench_times_three_paths_and_counts_bytes(capsys):
    r = bench_kv_decode((96, 200), bits=3, heads=4, kv_heads=2, d_head=32, rounds=3, steps=1)
    assert [row["n"] for row in r["rows"]] == [96, 200]
    for row in r["rows"]:
        for ratio in ("speedup_vs_sdpa", "speedup_vs_dequant"):  # a paired interval over rounds, holding its value
            assert 0 < row[f"{ratio}_lo"] <= row[ratio] <= row[f"{ratio}_hi"]
        assert row["speedup_vs_sdpa"] == pytest.approx(row["sdpa_fp32_s"] / row["fused_s"])  # medians' ratio
        assert min(row["fused_s"], row["sdpa_fp32_s"], row["dequant_sdpa_s"]) > 0 and row["max_abs_diff"] < 1e-4
        n_q = (row["n"] - 32) // 32 * 32  # quantized tokens; the rest is the fp32 window
        codes = 2 * 2 * n_q * 32 * 3 // 8  # keys and values, 2 KV heads, 32 channels of 3 bits
        stats = 2 * 2 * 2 * (n_q // 32 * 32 + n_q * 1)  # fp16 scale+zero: keys per (group, channel), values per token
        assert row["bytes_fused"] == codes + stats + 2 * 2 * (row["n"] - n_q) * 32 * 4
        assert row["bytes_sdpa_fp32"] == 2 * row["n"] * 2 * 32 * 4
    assert main(["bench", "kv-decode", "--context", "64", "--heads", "2", "--kv-heads", "1", "--d-head", "32",
                 "--rounds", "1", "--steps", "1", "--json"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["rows"][0]["n"] == 64
