"""The decode benchmark runs end to end on a toy model; its memory figures are measured from the bytes held."""

from atlas_core.book.cli import main
from atlas_core.kvquant.bench import bench_kvquant


def test_bench_reports_every_cache_and_its_memory():
    r = bench_kvquant("toy-llama", n_ctx=96, steps=2, rounds=1, group=8, rank=2, chunk=32)
    caches = r["caches"]
    assert set(caches) == {"fp", "per-token", "kivi", "headq"} and caches["fp"]["ratio_vs_fp"] == 1.0
    assert all(c["step_s"] > 0 for c in caches.values()) and r["headq_vs_per_token"] > 0
    assert caches["fp"]["held_bits_per_element"] == 32.0  # fp32 keys and values, measured
    for name in ("per-token", "kivi", "headq"):
        assert caches[name]["storage_bytes"] * 4 < caches["fp"]["held_bytes"]  # 2-bit codes vs fp32
        assert caches[name]["held_bits_per_element"] < 16 and caches[name]["memo_bytes"] == 0
    assert caches["headq"]["held_bits_per_element"] > caches["per-token"]["held_bits_per_element"]


def test_cli_bench_kvquant_rejects_bad_input(capsys):
    assert main(["bench", "kvquant", "--model", "toy-llama", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
