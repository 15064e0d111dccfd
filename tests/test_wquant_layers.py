"""Linear layers by the input they read, and their participation ratios."""

import pytest
import torch

from atlas_core.models import load_model
from atlas_core.toy import FAMILIES, toy_model
from atlas_core.wquant.calib import LayerStats, linear_layers
from atlas_core.wquant.layers import layer_index, layer_type, participation_rows


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_layer_of_every_family_has_a_type(family):
    model, _ = toy_model(family)
    types = {name: layer_type(name) for name in linear_layers(model)}
    assert set(types.values()) == {"attention in (q, k, v)", "attention out", "MLP in (gate, up)", "MLP down"}
    assert {layer_index(name) for name in types} == {0, 1}


def test_gpt2_c_proj_is_typed_by_its_parent():
    # before: both GPT-2 layers named c_proj were one type, "out projection", though one reads the heads'
    # outputs and the other the MLP's hidden activation
    assert layer_type("transformer.h.3.attn.c_proj") == "attention out"
    assert layer_type("transformer.h.3.mlp.c_proj") == "MLP down"
    assert layer_type("model.layers.0.mlp.gate_up_proj") == "MLP in (gate, up)"  # Phi-3's fused gate/up
    with pytest.raises(ValueError, match="no known type"):
        layer_type("model.layers.0.mlp.mystery")
    with pytest.raises(ValueError, match="block index"):
        layer_index("lm_head")


def _stats(xx_diag, fisher_diag):
    return LayerStats(xx=torch.diag(torch.tensor(xx_diag, dtype=torch.float64)), x_abs=torch.zeros(len(xx_diag)),
                      gg=None if fisher_diag is None else torch.diag(torch.tensor(fisher_diag, dtype=torch.float64)), n=2)


def test_participation_rows_count_each_input_once_with_hand_values():
    stats = {"model.layers.1.self_attn.q_proj": _stats([1, 1, 0, 0], [1, 1, 1, 1]),
             "model.layers.1.self_attn.k_proj": _stats([1, 0, 0, 0], [1, 0, 0, 0]),  # q's input: left out
             "model.layers.1.mlp.gate_up_proj": _stats([3, 1], [1, 0])}  # Phi-3's fused gate/up: kept
    rows = participation_rows(stats)
    assert [r["layer"] for r in rows] == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_up_proj"]
    assert rows[0] == pytest.approx({"layer": "model.layers.1.self_attn.q_proj", "type": "attention in (q, k, v)",
                                     "depth": 1, "width": 4, "pr_h": 2.0, "pr_fisher": 4.0})
    assert rows[1]["pr_h"] == pytest.approx(16 / 10) and rows[1]["pr_fisher"] == pytest.approx(1.0)  # (3+1)²/(9+1)


def test_participation_rows_bound_the_fisher_by_the_smaller_width():
    # g = Wᵀ ∂L/∂y lies in W's row space: a down projection's F has rank ≤ its output width (SmolLM2: 576, not
    # the 1,536 of its input), H only by its input width
    stats = {"model.layers.0.mlp.down_proj": _stats([1, 1, 1, 1], [1, 1, 0, 0]),
             "model.layers.0.self_attn.q_proj": _stats([1, 1], [1, 1])}
    rows = participation_rows(stats, {"model.layers.0.mlp.down_proj": 2, "model.layers.0.self_attn.q_proj": 6})
    assert [(r["width"], r["out_width"], r["fisher_bound"]) for r in rows] == [(4, 2, 2), (2, 6, 2)]
    assert "fisher_bound" not in participation_rows(stats)[0]
    with pytest.raises(ValueError, match="no output width"):
        participation_rows(stats, {"model.layers.0.mlp.down_proj": 2})


def test_fisher_bound_holds_on_a_toy_model():
    """On a real (toy) calibration, F's participation ratio never exceeds min(in, out), nor H's the input width."""
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.wquant.calib import calibration_stats
    from atlas_core.wquant.layers import output_widths

    lm = load_model("toy-llama")
    blocks = token_blocks(lm, BlockSpec(corpus="britannica", seq_len=32, n_blocks=2, split="calib"))
    widths = output_widths(lm.model)
    rows = participation_rows(calibration_stats(lm, blocks, progress=False), widths)
    assert {r["layer"] for r in rows} <= set(widths)
    for r in rows:
        assert r["out_width"] == widths[r["layer"]] and r["fisher_bound"] == min(r["width"], r["out_width"])
        assert 1 - 1e-9 <= r["pr_fisher"] <= r["fisher_bound"] + 1e-6 and r["pr_h"] <= r["width"] + 1e-6


def test_participation_rows_need_the_fisher():
    with pytest.raises(ValueError, match="fisher=True"):
        participation_rows({"model.layers.0.mlp.down_proj": _stats([1, 1], None)})


def test_linear_widths_come_from_the_config_alone():
    from atlas_core.models import model_config
    from atlas_core.wquant.layers import linear_widths

    for family in ("llama", "gpt2", "phi3"):
        lm = load_model(f"toy-{family}")
        real = sorted({w.shape[1] if not family == "gpt2" else w.shape[0]
                       for name, w in ((n, m.weight) for n, m in linear_layers(lm.model).items())})
        assert list(linear_widths(model_config(f"toy-{family}"))) == real, family
