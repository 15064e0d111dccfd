"""atlas_core.train: configs, tokenizer, data order, model swaps, the loop's determinism, resume and atomicity.

Tiny sizes throughout (d_model 32, 2 layers, seq 32, at most 200 steps on the Britannica article's training
tail), each test seconds. The run fixtures share one cache folder and one uninterrupted reference run.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from atlas_core.corpus import EVAL_FRACTION, BlockSpec, load_text, token_blocks, token_stream
from atlas_core.extract import extract
from atlas_core.models import ModelError, load_model
from atlas_core.train import data, loop
from atlas_core.train.config import ArchConfig, TrainConfig, from_dict, match_d_ff, variants
from atlas_core.train.model import build_model, count_parameters, load_checkpoint
from atlas_core.train.tokenizer import fit_bpe, load_tokenizer, tokenizer_path, training_text

CORPUS = "britannica"
VOCAB = 512
ARCH = ArchConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_ff=64, vocab_size=VOCAB,
                  max_positions=64)
CFG = TrainConfig(corpus=CORPUS, tokens=200 * 8 * 32, batch_size=8, seq_len=32, lr=1e-2, min_lr=1e-3,
                  eval_every=50, eval_blocks=8)
VARIANTS = variants(ARCH.replace(n_kv_heads=4), d_heads=(8, 16))


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One cache folder for the module (tokenizer and training tokens built once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted tiny run."""
    return loop.train(ARCH, CFG, tmp_path_factory.mktemp("reference"), progress=False)


def final_weights(result) -> dict:
    return load_checkpoint(result.checkpoints[1.0]).model.state_dict()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the loop


def test_tiny_run_lowers_held_out_loss(reference):
    losses = [h["held_out_loss"] for h in reference.history]
    assert losses[0] == pytest.approx(np.log(VOCAB), abs=0.1)  # initialisation: near-uniform predictions
    assert losses[-1] < losses[0] - 1.0
    assert [h["step"] for h in reference.history] == [0, 20, 50, 100, 150, 200]  # evals and checkpoint steps
    assert {f: p.name for f, p in reference.checkpoints.items()} == {
        0.0: "step-000000", 0.1: "step-000020", 0.5: "step-000100", 1.0: "step-000200"}
    assert all(loop.checkpoint_problem(p) is None for p in reference.checkpoints.values())


def test_one_seed_is_bit_identical_and_another_is_not(reference, tmp_path):
    again = loop.train(ARCH, CFG, tmp_path / "again", progress=False)
    assert same_weights(final_weights(again), final_weights(reference))
    assert again.history == reference.history
    other = loop.train(ARCH, CFG.replace(seed=1), tmp_path / "other", progress=False)
    assert not same_weights(final_weights(other), final_weights(reference))


class Killed(Exception):
    """Stands for the process being killed."""


def test_resumed_run_equals_uninterrupted(reference, tmp_path, monkeypatch):
    real_save, steps = loop._save, []

    def save_then_die(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        if folder.name == "step-000100":
            raise Killed

    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(Killed):
        loop.train(ARCH, CFG, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000", "step-000020", "step-000100"]
    monkeypatch.setattr(loop, "_save", real_save)
    real_step = loop._step
    monkeypatch.setattr(loop, "_step", lambda *a: steps.append(a[3]) or real_step(*a))
    resumed = loop.train(ARCH, CFG, tmp_path, progress=False)
    assert steps[0] == 100 and len(steps) == 100  # only the second half was trained again
    assert same_weights(final_weights(resumed), final_weights(reference))
    assert resumed.history == reference.history
    assert torch.equal(torch.load(tmp_path / "step-000200" / "optimizer.pt", weights_only=True)["state"][0]["exp_avg"],
                       torch.load(reference.checkpoints[1.0] / "optimizer.pt", weights_only=True)["state"][0]["exp_avg"])
    steps.clear()
    loop.train(ARCH, CFG, tmp_path, progress=False)  # a finished run: nothing to do
    assert steps == []


def test_interrupted_checkpoint_write_leaves_no_folder(tmp_path, monkeypatch):
    def half_then_die(model, arch, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise Killed

    monkeypatch.setattr(loop, "save_weights", half_then_die)
    with pytest.raises(Killed):
        loop.train(ARCH, CFG, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "run.json"]  # no step-* folder, no temporary left
    assert loop.latest_checkpoint(tmp_path) is None


def test_damaged_checkpoint_is_skipped_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    loop.train(ARCH, CFG.replace(tokens=20 * 8 * 32, checkpoints=(0.0, 0.5, 1.0)), run, progress=False)
    (run / "step-000020" / "optimizer.pt").write_bytes(b"flipped")
    assert loop.latest_checkpoint(run).name == "step-000010"
    assert "step-000020 has a missing or damaged optimizer.pt" in capsys.readouterr().err


def test_run_folder_refuses_another_run_and_unasked_resume(reference):
    with pytest.raises(ValueError, match=r"holds a different run \(train.seed differs\)"):
        loop.train(ARCH, CFG.replace(seed=5), reference.out_dir, progress=False)
    with pytest.raises(ValueError, match="pass resume=True"):
        loop.train(ARCH, CFG, reference.out_dir, resume=False, progress=False)


def test_learning_rate_schedule():
    cfg = TrainConfig(tokens=100 * 4 * 8, batch_size=4, seq_len=8, lr=1.0, min_lr=0.1, warmup_fraction=0.1)
    lrs = [loop.lr_at(s, cfg) for s in range(cfg.n_steps)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to lr
    assert lrs[-1] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then non-increasing (cosine)


# ----------------------------------------------------------------------------- data and tokenizer


def test_training_tokens_never_touch_the_eval_split():
    tok = load_tokenizer(CORPUS, VOCAB)
    stream = token_stream(tok, CORPUS)
    start = data.train_start(len(stream))
    assert torch.equal(data.train_tokens(tok, CORPUS), stream[start:])
    for seq_len in (2, 17, 32, 256, 1000):
        for add_bos in (False, True):
            content = seq_len - add_bos
            n_eval = int(len(stream) // content * EVAL_FRACTION)
            assert n_eval * content <= start  # the eval split ends before the first training token
    for n in range(2, 400):  # the same bound for any stream length and block length
        for c in range(1, 40):
            assert int(n // c * EVAL_FRACTION) * c <= data.train_start(n)


def test_batches_are_a_function_of_seed_and_step():
    stream = torch.arange(1000)
    x, y = data.batch(stream, 3, 7, 4, 10)
    assert x.shape == y.shape == (4, 10) and torch.equal(y, x + 1)
    assert torch.equal(data.batch(stream, 3, 7, 4, 10)[0], x)
    assert not torch.equal(data.batch(stream, 4, 7, 4, 10)[0], x)
    n_win = data.n_windows(len(stream), 10)  # 99 windows; one epoch visits each once
    seen = np.concatenate([data.window_indices(0, s, 9, n_win) for s in range(11)])
    assert sorted(seen.tolist()) == list(range(n_win))


def test_tokenizer_is_deterministic_cached_and_a_transformers_tokenizer():
    text = training_text(CORPUS)
    assert fit_bpe(text, VOCAB).to_str() == fit_bpe(text, VOCAB).to_str()
    tok = load_tokenizer(CORPUS, VOCAB)
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == VOCAB
    assert tok.eos_token_id == 0 and tok.bos_token_id is None
    path = tokenizer_path(CORPUS, VOCAB)
    assert path.is_file() and Path(str(path) + ".sha256").is_file()
    assert tok.decode(tok("Stratford-upon-Avon, 1564.").input_ids) == "Stratford-upon-Avon, 1564."
    assert token_blocks(tok, BlockSpec(corpus=CORPUS, seq_len=32, n_blocks=3)).shape == (3, 32)
    assert text.startswith("\n\n") and len(text) < (1 - EVAL_FRACTION) * 1.01 * len(load_text(CORPUS))


# ----------------------------------------------------------------------------- configs and variants


@pytest.mark.parametrize("name", list(VARIANTS))
def test_n_parameters_equals_the_built_model(name):
    arch = VARIANTS[name]
    assert arch.n_parameters() == count_parameters(build_model(arch))


def test_variants_are_matched_and_change_one_axis():
    assert list(VARIANTS) == ["base", "dhead16", "gqa2", "mqa", "learned", "layernorm"]
    counts = [a.n_parameters() for a in VARIANTS.values()]
    per_unit = 3 * ARCH.d_model * ARCH.n_layers  # one unit of d_ff
    assert max(counts) - min(counts) <= per_unit
    assert VARIANTS["dhead16"].d_ff == ARCH.d_ff  # the widest attention keeps the base MLP
    assert VARIANTS["base"].d_ff > ARCH.d_ff
    assert VARIANTS["mqa"].n_kv_heads == 1 and VARIANTS["gqa2"].n_kv_heads == 2
    assert match_d_ff(ARCH, ARCH.n_parameters()) == ARCH
    with pytest.raises(ValueError, match="n_params 100 is below"):
        match_d_ff(ARCH, 100)


@pytest.mark.parametrize("kind, fields, field", [
    (ArchConfig, {"n_kv_heads": 3}, "n_kv_heads"),
    (ArchConfig, {"d_model": 0}, "d_model"),
    (ArchConfig, {"d_head": 7}, "d_head"),
    (ArchConfig, {"d_head": 7, "position": "learned"}, "d_head"),  # transformers' LlamaConfig refused it, traceback
    (ArchConfig, {"position": "alibi"}, "position"),
    (ArchConfig, {"norm": "batchnorm"}, "norm"),
    (ArchConfig, {"vocab_size": 100}, "vocab_size"),
    (ArchConfig, {"rope_theta": -1.0}, "rope_theta"),
    (TrainConfig, {"lr": -1.0}, "lr"),
    (TrainConfig, {"min_lr": 1.0}, "min_lr"),
    (TrainConfig, {"tokens": 10}, "tokens"),
    (TrainConfig, {"checkpoints": (0.5, 1.5)}, "checkpoints"),
    (TrainConfig, {"checkpoints": (0.0, 0.5)}, "checkpoints"),  # the final weights never saved, every rerun retrained
    (TrainConfig, {"device": "tpu"}, "device"),
    (TrainConfig, {"warmup_fraction": 1.0}, "warmup_fraction"),
    (TrainConfig, {"batch_size": True}, "batch_size"),
])
def test_bad_config_raises_one_line_naming_the_field(kind, fields, field):
    with pytest.raises(ValueError) as err:
        kind(**fields)
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message


def test_configs_round_trip_through_json_and_refuse_unknown_fields():
    assert from_dict(TrainConfig, json.loads(json.dumps(CFG.as_dict()))) == CFG
    assert from_dict(ArchConfig, json.loads(json.dumps(ARCH.as_dict()))) == ARCH
    with pytest.raises(ValueError, match="ArchConfig has no field 'n_head'"):
        from_dict(ArchConfig, {"n_head": 4})


def test_too_few_held_out_blocks_are_refused_before_the_run_folder_is_written(tmp_path):
    with pytest.raises(ValueError, match="were asked for"):
        loop.train(ARCH, CFG.replace(eval_blocks=10**6), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # no run.json left behind


def test_seq_len_beyond_positions_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"seq_len \(128\) exceeds max_positions \(64\)"):
        loop.train(ARCH, CFG.replace(seq_len=128), tmp_path, progress=False)


# ----------------------------------------------------------------------------- the model and its swaps


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_runs_forward_and_generates_with_a_cache(name):
    model = build_model(VARIANTS[name], seed=0).eval()
    prompt = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(prompt).logits.shape == (1, 6, VOCAB)
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)  # uses a KV cache
        ids = prompt
        for _ in range(8):  # greedy decoding without a cache, the whole sequence every step
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_layernorm_variant_has_layernorms_only():
    model = build_model(VARIANTS["layernorm"])
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(nn.LayerNorm) == 2 * ARCH.n_layers + 1 and LlamaRMSNorm not in kinds
    assert all(isinstance(m, LlamaRMSNorm) for m in (build_model(VARIANTS["base"]).model.norm,))


def test_learned_positions_replace_rope():
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)  # an explicit mask: reordered position_ids are not read as packed sequences
    order = torch.arange(12)[None]
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))[None]

    def logits(model, positions):
        with torch.no_grad():
            return model(ids, attention_mask=mask, position_ids=positions).logits

    rope = build_model(VARIANTS["base"]).eval()
    assert not torch.allclose(logits(rope, order), logits(rope, perm), atol=1e-4)
    learned = build_model(VARIANTS["learned"]).eval()
    assert not torch.allclose(logits(learned, order), logits(learned, perm), atol=1e-4)
    permuted = build_model(VARIANTS["learned"]).eval()
    with torch.no_grad():  # table rows permuted: position t now reads the row position perm[t] read
        permuted.model.embed_positions.weight[:12] = learned.model.embed_positions.weight[perm[0]]
    assert torch.equal(logits(permuted, order), logits(learned, perm))  # positions act only through the table
    with pytest.raises(ValueError, match="beyond the 64 learned positions"):
        learned(torch.ones(1, 65, dtype=torch.long))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_checkpoint_loads_for_extraction(name, tmp_path):
    arch = VARIANTS[name]
    result = loop.train(arch, CFG.replace(tokens=5 * 8 * 32, checkpoints=(1.0,)), tmp_path / name, progress=False)
    lm = load_checkpoint(result.checkpoints[1.0])
    assert lm.spec.family == "llama" and lm.spec.n_kv_heads == arch.n_kv_heads and lm.spec.d_head == arch.d_head
    assert lm.spec.add_bos is False and lm.spec.name == f"{name}/step-000005"
    trained = build_model(arch)
    loop._restore(result.checkpoints[1.0], trained, loop.make_optimizer(trained, CFG), torch.device("cpu"))
    blocks = token_blocks(lm, BlockSpec(corpus=CORPUS, seq_len=32, n_blocks=2))
    with torch.no_grad():
        assert torch.allclose(lm.model(blocks).logits, trained.eval()(blocks).logits, atol=1e-5)
    acts = extract(lm, blocks, [0, -1], fields=("z", "c", "eps"), progress=False)
    for layer in (0, arch.n_layers - 1):
        a = acts[layer]
        assert a.eps.shape == (arch.n_heads, 2 * 32, arch.d_head)
        torch.testing.assert_close(a.c.sum(0), a.attn_out, atol=1e-5, rtol=1e-4)  # Σ_h c_h = attention output
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(result.checkpoints[1.0]))  # a plain Llama would drop the swaps: refused
