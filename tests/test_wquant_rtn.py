import pytest
import torch

from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn, quantize_rtn_reference


@pytest.mark.parametrize("spec", [WQuantSpec(bits=4), WQuantSpec(bits=3, group=8), WQuantSpec(bits=4, group=16, symmetric=True), WQuantSpec(bits=2, group=None, symmetric=True)])
def test_fast_rtn_equals_reference(spec):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(quantize_rtn(w, spec), quantize_rtn_reference(w, spec))


def test_rtn_known_answer_and_level_count():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert quantize_rtn(w, WQuantSpec(bits=2)).tolist() == [[0.0, 1.0, 2.0, 3.0]]  # four levels, exact
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    for b in (2, 3, 4):
        assert all(len(row.unique()) <= 2**b for row in quantize_rtn(w, WQuantSpec(bits=b)))


def test_error_shrinks_with_bits_and_smaller_groups():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    err = {b: (quantize_rtn(w, WQuantSpec(bits=b)) - w).pow(2).mean() for b in (3, 4, 8)}
    assert err[8] < err[4] < err[3]
    assert (quantize_rtn(w, WQuantSpec(bits=3, group=16)) - w).pow(2).mean() < err[3]


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        WQuantSpec(bits=1)
    with pytest.raises(ValueError, match="divide"):
        quantize_rtn(torch.zeros(2, 10), WQuantSpec(bits=4, group=4))


def test_float_zero_reproduces_a_scale_and_min_grid():
    """Weights already on a GGUF Q4_1-style grid (w = min + q·d per block) come back exactly."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (4, 64), generator=gen).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # every block uses its extreme levels
    d, m = torch.rand(4, 2, 1, generator=gen) + 0.1, torch.rand(4, 2, 1, generator=gen) + 0.5  # positive minima
    w = (m + q.view(4, 2, 32) * d).view(4, 64)
    torch.testing.assert_close(quantize_rtn(w, WQuantSpec(bits=4, group=32, zero="float")), w)
    assert (quantize_rtn(w, WQuantSpec(bits=4, group=32)) - w).abs().max() > 1e-2  # the integer zero point cannot
