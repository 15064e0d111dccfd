"""RoPE tables taken from the model: they reproduce its rotation, and unrotate inverts rotate."""

import pytest
import torch

from atlas_core.extract import extract
from atlas_core.kvquant import rope
from atlas_core.models import load_model


def test_tables_reproduce_the_models_rotation_and_invert(toy_lm):
    spec = toy_lm.spec
    if spec.family == "gpt2":
        with pytest.raises(ValueError, match="no rotary embedding"):
            rope.rotary_tables(toy_lm.model)
        return
    ids = torch.randint(4, 260, (1, 16), generator=torch.Generator().manual_seed(0))
    layers = list(range(spec.n_layers))
    acts = extract(toy_lm, ids, layers=layers, fields=("k", "k_pre"), progress=False)
    tables = rope.rotary_tables(toy_lm.model)
    cos, sin = None, None
    for layer in layers:
        cos, sin = tables[layer](torch.arange(16))  # (token, d_head)
        a = acts[layer]
        torch.testing.assert_close(rope.rotate(a.k_pre, cos, sin), a.k, atol=1e-5, rtol=0)
        torch.testing.assert_close(rope.unrotate(a.k, cos, sin), a.k_pre, atol=1e-5, rtol=0)


def test_gemma3_local_and_global_tables_differ():
    lm = load_model("toy-gemma3")
    tables = rope.rotary_tables(lm.model)
    local, glob = (tables[i](torch.arange(4, 8))[0] for i in (0, 1))  # layer 0 slides, layer 1 is global
    assert not torch.allclose(local, glob)


# ----------------------------------------------------------------------------------------------------------------
# The RoPE-averaged query covariance Σ̄ = E_Δ[M_Δᵀ Σ′_q M_Δ] (for keys coded before RoPE).


def _llama_tables():
    lm = load_model("toy-llama")  # d_head 16, rope_theta 10000: pair 0 turns 1 rad per token
    return lm, rope.rotary_tables(lm.model)[0]


def _spd(d, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + torch.eye(d, dtype=torch.float64)


def test_offset_rotation_is_the_logit_identity():
    """q_t·k_j (both rotated at their positions) = (q′_t @ M_{t−j})·k′_j: what Σ̄ is built on."""
    lm, cos_sin = _llama_tables()
    d = lm.spec.d_head
    gen = torch.Generator().manual_seed(0)
    q_pre, k_pre = torch.randn(20, d, generator=gen), torch.randn(20, d, generator=gen)
    cos, sin = cos_sin(torch.arange(20))
    q, k = rope.rotate(q_pre, cos, sin), rope.rotate(k_pre, cos, sin)  # (token, d_head), rotated at positions 0..19
    logits = q.double() @ k.double().T  # (query t, key j)
    m = rope.offset_rotations(cos_sin, torch.arange(20), d)  # (offset, d, d)
    for t, j in ((19, 0), (7, 3), (5, 5)):
        torch.testing.assert_close((q_pre[t].double() @ m[t - j]) @ k_pre[j].double(), logits[t, j], atol=1e-4, rtol=0)


def test_average_at_offset_zero_is_the_pre_rope_covariance():
    _, cos_sin = _llama_tables()
    sigma = _spd(16, 1)[None]  # (kv_head, d, d)
    torch.testing.assert_close(rope.rotation_average(sigma, cos_sin, torch.tensor([0])), sigma)


def test_average_is_symmetric_psd_and_keeps_the_trace():
    _, cos_sin = _llama_tables()
    sigma = torch.stack([_spd(16, 2), _spd(16, 3)])  # (kv_head, d, d)
    avg = rope.rotation_average(sigma, cos_sin, torch.arange(512))
    assert avg.shape == sigma.shape
    torch.testing.assert_close(avg, avg.transpose(-1, -2), atol=1e-10, rtol=0)
    assert torch.linalg.eigvalsh(avg).min() > 0
    torch.testing.assert_close(avg.diagonal(dim1=-2, dim2=-1).sum(-1), sigma.diagonal(dim1=-2, dim2=-1).sum(-1))  # s = 1
    assert (avg - sigma).abs().max() > 0.1  # averaging changed it: the checks above are not of the identity


def test_a_fast_pair_averages_to_a_multiple_of_the_identity():
    """Pair 0 (channels 0 and d/2) turns 1 rad a token: over 4096 offsets its 2×2 block's cross term and its
    anisotropy average away (to O(1/T)), leaving the mean of its two variances on the diagonal; the slowest
    pair (θ = 10000^(−7/8) ≈ 3.2e-4 rad a token) turns 1.3 rad in 4096 offsets and changes less."""
    _, cos_sin = _llama_tables()
    d, half = 16, 8
    sigma = _spd(d, 4)
    sigma[0, half] = sigma[half, 0] = sigma[0, half] + 0.5  # a cross term to lose (still PSD: _spd adds I)
    sigma[0, 0] += 1.0  # and an anisotropy
    avg = rope.rotation_average(sigma, cos_sin, torch.arange(4096))
    block = avg[[[0], [half]], [0, half]]  # pair 0's 2×2 block
    mean = (sigma[0, 0] + sigma[half, half]) / 2
    assert block[0, 1].abs() < 1e-3 * mean and (block[0, 0] - block[1, 1]).abs() < 2e-3 * mean
    torch.testing.assert_close(block[0, 0], mean, atol=1e-3 * mean.item(), rtol=0)
    assert abs(sigma[0, half]) > 0.1 * mean and abs(sigma[0, 0] - sigma[half, half]) > 0.1 * mean
    slow = avg[[[half - 1], [d - 1]], [half - 1, d - 1]]
    slow_before = sigma[[[half - 1], [d - 1]], [half - 1, d - 1]]
    assert (slow - slow_before).abs().max() < (block - sigma[[[0], [half]], [0, half]]).abs().max()


def test_pre_rope_queries_match_the_models_own_and_feed_the_average(toy_lm):
    """Un-rotating post-RoPE queries at their positions gives the model's own pre-RoPE queries (partial RoPE
    and Gemma3's local/global tables included), and the model-level Σ̄ is the per-layer formula."""
    spec = toy_lm.spec
    ids = torch.randint(4, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    if spec.family == "gpt2":
        with pytest.raises(ValueError, match="no rotary embedding"):
            rope.averaged_query_covariances(toy_lm, ids)
        return
    layers = list(range(spec.n_layers))
    acts = extract(toy_lm, ids, layers=layers, fields=("q", "q_pre"), progress=False)
    tables = rope.rotary_tables(toy_lm.model)
    sigma_bar = rope.averaged_query_covariances(toy_lm, ids)
    for layer in layers:
        q_pre = rope.pre_rope_queries(acts[layer].q, tables[layer], 16)
        torch.testing.assert_close(q_pre, acts[layer].q_pre, atol=1e-5, rtol=0)
        by_hand = rope.averaged_query_covariance(acts[layer].q_pre, acts[layer].kv_group, spec.n_kv_heads, tables[layer],
                                                 torch.arange(16))
        assert sigma_bar[layer].shape == (spec.n_kv_heads, spec.d_head, spec.d_head)
        torch.testing.assert_close(sigma_bar[layer], by_hand, atol=1e-4, rtol=1e-4)


def test_bad_offsets_and_blocks_are_refused():
    _, cos_sin = _llama_tables()
    for bad in (torch.tensor([], dtype=torch.long), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="offsets"):
            rope.rotation_average(torch.eye(16)[None], cos_sin, bad)
    with pytest.raises(ValueError, match="whole number of blocks"):
        rope.pre_rope_queries(torch.zeros(2, 10, 16), cos_sin, 4)
