import pytest
import torch

from atlas_core.wquant.gptq import gptq, gptq_reference
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn


def _problem(seed, out=24, n_in=64, n=512):
    """Weights and ill-conditioned inputs: a decaying spectrum and one dead input."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=gen)
    scales = torch.logspace(0, -3, n_in)
    x = torch.randn(n, n_in, generator=gen) @ torch.linalg.qr(torch.randn(n_in, n_in, generator=gen))[0] * scales
    x[:, 5] = 0
    return w, x, x.T @ x / n


def _out_err(w, w_hat, x):
    return (x @ (w - w_hat).T).pow(2).sum().item()


@pytest.mark.parametrize("spec", [WQuantSpec(3), WQuantSpec(4, 16), WQuantSpec(3, 32, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_blocked_gptq_equals_reference(spec, act_order):
    w, _, h = _problem(0)
    ref = gptq_reference(w, h, spec, act_order=act_order)
    for block in (7, 16, 128):
        torch.testing.assert_close(gptq(w, h, spec, act_order=act_order, block=block), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spec", [WQuantSpec(3), WQuantSpec(4, 16)])
def test_gptq_output_error_never_worse_than_rtn(seed, spec):
    w, x, h = _problem(seed)
    assert _out_err(w, gptq(w, h, spec), x) <= _out_err(w, quantize_rtn(w, spec), x)


def test_gptq_zeroes_dead_inputs_and_stays_on_grid():
    w, _, h = _problem(1)
    q = gptq(w, h, WQuantSpec(3))
    assert torch.all(q[:, 5] == 0)
    assert all(len(row.unique()) <= 8 for row in q)
