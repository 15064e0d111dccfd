import pytest
import torch

from atlas_core.sparse.kept import SparseConfig, kept_mask
from atlas_core.sparse.kernels import bytes_read, dense_decode, page_decode, paged_cache, reference_decode, topk_decode
from atlas_core.sparse.pages import page_mask


def _cache(heads, kv_heads, n, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, d, generator=gen), torch.randn(kv_heads, n, d, generator=gen),
            torch.randn(kv_heads, n, d, generator=gen))


def _in_model_keep(q, keys, cfg, selector):
    """The kept set the in-model attention would use for the newest token (the kernels' reference)."""
    n, d = keys.shape[1], keys.shape[2]
    query = q[None, :, None]  # (1, head, 1, d_head)
    key = keys.repeat_interleave(q.shape[0] // keys.shape[0], 0)[None]  # (1, head, key, d_head)
    q_pos, k_pos, visible = torch.tensor([n - 1]), torch.arange(n), torch.ones(1, 1, 1, n, dtype=torch.bool)
    if selector == "exact":
        fixed, chosen = kept_mask(query @ key.transpose(-1, -2) * d**-0.5, visible, q_pos, k_pos, cfg)
    else:
        fixed, chosen = page_mask(query, key, d**-0.5, visible, q_pos, k_pos, cfg)
    return (fixed | chosen)[0, :, 0]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("n", [10, 77, 300])
def test_sparse_kernels_equal_the_reference(heads, kv_heads, n):
    cfg = SparseConfig(anchors=2, window=16, topk=12, page_size=8)
    q, keys, values = _cache(heads, kv_heads, n)
    expected = reference_decode(q, keys, values, _in_model_keep(q, keys, cfg, "exact"))
    torch.testing.assert_close(topk_decode(q, keys, values, cfg), expected, atol=1e-5, rtol=1e-5)
    expected = reference_decode(q, keys, values, _in_model_keep(q, keys, cfg, "pages"))
    torch.testing.assert_close(page_decode(q, paged_cache(keys, values, 8), cfg), expected, atol=1e-5, rtol=1e-5)


def test_dense_kernel_equals_the_reference():
    q, keys, values = _cache(6, 2, 200)
    everything = torch.ones(6, 200, dtype=torch.bool)
    torch.testing.assert_close(dense_decode(q, keys, values), reference_decode(q, keys, values, everything), atol=1e-5, rtol=1e-5)


def test_a_budget_covering_the_cache_is_dense():
    q, keys, values = _cache(4, 2, 50)
    cfg = SparseConfig(anchors=1, window=60, topk=4, page_size=8)
    torch.testing.assert_close(topk_decode(q, keys, values, cfg), dense_decode(q, keys, values), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(page_decode(q, paged_cache(keys, values, 8), cfg), dense_decode(q, keys, values), atol=1e-5, rtol=1e-5)


def test_bytes_read_known_answers():
    cfg = SparseConfig(anchors=1, window=64, topk=32, page_size=16)
    n, h, hk, d = 1024, 9, 3, 64
    row = d * 4
    assert bytes_read("dense", n, h, hk, d, cfg) == 2 * hk * n * row
    assert bytes_read("topk", n, h, hk, d, cfg) == hk * n * row + hk * 65 * row + h * 32 * row
    middle_pages = -(-(n - 64) // 16) - 0  # middle keys 1..959 -> pages 0..59
    assert bytes_read("pages", n, h, hk, d, cfg) == 2 * hk * middle_pages * row + 2 * hk * 65 * row + 2 * h * 32 * row
    with pytest.raises(ValueError, match="kind"):
        bytes_read("magic", n, h, hk, d, cfg)


@pytest.mark.parametrize("anchors, page_size", [(1, 16), (0, 16), (3, 8), (1, 5)])  # middle keys straddle pages differently
@pytest.mark.parametrize("extra", [-1, 0, 1])  # cache = budget − 1, budget, budget + 1 keys
def test_decode_kernels_at_the_budget_boundary(anchors, page_size, extra):
    """With no more middle keys than k, both sparse kernels are dense attention (anchors 1, window 4,
    top-k 16, pages of 16, 21 keys: the page kernel used to keep one page and drop a key)."""
    cfg = SparseConfig(anchors=anchors, window=4, topk=16, page_size=page_size)
    n = cfg.budget + extra
    q, keys, values = _cache(4, 2, n, seed=n + anchors)
    dense = dense_decode(q, keys, values)
    sparse = {"exact": topk_decode(q, keys, values, cfg), "pages": page_decode(q, paged_cache(keys, values, page_size), cfg)}
    for selector, out in sparse.items():
        if extra <= 0:
            torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
        expected = reference_decode(q, keys, values, _in_model_keep(q, keys, cfg, selector))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bytes_read_when_nothing_is_dropped():
    cfg = SparseConfig(anchors=1, window=4, topk=16, page_size=16)
    row, n = 16 * 4, 21  # 16 middle keys: no summaries, every middle key and value read
    assert bytes_read("pages", n, 4, 2, 16, cfg) == 2 * 2 * 5 * row + 2 * 4 * 16 * row
    assert bytes_read("pages", n + 1, 4, 2, 16, cfg) == 2 * 2 * 2 * row + 2 * 2 * 5 * row + 2 * 4 * 16 * row
