import pytest
import torch

from atlas_core.attention import (LAYOUTS, attention_modules, decoder_layers, eager_of, intervene, kv_group, register,
                                  state_of, top1_values)
from atlas_core.models import load_model
from atlas_core.toy import FAMILIES

PROBE = "atlas_test_probe"
SEEN: list = []


def _probe_forward(module, query, key, value, attention_mask, **kwargs):
    SEEN.append(state_of(module, PROBE, required=False))
    return eager_of(module)(module, query, key, value, attention_mask, **kwargs)


register(PROBE, _probe_forward, owner="the probe's test")


def test_every_toy_family_has_a_layout_and_its_layers():
    for family in FAMILIES:
        model = load_model(f"toy-{family}").model
        assert model.config.model_type in LAYOUTS
        assert len(attention_modules(model)) == len(decoder_layers(model)) == model.config.num_hidden_layers


@torch.no_grad()
def test_intervene_sets_states_per_layer_and_restores_everything():
    lm = load_model("toy-llama")
    x = torch.randint(4, 200, (1, 12))
    ref = lm.model(x).logits
    SEEN.clear()
    with intervene(lm.model, PROBE, {1: "one"}):
        assert lm.model.config._attn_implementation == PROBE
        out = lm.model(x).logits
    assert SEEN == [None, "one"] + [None] * (lm.spec.n_layers - 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # the probe runs the model's own eager attention
    assert lm.model.config._attn_implementation == "eager"
    assert all(state_of(m, PROBE, required=False) is None for m in attention_modules(lm.model))


def test_intervene_undoes_on_error_and_refuses_nesting_and_bad_layers():
    lm = load_model("toy-qwen2")
    with pytest.raises(KeyError), intervene(lm.model, PROBE, {0: 1}):
        raise KeyError("mid-block")
    assert state_of(attention_modules(lm.model)[0], PROBE, required=False) is None
    with intervene(lm.model, PROBE, {0: 1}):
        with pytest.raises(ValueError, match="already runs the 'atlas_test_probe'"), intervene(lm.model, PROBE, {1: 2}):
            pass
    with pytest.raises(ValueError, match=r"layers \[99\] do not exist"), intervene(lm.model, PROBE, {99: 0}):
        pass
    assert lm.model.config._attn_implementation == "eager"


def test_state_of_outside_the_block_names_the_context_manager():
    module = attention_modules(load_model("toy-llama").model)[0]
    with pytest.raises(RuntimeError, match="the probe's test"):
        state_of(module, PROBE)


def test_kv_group_and_top1_values_match_a_loop():
    assert kv_group(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert kv_group(4, 1).tolist() == [0] * 4 and kv_group(3, 3).tolist() == [0, 1, 2]
    for n_kv in (3, 0):  # 4 query heads cannot share 3 KV heads (it returned [0, 1, 2, 3]); 0 divided by zero
        with pytest.raises(ValueError, match="cannot serve"):
            kv_group(4, n_kv)
    gen = torch.Generator().manual_seed(0)
    value, probs = torch.randn(2, 2, 7, 5, generator=gen), torch.rand(2, 6, 4, 7, generator=gen)
    out = top1_values(value, probs)  # (batch, head, query, d_head)
    for b in range(2):
        for h in range(6):
            for t in range(4):
                assert torch.equal(out[b, h, t], value[b, h // 3, int(probs[b, h, t].argmax())])
