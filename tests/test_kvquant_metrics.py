"""Model-visible error metrics: shift invariance, second-order agreement with KL, the null space."""

import torch

from atlas_core.kvquant import metrics
from atlas_core.kvquant.headq import null_space_perturbation, query_covariance


def _qkv(n_q=6, n_k=10, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_q, d, generator=gen), torch.randn(n_k, d, generator=gen), torch.randn(n_k, d, generator=gen)


def test_constant_shift_is_invisible():
    q, k, v = _qkv()
    delta = torch.randn(16, generator=torch.Generator().manual_seed(5))
    k_hat = k + delta  # every key moved alike: each row of logits shifts by a constant
    r = metrics.key_error_report(q, k, k_hat, v)
    assert r["logit_mse"] > 0.1 and r["key_mse"] > 0.1
    assert r["fisher"] < 1e-10 and abs(r["kl"]) < 1e-6 and r["output_error"] < 1e-5


def test_fisher_matches_kl_to_second_order():
    q, k, v = _qkv(seed=1)
    for eps in (1e-2, 3e-3):
        k_hat = k + eps * torch.randn(k.shape, generator=torch.Generator().manual_seed(2))
        r = metrics.key_error_report(q.double(), k.double(), k_hat.double())
        assert abs(r["fisher"] / r["kl"] - 1) < 10 * eps


def test_masked_metrics_ignore_masked_keys():
    q, k, _ = _qkv(n_q=10, n_k=10)
    mask = metrics.causal_mask(10)
    k_hat = k.clone()
    k_hat[-1] += 100.0  # only the last query sees the last key
    e = metrics.logit_error(q, k, k_hat)
    a = metrics.probs(metrics.logits(q, k), mask)
    a_hat = metrics.probs(metrics.logits(q, k_hat), mask)
    assert torch.all(metrics.fisher_error(a, e)[:-1] == 0)
    assert torch.all(metrics.attention_kl(a, a_hat)[:-1].abs() < 1e-6)
    assert metrics.logit_mse(e, mask) > 0


def test_null_space_perturbation_moves_keys_not_attention():
    gen = torch.Generator().manual_seed(3)
    d, m = 16, 4
    basis = torch.linalg.qr(torch.randn(d, m, generator=gen))[0]
    q = torch.randn(2, 50, m, generator=gen) @ basis.T  # (head, point, d): queries live in a rank-4 span
    k = torch.randn(1, 30, d, generator=gen)  # (kv_head, key, d)
    sigma = query_covariance(q, torch.tensor([0, 0]), 1)
    k_pert = null_space_perturbation(k, sigma, d - m, size=5.0, seed=0)
    r = metrics.key_error_report(q[0], k[0], k_pert[0])
    assert r["key_mse"] > 10 and r["kl"] < 1e-8 and r["fisher"] < 1e-8


def test_causal_mask_matches_transformers_sliding_window_mask():
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    for n_query, n_key in ((6, 6), (3, 9), (1, 5)):
        offset = n_key - n_query  # query i sits at position i + offset
        for window in (None, 1, 2, 4, 100):
            fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
            q_idx, kv_idx = torch.arange(n_query)[:, None] + offset, torch.arange(n_key)[None]  # (query, 1), (1, key)
            ref = fn(torch.tensor(0), torch.tensor(0), q_idx, kv_idx).expand(n_query, n_key)
            assert torch.equal(metrics.causal_mask(n_query, n_key, window=window), ref), (n_query, n_key, window)


def test_causal_mask_refuses_an_empty_window():
    import pytest

    with pytest.raises(ValueError, match="sliding window"):
        metrics.causal_mask(4, window=0)
