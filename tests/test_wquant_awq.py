import torch

from atlas_core.wquant.awq import awq, awq_scales, output_error
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=gen) * torch.logspace(1, -1, 64)  # a few salient channels
    return torch.randn(16, 64, generator=gen), x


def _stats(x):
    return x.T @ x / len(x), x.abs().mean(0)


def test_exponent_zero_is_rtn():
    w, x = _problem()
    w_hat, alpha = awq(w, *_stats(x), WQuantSpec(3), grid=(0.0,))
    assert alpha == 0.0
    torch.testing.assert_close(w_hat, quantize_rtn(w, WQuantSpec(3)))


def test_search_never_worse_than_rtn():
    for seed in range(4):
        w, x = _problem(seed)
        w_hat, _ = awq(w, *_stats(x), WQuantSpec(3, 16))
        err = (x @ (w - w_hat).T).pow(2).sum()
        assert err <= (x @ (w - quantize_rtn(w, WQuantSpec(3, 16))).T).pow(2).sum()


def test_scales_are_normalised():
    s = awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))


def test_output_error_from_second_moment_equals_direct():
    w, x = _problem(5)
    w_hat = quantize_rtn(w, WQuantSpec(3))
    direct = (x @ (w - w_hat).T).pow(2).sum(1).mean().item()
    assert abs(output_error(w, w_hat, x.T @ x / len(x)) - direct) < 1e-4 * direct
