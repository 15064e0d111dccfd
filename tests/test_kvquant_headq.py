"""HeadQ: calibration, the logit identity, and the controls on a synthetic head with low-rank queries."""

import torch

from atlas_core.kvquant import headq, metrics
from atlas_core.kvquant.headq import SideCode
from atlas_core.kvquant.quant import QuantSpec, dequantize, quantize
from atlas_core.models import load_model

D, R = 32, 4


def _head(seed=0):
    """Queries concentrated in a rank-R subspace (plus a little noise); random keys."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, R, generator=gen))[0]
    q = 3 * torch.randn(2, 200, R, generator=gen) @ basis.T + 0.05 * torch.randn(2, 200, D, generator=gen)
    k = torch.randn(1, 1, 64, D, generator=gen)  # (batch, kv_head, key, d_head)
    return q, k  # q: (head, point, d_head), both heads in KV group 0


def _kl(q, k, k_hat):
    return metrics.key_error_report(q[0, :20], k[0, 0], k_hat[0, 0])["kl"]


def test_query_covariance_and_basis():
    q, _ = _head()
    sigma = headq.query_covariance(q, torch.tensor([0, 0]), 1)
    manual = q.reshape(-1, D).double().T @ q.reshape(-1, D).double() / 400
    assert torch.allclose(sigma[0], manual)
    u = headq.top_eigenvectors(sigma, R)  # (kv_head, d_head, r)
    assert torch.allclose(u[0].T @ u[0], torch.eye(R), atol=1e-5)
    captured = (q.reshape(-1, D) @ u[0]).pow(2).sum() / q.pow(2).sum()
    assert captured > 0.99


def test_side_code_is_an_additive_logit_correction():
    q, k = _head()
    spec = QuantSpec(bits=2, group=32, axis="token")
    u = headq.top_eigenvectors(headq.query_covariance(q, torch.tensor([0, 0]), 1), R)
    side = SideCode(bases={0: u}, bits=4)
    k_hat = dequantize(quantize(k, spec), spec)
    codes = headq.encode_side(k, k_hat, u, side.spec())
    c_hat = dequantize(codes, side.spec())  # (batch, kv_head, key, r)
    additive = q[0] @ k_hat[0, 0].T + (q[0] @ u[0]) @ c_hat[0, 0].T  # q·k̂ + (U_rᵀq)·ĉ
    folded = q[0] @ headq.apply_side(k_hat, codes, u, side.spec())[0, 0].T  # q·(k̂ + U_r ĉ)
    assert torch.allclose(additive, folded, atol=1e-4)


def test_headq_beats_base_and_controls():
    q, k = _head()
    spec = QuantSpec(bits=2, group=32, axis="token")
    sigma = headq.query_covariance(q, torch.tensor([0, 0]), 1)
    u = headq.top_eigenvectors(sigma, R)
    base = dequantize(quantize(k, spec), spec)
    kl = {
        "base": _kl(q, k, base),
        "headq": _kl(q, k, headq.headq_keys(k, spec, SideCode(bases={0: u}), u)),
        "wrong-sign": _kl(q, k, headq.headq_keys(k, spec, SideCode(bases={0: u}, sign=-1.0), u)),
        "random": _kl(q, k, headq.headq_keys(k, spec, SideCode(bases={0: u}), headq.random_basis(1, D, R, seed=0))),
    }
    assert kl["headq"] < 0.1 * kl["base"]
    assert kl["wrong-sign"] > kl["base"]
    assert kl["headq"] < kl["random"]


def test_key_error_covariance_shape():
    k = torch.randn(2, 64, D, generator=torch.Generator().manual_seed(0))  # (kv_head, point, d_head)
    cov = headq.key_error_covariance(k, QuantSpec(bits=2, group=8, axis="channel"), seq_len=32)
    assert cov.shape == (2, D, D)
    assert torch.allclose(cov, cov.transpose(1, 2))


def test_calibrate_on_a_toy_model():
    lm = load_model("toy-llama")
    blocks = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    spec = lm.spec
    for basis in headq.BASES:
        bases = headq.calibrate(lm, blocks, rank=3, basis=basis, key_spec=QuantSpec(bits=2, group=8, axis="channel"))
        assert sorted(bases) == list(range(spec.n_layers))
        for u in bases.values():
            assert u.shape == (spec.n_kv_heads, spec.d_head, 3)
            assert torch.allclose(u.transpose(1, 2) @ u, torch.eye(3).expand(spec.n_kv_heads, 3, 3), atol=1e-4)
