import pytest
import torch

from atlas_core.sparse.bench import bench_sparse_decode, page_recall
from atlas_core.sparse.kept import SparseConfig


def test_bench_reports_every_kernel_and_ratio():
    r = bench_sparse_decode(contexts=(512, 1024), heads=4, kv_heads=2, d_head=16, rounds=2, steps=2)
    assert [row["n"] for row in r["rows"]] == [512, 1024]
    for row in r["rows"]:
        assert row["dense_s"] > 0 and row["topk_s"] > 0 and row["pages_s"] > 0
        assert row["speedup_pages"] == pytest.approx(row["dense_s"] / row["pages_s"])
        assert row["bytes_ratio_pages"] > row["bytes_ratio_topk"] > 1
        assert 0 <= row["index_recall"] <= 1


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
