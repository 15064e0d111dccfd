import pytest
import torch

from atlas_core.wquant.rotations import eigenbasis, haar, hadamard, randomized_hadamard, rotate_quantize
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn


def _spd(n, seed):
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a @ a.T


@pytest.mark.parametrize("u", [haar(48, 0), randomized_hadamard(48, 1), randomized_hadamard(576, 2), eigenbasis(_spd(48, 3))])
def test_bases_are_orthogonal(u):
    """The source's gate A-G1: U orthogonal, reconstruction exact to < 1e-5."""
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    assert (u.T @ u - eye).abs().max() < 1e-10
    w = torch.randn(8, u.shape[0], dtype=torch.float64)
    assert ((w @ u) @ u.T - w).abs().max() < 1e-5


def test_high_precision_rotation_is_nearly_exact():
    w = torch.randn(8, 64)
    w_hat = rotate_quantize(w, haar(64, 3), WQuantSpec(bits=16))
    assert (w_hat - w).abs().max() < 1e-3 * w.abs().max()


def test_identity_rotation_is_rtn():
    w = torch.randn(8, 64)
    torch.testing.assert_close(rotate_quantize(w, torch.eye(64), WQuantSpec(bits=3)), quantize_rtn(w, WQuantSpec(bits=3)))


def test_hadamard_known_answer_and_errors():
    assert torch.equal(hadamard(2) * 2**0.5, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


def test_lambda_scaled_grid_with_flat_spectrum_is_the_eigenbasis_rotation():
    from atlas_core.wquant.rotations import lambda_scaled_quantize

    w = torch.randn(8, 32)
    cov = torch.eye(32, dtype=torch.float64) * 3.0  # every λ equal: s = 1
    u = eigenbasis(cov)
    torch.testing.assert_close(lambda_scaled_quantize(w, cov, WQuantSpec(bits=3)), rotate_quantize(w, u, WQuantSpec(bits=3)))


def test_haar_is_drawn_once_per_width_and_seed_and_each_call_gets_its_own_copy():
    """The cached draw equals a fresh QR of the same seeded Gaussian, and a caller's edit cannot reach the cache."""
    gen = torch.Generator().manual_seed(3)
    q, r = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))
    fresh = q * torch.sign(torch.diagonal(r))[None, :]
    first = haar(24, 3)
    assert torch.equal(first, fresh)
    first.zero_()
    assert torch.equal(haar(24, 3), fresh) and not torch.equal(haar(24, 4), fresh)
