import torch

from atlas_core.wquant.awq import awq, awq_scales
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=gen) * torch.logspace(1, -1, 64)  # a few salient channels
    return torch.randn(16, 64, generator=gen), x


def test_exponent_zero_is_rtn():
    w, x = _problem()
    w_hat, alpha = awq(w, x, WQuantSpec(3), grid=(0.0,))
    assert alpha == 0.0
    torch.testing.assert_close(w_hat, quantize_rtn(w, WQuantSpec(3)))


def test_search_never_worse_than_rtn():
    for seed in range(4):
        w, x = _problem(seed)
        w_hat, _ = awq(w, x, WQuantSpec(3, 16))
        err = (x @ (w - w_hat).T).pow(2).sum()
        assert err <= (x @ (w - quantize_rtn(w, WQuantSpec(3, 16))).T).pow(2).sum()


def test_scales_are_normalised():
    s = awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
