import json
import socket

import pytest
import torch

from atlas_core import models
from atlas_core.models import EMBEDDED, ModelError, load_model
from atlas_core.toy import FAMILIES, toy_model


def test_toy_spec_matches_config(toy_lm):
    spec, cfg = toy_lm.spec, toy_lm.model.config
    assert spec.n_layers == len(spec.layer_types) == len(spec.windows) == 2
    assert spec.n_heads * spec.d_head == cfg.num_attention_heads * spec.d_head
    assert spec.n_heads % spec.n_kv_heads == 0
    assert toy_lm.model.config._attn_implementation == "eager"
    assert next(toy_lm.model.parameters()).dtype == torch.float32


def test_sliding_windows_in_spec():
    assert load_model("toy-mistral").spec.windows == (8, 8)
    gemma = load_model("toy-gemma3").spec
    assert gemma.layer_types == ("sliding_attention", "full_attention") and gemma.windows == (8, None)
    assert gemma.n_kv_heads == 1  # MQA


def test_qwen3_and_phi3_toys_keep_their_families_quirks():
    qwen3 = load_model("toy-qwen3")
    assert qwen3.spec.d_head == 32 and qwen3.spec.n_heads * qwen3.spec.d_head != qwen3.spec.d_model
    phi3 = load_model("toy-phi3").model
    attn, mlp = phi3.model.layers[0].self_attn, phi3.model.layers[0].mlp
    assert hasattr(attn, "qkv_proj") and hasattr(mlp, "gate_up_proj")  # fused projections
    assert phi3.model.rotary_emb.inv_freq.numel() * 2 == attn.head_dim // 2  # RoPE on half of each head


def test_toy_is_deterministic():
    a, _ = toy_model("llama", seed=3)
    b, _ = toy_model("llama", seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_local_folder_round_trip(tmp_path):
    model, tok = toy_model("qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.spec.source == "local" and lm.spec.family == "qwen2"
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(lm.model(ids).logits, model(ids).logits, atol=1e-6)


@pytest.mark.parametrize("name", ["no-such-model", "/no/such/folder", "weird name!"])
def test_unknown_model_lists_embedded_names(name):
    with pytest.raises(ModelError) as err:
        load_model(name)
    for embedded in EMBEDDED:
        assert embedded in str(err.value)


def test_manifest_detects_truncation_and_corruption(tmp_path):
    model, tok = toy_model("gpt2")
    model.save_pretrained(tmp_path)
    models._write_manifest(tmp_path, source="test")
    assert models._valid_cache(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not models._valid_cache(tmp_path)
    weights.write_bytes(bytes(data[:100]))
    assert not models._valid_cache(tmp_path)
    assert not models._valid_cache(tmp_path / "missing")


@pytest.mark.slow
def test_embedded_load_never_touches_network(smollm2, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    lm = load_model("smollm2-135m")
    spec = lm.spec
    assert (spec.family, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head, spec.d_model) == (
        "llama", 30, 9, 3, 64, 576,
    )
    assert spec.add_bos is False and spec.source == "embedded"


@pytest.mark.slow
def test_corrupt_embedded_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    reference = load_model("smollm2-135m").model(ids).logits
    folder = tmp_path / "models" / "smollm2-135m"
    manifest = json.loads((folder / models.MANIFEST).read_text())
    weights = folder / "model.safetensors"
    assert "model.safetensors" in manifest["sha256"]
    half = weights.read_bytes()[: weights.stat().st_size // 2]
    weights.unlink()  # a new inode: the loaded model still maps the old one
    weights.write_bytes(half)
    again = load_model("smollm2-135m")
    assert models._valid_cache(folder)
    assert torch.equal(again.model(ids).logits, reference)


def test_parameter_count_takes_tied_embeddings_once():
    lm = load_model("toy-llama")
    model = lm.model
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    body = sum(p.numel() for n, p in model.named_parameters() if p is not emb and p is not head)
    tied = head.data_ptr() == emb.data_ptr()
    assert models.n_parameters(model) == body + emb.numel() + (0 if tied else head.numel())
    # a separate copy of the embedding as the output (a GGUF that stores the tied matrix twice)
    model.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
    assert models.n_parameters(model, tied_embeddings=False) == body + 2 * emb.numel()
    assert models.n_parameters(model, tied_embeddings=True) == body + emb.numel()
    assert models.parameter_count(lm) == models.n_parameters(model)  # a toy: its config decides


def test_every_embedded_model_ties_its_embeddings():
    assert all(m.tied_embeddings for m in EMBEDDED.values())  # SmolLM2, Gemma 3 and Qwen2.5-0.5B all tie


@pytest.mark.slow
def test_qwen_parameter_count_is_the_published_one():
    lm = load_model("qwen2.5-coder-0.5b")
    assert sum(p.numel() for p in lm.model.parameters()) / 1e6 == pytest.approx(630.2, abs=0.1)  # two copies
    assert models.parameter_count(lm) / 1e6 == pytest.approx(494.0, abs=0.1)  # Qwen2.5-0.5B: 0.49 B


def test_model_title_names_a_model_for_prose(tmp_path):
    from atlas_core.zoo import EMBEDDED, model_title

    assert model_title("smollm2-135m") == "SmolLM2-135M" and model_title("gemma3-270m") == "Gemma 3 270M"
    assert all(m.title and m.title != m.name for m in EMBEDDED.values())
    assert model_title("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id as given
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert model_title(str(folder)) == "my-model"  # a local folder by its name, not its whole path
