"""The A² value policy lowers output error at an equal bit budget."""

import pytest
import torch

from atlas_core.kvquant import policy
from atlas_core.kvquant.quant import QuantSpec, dequantize, quantize


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


def _one_hot_probs(n: int, targets) -> torch.Tensor:
    """(query, key) attention putting all of query i's weight on key targets[i]."""
    return torch.nn.functional.one_hot(torch.tensor(targets), n).float()


def test_value_policy_errors_oracle_keeps_the_key_the_judged_queries_read():
    # 8 keys, 8 queries: the first half reads key 1, the judged second half reads key 0 only. At 3.75 bits
    # a2_bits keeps ⌊1.75·8/14⌋ = 1 token in full precision: the oracle (w from every query) keeps key 0 and
    # its judged error is exactly 0; the causal policy (first half only) keeps key 1 and pays key 0's 2-bit error.
    n, d = 8, 32
    probs = torch.stack([_one_hot_probs(n, [1, 1, 1, 1, 0, 0, 0, 0])] * 2)[None]  # (block, head, query, key)
    v = torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(0))  # (block, kv_head, key, d_head)
    errs = policy.value_policy_errors(probs, v, torch.tensor([0, 0]), budget=3.75, group=32, seed=0)
    assert list(errs) == ["uniform 2b", "uniform 3.75b", "A² (oracle)", "A² (causal)", "random tokens fp"]
    two_bit = policy.quantize_tokens(v[0, 0], torch.full((n,), 2), 32)
    key0_error = (two_bit[0] - v[0, 0, 0]).norm().item()  # every judged query reads key 0 alone
    assert errs["A² (oracle)"] == 0.0
    assert abs(errs["A² (causal)"] - key0_error) < 1e-6 and abs(errs["uniform 2b"] - key0_error) < 1e-6
    three_bit = quantize(v[0, 0], QuantSpec(bits=3, group=32, axis="token"))
    uniform = (dequantize(three_bit, QuantSpec(bits=3, group=32, axis="token"))[0] - v[0, 0, 0]).norm().item()
    assert abs(errs["uniform 3.75b"] - uniform) < 1e-6  # the uniform row spends ⌊budget⌋ bits
    assert errs["random tokens fp"] in (0.0, errs["uniform 2b"])  # one random fp token: key 0 or another


def test_value_policy_errors_reads_each_kv_groups_own_heads():
    # Two KV heads; head 0 (KV 0) reads key 2, head 1 (KV 1) reads key 5, in every query. With one fp token
    # per KV head, the oracle keeps exactly the key its own group reads: zero error for both.
    n, d = 8, 32
    probs = torch.stack([_one_hot_probs(n, [2] * n), _one_hot_probs(n, [5] * n)])[None]  # (1, head, query, key)
    v = torch.randn(1, 2, n, d, generator=torch.Generator().manual_seed(1))
    errs = policy.value_policy_errors(probs, v, torch.tensor([0, 1]), budget=3.75, group=32, seed=0)
    assert errs["A² (oracle)"] == 0.0 and errs["A² (causal)"] == 0.0 and errs["uniform 2b"] > 0
    swapped = policy.value_policy_errors(probs, v, torch.tensor([1, 0]), budget=3.75, group=32, seed=0)
    assert swapped["A² (oracle)"] == 0.0  # still the group's own keys, whichever KV head it is


def test_value_policy_errors_per_block_average_to_the_overall_mean():
    gen = torch.Generator().manual_seed(2)
    probs = torch.rand(3, 4, 8, 8, generator=gen).tril().softmax(-1)  # (block, head, query, key)
    v = torch.randn(3, 2, 8, 32, generator=gen)
    whole = policy.value_policy_errors(probs, v, torch.tensor([0, 0, 1, 1]), budget=3, group=32, seed=0)
    blocks = policy.value_policy_errors(probs, v, torch.tensor([0, 0, 1, 1]), budget=3, group=32, seed=0, per_block=True)
    assert list(blocks) == list(whole) and all(b.shape == (3,) for b in blocks.values())
    for name in whole:
        assert abs(blocks[name].mean() - whole[name]) < 1e-9, name
    assert len({tuple(b) for b in blocks.values()}) > 1  # the blocks differ: something to resample


def test_value_policy_errors_refuses_a_budget_below_two_bits():
    probs = _one_hot_probs(4, [0, 1, 2, 3])[None, None]
    with pytest.raises(ValueError, match="below the low precision"):
        policy.value_policy_errors(probs, torch.zeros(1, 1, 4, 8), torch.tensor([0]), budget=1.5, group=8, seed=0)
