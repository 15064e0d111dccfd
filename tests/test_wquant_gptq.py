import copy

import pytest
import torch

from atlas_core.eval import perplexity
from atlas_core.models import load_model
from atlas_core.wquant.apply import quantize_model, quantize_model_sequential, quantize_model_sequential_reference
from atlas_core.wquant.calib import CalibConfig, block_inputs, calibration_stats, group_stats, linear_groups, linear_layers
from atlas_core.wquant.experiment import run_wquant
from atlas_core.wquant.gptq import GPTQConfig, gptq, gptq_reference
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


@pytest.mark.parametrize("spec", [WQuantSpec(bits=3), WQuantSpec(bits=4, group=16), WQuantSpec(bits=3, group=32, symmetric=True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_blocked_gptq_equals_reference(spec, act_order):
    w, _, h = _problem(0)
    ref = gptq_reference(w, h, spec, act_order=act_order)
    for block in (7, 16, 128):
        torch.testing.assert_close(gptq(w, h, spec, act_order=act_order, block=block), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spec", [WQuantSpec(bits=3), WQuantSpec(bits=4, group=16)])
def test_gptq_output_error_never_worse_than_rtn(seed, spec):
    w, x, h = _problem(seed)
    assert _out_err(w, gptq(w, h, spec), x) <= _out_err(w, quantize_rtn(w, spec), x)


def test_gptq_zeroes_dead_inputs_and_stays_on_grid():
    w, _, h = _problem(1)
    q = gptq(w, h, WQuantSpec(bits=3))
    assert torch.all(q[:, 5] == 0)
    assert all(len(row.unique()) <= 8 for row in q)


# ----------------------------------------------------------------------------- the sequential pipeline


@pytest.fixture(scope="module")
def toy_blocks():
    return torch.randint(4, 200, (5, 32), generator=torch.Generator().manual_seed(0))  # batches of 2, 2, 1


def _quantized(family, blocks, pipeline, **kw):
    model = copy.deepcopy(load_model(f"toy-{family}").model)
    rows = pipeline(model, "gptq", WQuantSpec(bits=3), blocks, batch_size=2, **kw)
    return model, rows


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_sequential_pipeline_equals_plain_loop(family, true_sequential, toy_blocks):
    cfg = GPTQConfig(true_sequential=true_sequential)
    fast, rows = _quantized(family, toy_blocks, quantize_model_sequential, gptq_config=cfg, progress=False)
    ref, ref_rows = _quantized(family, toy_blocks, quantize_model_sequential_reference, gptq_config=cfg)
    assert [r["layer"] for r in rows] == [r["layer"] for r in ref_rows] == list(linear_layers(fast))
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)
    assert [r["calib_output_error"] for r in rows] == pytest.approx([r["calib_output_error"] for r in ref_rows], rel=1e-6)


def test_true_sequential_groups_follow_the_block():
    lm = load_model("toy-llama")
    inputs = block_inputs(lm.model, torch.randint(4, 200, (2, 16)), batch_size=2)
    assert linear_groups(lm.model.model.layers[0], 0, inputs) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_sequential_recollects_inputs_through_quantized_layers(toy_blocks):
    """o_proj's calibration inputs come from the quantized q/k/v, not from the full-precision model."""
    fp = load_model("toy-llama")
    _, seq = _quantized("llama", toy_blocks, quantize_model_sequential, progress=False)
    one_pass = quantize_model(copy.deepcopy(fp.model), "gptq", WQuantSpec(bits=3),
                              calibration_stats(fp, toy_blocks, fisher=False, progress=False), progress=False)
    first = [r["calib_output_error"] for r in seq[:3]]  # q, k, v see the same inputs either way
    assert first == pytest.approx([r["calib_output_error"] for r in one_pass[:3]], rel=1e-6)
    assert seq[3]["calib_output_error"] != pytest.approx(one_pass[3]["calib_output_error"], rel=1e-3)


def test_a_layer_never_depends_on_the_layers_after_it(toy_blocks):
    """Scrambling block 1 leaves block 0's quantized weights and calibration output errors unchanged."""
    base, rows = _quantized("llama", toy_blocks, quantize_model_sequential, progress=False)
    model = copy.deepcopy(load_model("toy-llama").model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    other = quantize_model_sequential(model, "gptq", WQuantSpec(bits=3), toy_blocks, batch_size=2, progress=False)
    block0 = [k for k, r in enumerate(rows) if ".layers.0." in r["layer"]]
    assert [rows[k] for k in block0] == [other[k] for k in block0]
    for p, q in zip(base.model.layers[0].parameters(), model.model.layers[0].parameters()):
        assert torch.equal(p, q)
    assert [rows[k] for k in range(len(rows)) if k not in block0] != [other[k] for k in range(len(rows)) if k not in block0]


def test_sequential_gptq_is_deterministic(toy_blocks):
    a, rows_a = _quantized("gemma3", toy_blocks, quantize_model_sequential, progress=False)
    b, rows_b = _quantized("gemma3", toy_blocks, quantize_model_sequential, progress=False)
    assert rows_a == rows_b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_batch_size_does_not_change_the_statistics(toy_blocks):
    model = load_model("toy-llama").model
    inputs = {bs: block_inputs(model, toy_blocks, bs) for bs in (1, 5)}
    groups = linear_groups(model.model.layers[1], 1, inputs[5])
    h = {bs: group_stats(model.model.layers[1], 1, inp, groups) for bs, inp in inputs.items()}
    for name in h[1]:  # fp32 forwards of different batch shapes round differently: ~1e-7 of the largest entry
        torch.testing.assert_close(h[1][name].h, h[5][name].h, atol=1e-6 * h[5][name].h.abs().max().item(), rtol=1e-5)


def test_run_wquant_runs_gptq_sequentially_by_default():
    lm = load_model("toy-llama")
    cal = CalibConfig(corpus="pydoc", tokens=96, seq_len=32, batch_size=2)
    held_out = torch.randint(4, 200, (2, 32), generator=torch.Generator().manual_seed(2))
    r = run_wquant(lm, "gptq", WQuantSpec(bits=3), None, held_out, calib_config=cal)
    model = copy.deepcopy(lm.model)
    quantize_model_sequential(model, "gptq", WQuantSpec(bits=3), cal.blocks(lm), batch_size=2, progress=False)
    assert r["ppl"]["value"] == pytest.approx(perplexity(model, held_out, progress=False), rel=1e-9)
    assert r["calib_tokens"] == 96 and r["calib_corpus"] == "pydoc"


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=-0.1)
    with pytest.raises(ValueError, match="seq_len"):
        CalibConfig(tokens=100, seq_len=512)
    lm = load_model("toy-llama")
    with pytest.raises(ValueError, match="sequentially"):
        quantize_model_sequential(copy.deepcopy(lm.model), "rot-fisher", WQuantSpec(bits=3), torch.zeros(2, 8, dtype=torch.long))
