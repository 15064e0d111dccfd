import copy

import pytest
import torch

from atlas_core.eval import perplexity
from atlas_core.models import load_model
from atlas_core.wquant.apply import METHODS, quantize_model
from atlas_core.wquant.calib import calibration_stats, calibration_stats_reference, linear_layers, participation_ratio
from atlas_core.wquant.rtn import WQuantSpec


@pytest.fixture(scope="module")
def toy_and_stats():
    lm = load_model("toy-llama")
    blocks = torch.randint(4, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    return lm, blocks, calibration_stats(lm, blocks, progress=False)


def test_stats_cover_every_linear_layer(toy_and_stats):
    lm, _, stats = toy_and_stats
    assert set(stats) == set(linear_layers(lm.model))
    s = next(iter(stats.values()))
    assert s.n == 4 * 32 and torch.allclose(s.h, s.h.T)
    assert 1 <= participation_ratio(s.fisher) <= s.fisher.shape[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fast_statistics_equal_the_plain_fp64_ones(family):
    """Shared x xᵀ per input tensor and fp32 products equal per-layer fp64 products to fp32 rounding."""
    lm = load_model(f"toy-{family}")
    blocks = torch.randint(4, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    fast, plain = calibration_stats(lm, blocks, progress=False), calibration_stats_reference(lm, blocks)
    assert set(fast) == set(plain)
    for name in plain:
        for field in ("xx", "x_abs", "gg"):
            a, b = getattr(fast[name], field), getattr(plain[name], field)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=f"{name}.{field}")
        assert fast[name].n == plain[name].n
    if family == "llama":  # k and v read q's input: one sum, added to each
        shared = [n for n in fast if n.endswith(("k_proj", "v_proj"))]
        assert shared and all(torch.equal(fast[n].xx, fast[n.rsplit(".", 1)[0] + ".q_proj"].xx) for n in shared)


def test_participation_ratio_known_answers():
    assert participation_ratio(torch.diag(torch.tensor([1.0, 0, 0]))) == pytest.approx(1.0)
    assert participation_ratio(torch.eye(5)) == pytest.approx(5.0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_the_model(toy_and_stats, method):
    lm, blocks, stats = toy_and_stats
    model = copy.deepcopy(lm.model)
    rows = quantize_model(model, method, WQuantSpec(bits=4, group=16), stats, progress=False, blocks=blocks)  # AWQ searches on blocks
    assert len(rows) == len(stats) and all(0 < r["weight_error"] < 1 for r in rows)
    assert torch.isfinite(torch.tensor(perplexity(model, blocks, progress=False)))
    w = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w, lm.model.model.layers[0].mlp.down_proj.weight)


def test_gptq_beats_rtn_on_layer_output_error(toy_and_stats):
    lm, _, stats = toy_and_stats
    err = {m: sum(r["output_error"] for r in quantize_model(copy.deepcopy(lm.model), m, WQuantSpec(bits=3), stats, progress=False))
           for m in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"]


def test_methods_needing_statistics_say_so(toy_and_stats):
    lm, _, _ = toy_and_stats
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(copy.deepcopy(lm.model), "gptq", WQuantSpec(bits=4), None)
    with pytest.raises(ValueError, match="unknown method"):
        quantize_model(lm.model, "magic", WQuantSpec(bits=4))


def test_relative_output_error_denominator_is_computed_once_per_layer_and_weight(toy_and_stats):
    """tr(W H Wᵀ) is memoised on the statistics: a second run on the same model reuses it and gives the same
    rows; the value equals the plain tr(W H Wᵀ); a different weight is not served the old value."""
    from atlas_core.wquant.awq import output_error

    lm, _, stats = toy_and_stats
    judge = copy.deepcopy(stats)
    first = quantize_model(copy.deepcopy(lm.model), "rtn", WQuantSpec(bits=3), stats, progress=False, judge=judge)
    sizes = {n: len(s.energies) for n, s in judge.items()}
    again = quantize_model(copy.deepcopy(lm.model), "rtn", WQuantSpec(bits=3), stats, progress=False, judge=judge)
    assert first == again and {n: len(s.energies) for n, s in judge.items()} == sizes
    name, layer = next(iter(linear_layers(lm.model).items()))
    w = layer.weight.detach().float()
    assert judge[name].output_energy(name, w) == output_error(w, torch.zeros_like(w), judge[name].h)
    assert judge[name].output_energy(name, 2 * w) == pytest.approx(4 * judge[name].output_energy(name, w), rel=1e-12)
