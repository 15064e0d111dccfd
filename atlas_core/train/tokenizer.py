"""A byte-level BPE tokenizer trained offline on a corpus's training text, cached, as a transformers tokenizer.

The tokenizer is fitted by the ``tokenizers`` library (the BPE of GPT-2: bytes mapped to printable stand-ins,
the text pre-split by GPT-2's pattern, merges learned up to ``vocab_size``) on ``training_text(corpus)``,
the part of the corpus after its first ``EVAL_FRACTION`` of characters (cut at a paragraph break), so the
held-out text the chapters measure on does not shape the vocabulary. Training is deterministic (the same
text and size give the same JSON; tested), so the tokenizer is cached under ``$ATLAS_CACHE_DIR/tokenizers``
keyed by the text's SHA-256, the vocabulary size and the ``tokenizers`` version, written atomically and sealed
with its SHA-256 (``cache.cached``). One special token, ``<|endoftext|>``, serves as EOS and padding; there
is no BOS (the models never see one: ``LoadedModel.spec.add_bos`` is False).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from atlas_core.cache import cache_dir, cache_key, cached
from atlas_core.corpus import EVAL_FRACTION, load_text

EOS = "<|endoftext|>"
MIN_FREQUENCY = 2  # a merge must occur at least twice in the training text


def training_text(corpus: str) -> str:
    """The text the tokenizer is fitted on: ``corpus`` from the first paragraph break at or after
    ``EVAL_FRACTION`` of its characters (the whole tail when it has no later break).

    Args:
        corpus: a name in ``corpus.CORPORA`` or a text file path.
    Returns:
        the tail of the cleaned text (``corpus.load_text``).
    """
    text = load_text(corpus)
    start = math.ceil(EVAL_FRACTION * len(text))
    cut = text.find("\n\n", start)
    return text[start if cut < 0 else cut:]


def fit_bpe(text: str, vocab_size: int) -> Tokenizer:
    """Fit a byte-level BPE of ``vocab_size`` tokens (256 bytes, ``EOS`` and the merges) on ``text``.

    Args:
        text: the training text.
        vocab_size: the vocabulary size; fewer tokens result when the text has fewer merges of frequency >= 2.
    Returns:
        a ``tokenizers.Tokenizer``.
    Source: the ``tokenizers`` library's ``BpeTrainer`` with GPT-2's ``ByteLevel`` pre-tokenizer and decoder.
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=MIN_FREQUENCY, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([text], trainer=trainer)
    return core


def wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    """``core`` as a transformers tokenizer: ``EOS`` as end of text and padding, no BOS."""
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS)


def tokenizer_path(corpus: str, vocab_size: int) -> Path:
    """Where the tokenizer of ``corpus`` at ``vocab_size`` is cached (the key hashes the training text)."""
    text_sha = hashlib.sha256(training_text(corpus).encode()).hexdigest()
    key = cache_key(kind="bpe", text=text_sha, vocab_size=vocab_size, min_frequency=MIN_FREQUENCY,
                    tokenizers=tokenizers.__version__)
    stem = Path(corpus).stem if Path(corpus).suffix else corpus
    return cache_dir("tokenizers") / f"{stem}-bpe{vocab_size}-{key}.json"


def load_tokenizer(corpus: str = "plays", vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """The byte-level BPE of ``corpus`` at ``vocab_size``: from the cache, or fitted (about a second for the
    plays) and cached.

    Args:
        corpus: a name in ``corpus.CORPORA`` or a text file path (its training text: ``training_text``).
        vocab_size: the vocabulary size (257 at least: 256 bytes and ``EOS``).
    Returns:
        a ``PreTrainedTokenizerFast`` (``len`` = its vocabulary; fewer than ``vocab_size`` when the text is short).
    Raises:
        ValueError: ``vocab_size`` below 257.
        CorpusError: the corpus cannot be loaded.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes and {EOS}), got {vocab_size!r}")
    core = cached(tokenizer_path(corpus, vocab_size), lambda: fit_bpe(training_text(corpus), vocab_size),
                  lambda tok, tmp: tmp.write_text(tok.to_str()), lambda p: Tokenizer.from_str(p.read_text()),
                  "tokenizer")
    return wrap(core)
