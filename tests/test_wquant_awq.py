import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from atlas_core.attention import decoder_layers
from atlas_core.models import load_model
from atlas_core.toy import FAMILIES, VOCAB
from atlas_core.wquant.apply import quantize_model
from atlas_core.wquant.awq import (AWQConfig, AWQLayer, awq_block, awq_quantize, awq_scales, awq_search, clip_search,
                                   fold_scales, output_error, scale_groups)
from atlas_core.wquant.calib import block_inputs, linear_layers
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn


def _problem(seed=0, n_in=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, n_in, generator=gen) * torch.logspace(1, -1, n_in)  # a few salient channels
    return torch.randn(16, n_in, generator=gen), x


def _blocks(n=4, t=32):
    return torch.randint(4, 200, (n, t), generator=torch.Generator().manual_seed(0))


def test_scales_are_normalised_and_alpha_zero_is_one():
    s = awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(awq_scales(torch.tensor([0.0, 3.0, 7.0]), 0.0), torch.ones(3))


def test_output_error_from_second_moment_equals_direct():
    w, x = _problem(5)
    w_hat = quantize_rtn(w, WQuantSpec(bits=3))
    direct = (x @ (w - w_hat).T).pow(2).sum(1).mean().item()
    assert abs(output_error(w, w_hat, x.T @ x / len(x)) - direct) < 1e-4 * direct


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_the_scales_leaves_the_fp_model_unchanged(family):
    """Every scale group folds: diag(s)⁻¹ into the norm (Gemma's 1 + w, LayerNorm's bias too) or into the previous
    linear's output rows (v inside fused qkv, up inside fused gate_up), diag(s) into the layers reading it."""
    lm = load_model(f"toy-{family}")
    model, ids = copy.deepcopy(lm.model), _blocks(2, 24)
    with torch.no_grad():
        before = model(ids).logits
        gen = torch.Generator().manual_seed(1)
        n_groups = 0
        for block in decoder_layers(model):
            for group in scale_groups(block):
                n_in = block.get_submodule(group.layers[0]).weight.shape[0 if "c_" in group.layers[0] else 1]
                fold_scales(block, group, torch.exp(0.7 * torch.randn(n_in, generator=gen)))
                n_groups += 1
        after = model(ids).logits
    assert n_groups >= 3 * len(decoder_layers(model))
    norm = scale_groups(decoder_layers(model)[0])[0].prev
    assert not torch.equal(decoder_layers(model)[0].get_submodule(norm).weight,
                           decoder_layers(lm.model)[0].get_submodule(norm).weight)  # the folding did happen
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_folding_refuses_what_it_cannot_absorb():
    block = decoder_layers(load_model("toy-llama").model)[0]
    group = scale_groups(block)[0]
    bad = type(group)(prev="mlp.act_fn", layers=("mlp.down_proj",), inspect="mlp.down_proj")
    with pytest.raises(ValueError, match="cannot fold"):
        fold_scales(block, bad, torch.ones(128))


def test_groups_match_llm_awq_for_llama():
    """llm-awq auto_scale_block, LlamaDecoderLayer: (input_layernorm → q, k, v; loss on self_attn), v → o only
    when v_proj and o_proj have one shape, (post_attention_layernorm → gate, up; loss on mlp), up → down."""
    gqa = decoder_layers(load_model("toy-llama").model)[0]  # 4 query heads, 2 KV heads: no v → o
    expected = [("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")]
    assert [(g.prev, g.layers, g.inspect) for g in scale_groups(gqa)] == expected
    mha = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    expected.insert(1, ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    assert [(g.prev, g.layers, g.inspect) for g in scale_groups(mha.model.layers[0])] == expected


def test_groups_of_other_layouts():
    gemma = scale_groups(decoder_layers(load_model("toy-gemma3").model)[0])
    assert gemma[1].prev == "pre_feedforward_layernorm"  # Gemma 3's post_attention_layernorm follows o_proj
    gpt2 = scale_groups(decoder_layers(load_model("toy-gpt2").model)[0])
    assert [(g.prev, g.layers, g.prev_rows) for g in gpt2] == [
        ("ln_1", ("attn.c_attn",), 0), ("attn.c_attn", ("attn.c_proj",), 64), ("ln_2", ("mlp.c_fc",), 0)]
    phi3 = scale_groups(decoder_layers(load_model("toy-phi3").model)[0])  # GQA: no v → o; up is gate_up's 2nd half
    assert [(g.prev, g.layers, g.prev_rows) for g in phi3] == [
        ("input_layernorm", ("self_attn.qkv_proj",), 0), ("post_attention_layernorm", ("mlp.gate_up_proj",), 0),
        ("mlp.gate_up_proj", ("mlp.down_proj",), 128)]
    with pytest.raises(ValueError, match="layout"):
        scale_groups(torch.nn.Linear(2, 2))


def test_alpha_zero_without_clipping_is_rtn_bit_for_bit():
    lm, spec = load_model("toy-llama"), WQuantSpec(bits=3, group=16)
    awq_model, rtn_model = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    quantize_model(awq_model, "awq", spec, blocks=_blocks(), awq_config=AWQConfig(n_grid=1, clip=False), progress=False)
    quantize_model(rtn_model, "rtn", spec, progress=False)
    for (name, a), (_, r) in zip(awq_model.state_dict().items(), rtn_model.state_dict().items()):
        assert torch.equal(a, r), name
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(awq_quantize(w, AWQLayer(torch.ones(32), None, 0.0), WQuantSpec(bits=3)), quantize_rtn(w, WQuantSpec(bits=3)))


@pytest.mark.parametrize("spec", [WQuantSpec(bits=3), WQuantSpec(bits=3, group=16), WQuantSpec(bits=4, group=8), WQuantSpec(bits=2, group=32)])
def test_clipping_never_increases_the_calibration_output_error(spec):
    for seed in range(6):
        w, x = _problem(seed)
        w = w + (torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) < 0.02) * 4.0  # outliers
        h = x.T @ x / len(x)
        bound = clip_search(w, h, spec)
        layer = AWQLayer(torch.ones(64), bound, None)
        clipped, plain = awq_quantize(w, layer, spec), quantize_rtn(w, spec)
        rows = lambda wh: (((w - wh).double() @ h.double()) * (w - wh).double()).sum(1)  # noqa: E731
        assert (rows(clipped) <= rows(plain)).all()
        assert bound.shape == (16, 64 // spec.group_size(64))
    assert output_error(w, clipped, h) < output_error(w, plain, h)  # the outliers make clamping pay


def test_block_search_never_loses_to_rtn_on_each_groups_loss():
    """On toy-llama's first block, each scale group quantized alone: the inspected module's output error at the
    chosen α is at most RTN's (α = 0 is on the grid). (All groups at once may not be: AWQ searches them apart.)"""
    lm, spec = load_model("toy-llama"), WQuantSpec(bits=3, group=16)
    block = decoder_layers(lm.model)[0]
    inputs = block_inputs(lm.model, _blocks(), 2)
    found, outputs = awq_block(block, 0, inputs, inputs.hidden, spec, AWQConfig(clip=False))
    with torch.no_grad():
        torch.testing.assert_close(outputs, [inputs.call(block, 0, b, h) for b, h in enumerate(inputs.hidden)])
    assert torch.equal(found["self_attn.q_proj"].scale, found["self_attn.v_proj"].scale)  # one shared scale
    assert torch.equal(found["self_attn.o_proj"].scale, torch.ones(64))  # GQA: o has no foldable scale

    def inspected_output(group, plan):
        b, seen = copy.deepcopy(block), []
        hook = b.get_submodule(group.inspect).register_forward_hook(lambda m, a, out: seen.append(
            out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            for n in plan and group.layers:
                m = b.get_submodule(n)
                m.weight.copy_(awq_quantize(m.weight, plan[n], spec))
            for k, h in enumerate(inputs.hidden):
                inputs.call(b, 0, k, h)
        hook.remove()
        return torch.cat(seen)
    rtn = {n: AWQLayer(torch.ones(p.scale.shape), None, 0.0) for n, p in found.items()}
    for group in scale_groups(block):
        fp = inspected_output(group, {})
        err_awq = (inspected_output(group, found) - fp).pow(2).sum()
        assert err_awq <= (inspected_output(group, rtn) - fp).pow(2).sum() * (1 + 1e-6), group


def test_awq_needs_blocks_and_names_layers_like_calib():
    lm = load_model("toy-qwen2")
    with pytest.raises(ValueError, match="blocks"):
        quantize_model(copy.deepcopy(lm.model), "awq", WQuantSpec(bits=4))
    plan = awq_search(lm.model, _blocks(2, 16), WQuantSpec(bits=4, group=16), progress=False)
    assert set(plan) == set(linear_layers(lm.model))


def test_searches_use_the_first_search_tokens_of_the_calibration():
    blocks = _blocks()
    n, width = blocks.shape
    cfg = AWQConfig(search_tokens=width + 1)  # two blocks hold it
    assert torch.equal(cfg.search_blocks(blocks), blocks[:2])
    assert torch.equal(AWQConfig(search_tokens=None).search_blocks(blocks), blocks)
    assert len(AWQConfig(search_tokens=1).search_blocks(blocks)) == 1
    lm = load_model("toy-llama")
    subset = awq_search(lm.model, blocks, WQuantSpec(bits=3, group=16), cfg, progress=False)
    alone = awq_search(lm.model, blocks[:2], WQuantSpec(bits=3, group=16), AWQConfig(search_tokens=None), progress=False)
    assert subset.keys() == alone.keys()
    for name in subset:
        assert torch.equal(subset[name].scale, alone[name].scale), name
    with pytest.raises(ValueError, match="search_tokens"):
        AWQConfig(search_tokens=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_references_from_the_blocks_forward_equal_a_rerun_of_each_module(family):
    """The search's full-precision references come from the block's own forward (``_capture``); re-running each
    inspected module on its recorded arguments, the plain way, gives the same tensors bit for bit."""
    from atlas_core.wquant.awq import _capture, _module_output

    lm = load_model(f"toy-{family}")
    block = decoder_layers(lm.model)[0]
    inputs = block_inputs(lm.model, _blocks(), 2)
    inspected = {g.inspect: block.get_submodule(g.inspect) for g in scale_groups(block) if g.inspect not in g.layers}
    args, refs = {}, {}
    with torch.no_grad(), _capture(inspected, args, refs):
        for b, h in enumerate(inputs.hidden):
            inputs.call(block, 0, b, h)
    with torch.no_grad():
        for name, m in inspected.items():
            rerun = [_module_output(m(*a, **k)) for a, k in args[name]]
            assert len(rerun) == len(refs[name]) == len(inputs.hidden)
            assert all(torch.equal(x, y) for x, y in zip(rerun, refs[name])), name
