import copy

import pytest
import torch

from atlas_core.eval import perplexity
from atlas_core.models import load_model
from atlas_core.wquant.apply import METHODS, quantize_model
from atlas_core.wquant.calib import calibration_stats, linear_layers, participation_ratio
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


def test_participation_ratio_known_answers():
    assert participation_ratio(torch.diag(torch.tensor([1.0, 0, 0]))) == pytest.approx(1.0)
    assert participation_ratio(torch.eye(5)) == pytest.approx(5.0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_the_model(toy_and_stats, method):
    lm, blocks, stats = toy_and_stats
    model = copy.deepcopy(lm.model)
    rows = quantize_model(model, method, WQuantSpec(4, 16), stats, progress=False, blocks=blocks)  # AWQ searches on blocks
    assert len(rows) == len(stats) and all(0 < r["weight_error"] < 1 for r in rows)
    assert torch.isfinite(torch.tensor(perplexity(model, blocks, progress=False)))
    w = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w, lm.model.model.layers[0].mlp.down_proj.weight)


def test_gptq_beats_rtn_on_layer_output_error(toy_and_stats):
    lm, _, stats = toy_and_stats
    err = {m: sum(r["output_error"] for r in quantize_model(copy.deepcopy(lm.model), m, WQuantSpec(3), stats, progress=False))
           for m in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"]


def test_methods_needing_statistics_say_so(toy_and_stats):
    lm, _, _ = toy_and_stats
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(copy.deepcopy(lm.model), "gptq", WQuantSpec(4), None)
    with pytest.raises(ValueError, match="unknown method"):
        quantize_model(lm.model, "magic", WQuantSpec(4))
