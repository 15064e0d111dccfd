"""The A² value policy lowers output error at an equal bit budget."""

import torch

from atlas_core.kvquant import policy


def test_a2_weights():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # (query, key)
    assert torch.allclose(policy.a2_weights(a), torch.tensor([1.25, 0.25]))


def test_a2_bits_respects_the_budget():
    w = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 0.0, 0.0, 0.0])
    bits = policy.a2_bits(w, budget=2 + 14 * 2 / 8, low=2, high=16)
    assert bits.tolist() == [2, 16, 2, 16, 2, 2, 2, 2]
    assert bits.float().mean() <= 5.5


def test_a2_policy_beats_uniform_at_equal_budget():
    gen = torch.Generator().manual_seed(0)
    n_q, n_k, d = 32, 64, 32
    logits = torch.randn(n_q, n_k, generator=gen)
    logits[:, :4] += 5.0  # a few heavy tokens, as attention sinks are
    a = torch.softmax(logits, dim=-1)
    v = torch.randn(n_k, d, generator=gen)
    uniform = policy.quantize_tokens(v, torch.full((n_k,), 3), group=32)
    bits = policy.a2_bits(policy.a2_weights(a), budget=3.0, low=2, high=16)
    assert bits.float().mean() <= 3.0
    a2 = policy.quantize_tokens(v, bits, group=32)
    err_uniform = policy.value_output_error(a, v, uniform).mean()
    err_a2 = policy.value_output_error(a, v, a2).mean()
    assert err_a2 < 0.7 * err_uniform
