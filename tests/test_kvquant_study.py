"""The offline key-error study: layer names, block split, key configurations and per-head error rows."""

import pytest
import torch

from atlas_core.kvquant import headq, metrics
from atlas_core.kvquant.quant import QuantSpec, dequantize, quantize
from atlas_core.kvquant.study import error_rows, key_variants, split_blocks, study_layers


def test_study_layers_names_and_indices():
    assert study_layers("first,middle,last", 5) == [0, 2, 4]
    assert study_layers("last, 0, -1", 5) == [0, 4]  # distinct, sorted, negative from the end
    assert study_layers("first,middle,last", 2) == [0, 1]


@pytest.mark.parametrize("text,message", [("5", "does not exist"), ("-6", "does not exist"), ("deep", "neither"),
                                          ("", "neither")])
def test_study_layers_refuses_layers_the_model_lacks(text, message):
    # before: int(t) % n_layers silently read layer 5 of a 5-layer model as layer 0
    with pytest.raises(ValueError, match=message):
        study_layers(text, 5)


def test_split_blocks_puts_each_block_on_its_own_row():
    blocks = [torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]  # (head, token, d)
    out = split_blocks(torch.cat(blocks, 1), 2)  # extract's (head, block·token, d)
    assert out.shape == (3, 2, 7, 4) and torch.equal(out[:, 1], blocks[1])
    with pytest.raises(ValueError, match="equal blocks"):
        split_blocks(torch.zeros(3, 15, 4), 2)


def _setup(n_kv=2, n_block=2, n_token=16, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n_kv, n_block, n_token, d, generator=gen)
    q = torch.randn(n_kv, 64, d, generator=gen) * torch.linspace(3, 0.1, d)  # anisotropic queries
    sigma = torch.einsum("hnd,hne->hde", q, q) / q.shape[1]  # (kv_head, d, d)
    basis = torch.linalg.eigh(sigma).eigenvectors.flip(-1)  # largest first
    return k, sigma, basis


def test_key_variants_rows_are_the_named_quantizers():
    k, sigma, basis = _setup()
    out = key_variants(k, bits=[2, 4], group=8, query_basis=basis, sigma_q=sigma, rank=4, side_bits=4, null_dirs=4, seed=1)
    assert list(out) == ["per-token 2b", "KIVI 2b", "per-token 4b", "KIVI 4b", "HeadQ 2b", "random basis 2b",
                         "key-PCA basis 2b", "null-space"]
    kivi = QuantSpec(bits=4, group=8, axis="channel")
    assert torch.equal(out["KIVI 4b"], dequantize(quantize(k, kivi), kivi))
    base = QuantSpec(bits=2, group=8, axis="token")
    side = headq.SideCode(bases={0: basis[..., :4]}, bits=4)
    block1 = headq.headq_keys(k[:, 1:2].transpose(0, 1), base, side, basis[..., :4])[0]  # each block quantized alone
    assert torch.allclose(out["HeadQ 2b"][:, 1], block1)
    assert all(v.shape == k.shape for v in out.values())


def test_key_variants_headq_in_a_full_basis_recovers_the_keys():
    # rank = d_head with 8-bit side codes: the side code carries the whole 2-bit error, so keys come back
    k, sigma, basis = _setup()
    out = key_variants(k, bits=[2], group=8, query_basis=basis, sigma_q=sigma, rank=16, side_bits=8, null_dirs=4, seed=0)
    err_hq = (out["HeadQ 2b"] - k).pow(2).mean()
    assert err_hq < 0.01 * (out["per-token 2b"] - k).pow(2).mean()


def test_key_variants_null_space_noise_is_invisible_to_the_strong_query_directions():
    k, sigma, basis = _setup(n_token=64)
    out = key_variants(k, bits=[2], group=8, query_basis=basis, sigma_q=sigma, rank=4, side_bits=4, null_dirs=4, seed=0)
    noise = out["null-space"] - k  # (kv_head, block, token, d)
    strong = basis[..., :12]  # the 12 strongest of 16 directions: the noise lives in the 4 weakest
    assert torch.einsum("hbtd,hdr->hbtr", noise, strong).abs().max() < 1e-4
    mse_2b = (out["per-token 2b"] - k).pow(2).mean()
    assert 0.8 < (noise.pow(2).mean() / mse_2b).item() < 1.25  # sized to 2-bit per-token's key MSE


def test_key_variants_needs_two_bits():
    k, sigma, basis = _setup()
    with pytest.raises(ValueError, match="must include 2"):
        key_variants(k, bits=[3, 4], group=8, query_basis=basis, sigma_q=sigma, rank=4, side_bits=4, null_dirs=4, seed=0)


def test_error_rows_measure_each_head_against_its_kv_head():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 8, 16, generator=gen) for n in (4, 2, 2))  # 4 query heads on 2 KV heads
    kv_group = torch.tensor([0, 0, 1, 1])
    k_hat = k.clone()
    k_hat[1] += 0.3 * torch.randn(k[1].shape, generator=gen)  # only KV head 1 is perturbed
    mask = metrics.causal_mask(8, window=3)
    rows = error_rows(q, k, v, kv_group, {"same": k, "noisy": k_hat}, mask, 0.25)
    assert [(r["config"], r["head"]) for r in rows] == [(c, h) for c in ("same", "noisy") for h in range(4)]
    assert all(r["kl"] == 0 and r["key_mse"] == 0 for r in rows if r["config"] == "same" or r["head"] < 2)
    noisy = rows[4 + 2]
    assert noisy == {"head": 2, "config": "noisy", **metrics.key_error_report(q[2], k[1], k_hat[1], v[1], mask, 0.25)}
    assert noisy["kl"] > 0
