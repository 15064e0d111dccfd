import importlib
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3TextConfig, Qwen3Config, SiglipVisionConfig

from atlas_core.attention import LAYOUTS, attention_modules, state_of
from atlas_core.extract import (CAPTURE, FIELDS, LayerActivations, _capturing, _Recorder, extract, head_out_proj,
                                 invariant_errors, layer_invariant_errors)
from atlas_core.models import _finish, load_model
from atlas_core.toy import FAMILIES, byte_tokenizer, toy_model


def _blocks(n=5, t=24, seed=0):
    return torch.randint(4, 260, (n, t), generator=torch.Generator().manual_seed(seed))


def test_head_contributions_sum_to_attention_output(toy_lm):
    """Σ_h c[h] + b_O = the attention module's output, and attention rows sum to 1 (the models chapter's check)."""
    errors = invariant_errors(toy_lm, _blocks())
    assert errors["layers"] == [0, 1]  # first, middle and last of 2 layers
    assert errors["sum_abs"] < 1e-5 and errors["sum_rel"] < 1e-5 and errors["rows"] < 1e-5


def test_invariant_errors_by_hand():
    """The reduction itself: a known deviation planted in c, attn_out and probs comes back exactly."""
    c = torch.ones(2, 3, 4)  # (head, point, d_model): Σ_h c = 2 everywhere
    out = torch.full((3, 4), 2.5)  # the module's output with b_O = 0.5 ...
    out[1, 2] = 4.0  # ... but one entry off by 1.5
    probs = torch.full((1, 2, 3, 3), 1 / 3)  # (block, head, query, key)
    probs[0, 1, 2] = torch.tensor([0.5, 0.5, 0.25])  # a row summing to 1.25
    acts = LayerActivations(layer=0, c=c, attn_out=out, out_bias=torch.full((4,), 0.5), probs=probs)
    e = layer_invariant_errors(acts)
    assert e["sum_abs"] == 1.5 and e["sum_rel"] == 1.5 / 4.0 and e["rows"] == pytest.approx(0.25, abs=1e-7)
    no_bias = LayerActivations(layer=0, c=c, attn_out=torch.full((3, 4), 2.0), probs=probs)
    assert layer_invariant_errors(no_bias)["sum_abs"] == 0.0


def test_shapes_rows_and_eps(toy_lm):
    s = toy_lm.spec
    a = extract(toy_lm, _blocks(), layers=[-1], progress=False)[s.n_layers - 1]
    n_points = 5 * 24
    assert a.q.shape == a.z.shape == a.eps.shape == (s.n_heads, n_points, s.d_head)
    assert a.k.shape == a.v.shape == a.k_pre.shape == (s.n_kv_heads, n_points, s.d_head)
    assert a.c.shape == (s.n_heads, n_points, s.d_model)
    assert a.probs.shape == (5, s.n_heads, 24, 24)
    torch.testing.assert_close(a.probs.sum(-1), torch.ones(5, s.n_heads, 24), atol=1e-5, rtol=0)
    assert torch.all(a.probs.triu(1) == 0)  # causal
    # eps = z - v[group, argmax p]: recompute for one head and one point
    h, b, t = s.n_heads - 1, 2, 17
    j = a.probs[b, h, t].argmax()
    g = a.kv_group[h]
    torch.testing.assert_close(a.eps[h, b * 24 + t], a.z[h, b * 24 + t] - a.v[g, b * 24 + j])
    # z is the probability-weighted sum of the group's values
    v_block = a.v[g, b * 24 : (b + 1) * 24]
    torch.testing.assert_close(a.z[h, b * 24 + t], a.probs[b, h, t] @ v_block, atol=1e-5, rtol=0)


def test_sliding_window_respected():
    lm = load_model("toy-mistral")  # window 8 in every layer
    a = extract(lm, _blocks(t=24), layers=[0], progress=False)[0]
    query, key = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    outside = (query - key) >= 8
    assert torch.all(a.probs[..., outside] == 0)
    assert torch.all(a.probs[..., ~outside & (key <= query)] > 0)


def test_independent_of_batch_size(toy_lm):
    blocks = _blocks()
    one = extract(toy_lm, blocks, layers=[1], batch_size=1, progress=False)[1]
    all_ = extract(toy_lm, blocks, layers=[1], batch_size=5, progress=False)[1]
    for name in FIELDS:
        torch.testing.assert_close(getattr(one, name), getattr(all_, name), atol=1e-5, rtol=1e-5)


def test_pre_rope_keys_rotate_into_post_rope(toy_lm):
    """Applying the model's own RoPE to the captured pre-RoPE q/k gives the captured post-RoPE q/k."""
    model, spec = toy_lm.model, toy_lm.spec
    a = extract(toy_lm, _blocks(n=2, t=16), layers=[1], progress=False)[1]
    assert a.q_pre.shape == a.q.shape and a.k_pre.shape == a.k.shape
    if spec.family == "gpt2":
        assert torch.equal(a.q_pre, a.q)
        return
    module = importlib.import_module(type(model).__module__)
    positions = torch.arange(16)[None]
    rotary = model.model.rotary_emb
    args = (spec.layer_types[1],) if spec.family == "gemma3_text" else ()
    cos, sin = rotary(a.q, positions, *args)
    q_pre = a.q_pre.reshape(spec.n_heads, 2, 16, -1).transpose(0, 1)  # (batch, head, token, d_head)
    k_pre = a.k_pre.reshape(spec.n_kv_heads, 2, 16, -1).transpose(0, 1)
    q_rot, k_rot = module.apply_rotary_pos_emb(q_pre, k_pre, cos, sin)
    torch.testing.assert_close(q_rot.transpose(0, 1).reshape(a.q.shape), a.q, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_rot.transpose(0, 1).reshape(a.k.shape), a.k, atol=1e-5, rtol=0)


def test_every_supported_family_has_a_toy_model():
    """Each family extraction claims (LAYOUTS) runs through the toy_lm-parametrized invariants above."""
    assert {toy_model(f)[0].config.model_type for f in FAMILIES} == set(LAYOUTS)


def _tiny_qwen3():
    """Issue 14's case: one layer, 4 query / 2 KV heads, head_dim 16 (Qwen3 norms q/k before the transpose)."""
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return _finish(model, byte_tokenizer(), "tiny-qwen3", "toy", "eager", add_bos=False)


def test_tiny_qwen3_pre_rope_layout():
    """Before the fix q_pre came back (10, 8, 16) and k_pre (10, 4, 16): Qwen3's q_norm output was read as Gemma 3's."""
    lm = _tiny_qwen3()
    a = extract(lm, _blocks(n=2, t=10), layers=[0], progress=False)[0]
    assert a.q_pre.shape == (4, 20, 16) and a.k_pre.shape == (2, 20, 16)
    module = importlib.import_module(type(lm.model).__module__)
    cos, sin = lm.model.model.rotary_emb(a.q, torch.arange(10)[None])
    q_pre = a.q_pre.reshape(4, 2, 10, 16).transpose(0, 1)  # (batch, head, token, d_head)
    k_pre = a.k_pre.reshape(2, 2, 10, 16).transpose(0, 1)
    q_rot, k_rot = module.apply_rotary_pos_emb(q_pre, k_pre, cos, sin)
    torch.testing.assert_close(q_rot.transpose(0, 1).reshape(a.q.shape), a.q, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_rot.transpose(0, 1).reshape(a.k.shape), a.k, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, wrong", [("qwen3", "head_major"), ("gemma3", "token_major"), ("llama", "head_major")])
def test_a_wrong_layout_declaration_is_refused(monkeypatch, family, wrong):
    """The declared pre-RoPE layout is checked against the emitted shape (here 4 heads, 10 tokens)."""
    lm = load_model(f"toy-{family}")
    model_type = lm.model.config.model_type
    monkeypatch.setitem(LAYOUTS, model_type, replace(LAYOUTS[model_type], pre_shape=wrong))
    with pytest.raises(ValueError, match="LAYOUTS declares"):
        extract(lm, _blocks(n=2, t=10), layers=[0], fields=("q_pre",), progress=False)


def test_unsupported_family_is_refused_plainly(monkeypatch):
    lm = load_model("toy-llama")
    monkeypatch.delitem(LAYOUTS, "llama")
    with pytest.raises(ValueError, match="model_type 'llama' is not supported.*families"):
        extract(lm, _blocks(), layers=[0], progress=False)


def test_multimodal_gemma3_is_refused_plainly():
    """Its text layers sit elsewhere (model.language_model.layers): refused by name, not an AttributeError."""
    text = Gemma3TextConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    model = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    with pytest.raises(ValueError, match="model_type 'gemma3' is not supported"):
        attention_modules(model)


def test_capture_attention_is_exact_on_a_left_padded_batch(toy_lm, left_padded):
    """As a model's attention implementation (nothing recorded), atlas_capture follows per-row masks and positions."""
    model = toy_lm.model
    eager_gap = left_padded.logit_gap(model)
    model.set_attn_implementation(CAPTURE)
    try:
        gap = left_padded.logit_gap(model)
        agrees = left_padded.greedy_agrees(model)
    finally:
        model.set_attn_implementation("eager")
    assert gap < 1e-5 and eager_gap < 1e-5
    assert agrees


def test_extraction_refuses_per_row_masks(left_padded):
    """Extraction records every (block, token) as a point; a padded batch would make pad tokens points."""
    lm = load_model("toy-llama")
    with pytest.raises(ValueError, match="per-row attention masks"), _capturing(lm.model, {0: _Recorder(lm.model, 0, FIELDS)}):
        lm.model(left_padded.ids, attention_mask=left_padded.mask, position_ids=left_padded.positions)
    with pytest.raises(ValueError, match="equal-length windows"):
        extract(lm, [[5, 6, 7]], layers=[0], progress=False)


def test_row_extracted_in_a_batch_equals_the_row_alone(toy_lm):
    """Every field of block 1 is the same whether it is extracted beside block 0 or alone."""
    blocks = _blocks(n=2, t=20)
    both = extract(toy_lm, blocks, layers=[-1], progress=False)
    alone = extract(toy_lm, blocks[1:], layers=[-1], progress=False)
    (layer,) = both
    for name in ("q", "k", "q_pre", "k_pre", "v", "z", "c", "eps"):
        torch.testing.assert_close(getattr(both[layer], name)[:, 20:], getattr(alone[layer], name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[layer].probs[1:], alone[layer].probs, atol=1e-6, rtol=0)


def test_capture_leaves_model_unchanged(toy_lm):
    blocks = _blocks(n=2)
    before = toy_lm.model(blocks).logits
    extract(toy_lm, blocks, layers=[0], progress=False)
    assert toy_lm.model.config._attn_implementation == "eager"
    assert not any(state_of(m, CAPTURE, required=False) is not None for m in attention_modules(toy_lm.model))
    torch.testing.assert_close(toy_lm.model(blocks).logits, before)


def test_bad_arguments(toy_lm):
    with pytest.raises(ValueError, match="layers"):
        extract(toy_lm, _blocks(), layers=[5], progress=False)
    with pytest.raises(ValueError, match="fields"):
        extract(toy_lm, _blocks(), layers=[0], fields=("nope",), progress=False)


def test_head_out_proj_shape(toy_lm):
    w, _ = head_out_proj(toy_lm.model, 0)
    s = toy_lm.spec
    assert w.shape == (s.n_heads, s.d_head, s.d_model)


@pytest.mark.slow
def test_invariant_on_smollm2(smollm2):
    blocks = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    errors = invariant_errors(smollm2, blocks, layers=[0, 15, 29])
    assert errors["sum_abs"] < 1e-4 and errors["rows"] < 1e-5
