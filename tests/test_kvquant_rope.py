"""RoPE tables taken from the model: they reproduce its rotation, and unrotate inverts rotate."""

import pytest
import torch

from atlas_core.extract import extract
from atlas_core.kvquant import rope
from atlas_core.models import load_model


def test_tables_reproduce_the_models_rotation_and_invert(toy_lm):
    spec = toy_lm.spec
    if spec.family == "gpt2":
        with pytest.raises(ValueError, match="no rotary embedding"):
            rope.rotary_tables(toy_lm.model)
        return
    ids = torch.randint(4, 260, (1, 16), generator=torch.Generator().manual_seed(0))
    layers = list(range(spec.n_layers))
    acts = extract(toy_lm, ids, layers=layers, fields=("k", "k_pre"), progress=False)
    tables = rope.rotary_tables(toy_lm.model)
    cos, sin = None, None
    for layer in layers:
        cos, sin = tables[layer](torch.arange(16))  # (token, d_head)
        a = acts[layer]
        torch.testing.assert_close(rope.rotate(a.k_pre, cos, sin), a.k, atol=1e-5, rtol=0)
        torch.testing.assert_close(rope.unrotate(a.k, cos, sin), a.k_pre, atol=1e-5, rtol=0)


def test_gemma3_local_and_global_tables_differ():
    lm = load_model("toy-gemma3")
    tables = rope.rotary_tables(lm.model)
    local, glob = (tables[i](torch.arange(4, 8))[0] for i in (0, 1))  # layer 0 slides, layer 1 is global
    assert not torch.allclose(local, glob)
