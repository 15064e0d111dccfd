"""The training token stream and its batches, in an order fixed by (seed, step).

Training text. ``train_tokens`` is the corpus's token stream (``corpus.token_stream``) after its first
ceil(``EVAL_FRACTION`` * n) tokens. ``corpus.token_blocks``' eval split at any block length holds
floor(floor(n / c) * EVAL_FRACTION) blocks of c content tokens, at most EVAL_FRACTION * n tokens, so no
training token lies in the eval split the chapters measure perplexity and clouds on, whatever ``seq_len``
they use (tested). The stream is tokenized once and cached (``$ATLAS_CACHE_DIR/train``, sealed).

Order. The stream is cut into ``n_windows`` non-overlapping windows of ``seq_len + 1`` tokens, one every
``seq_len`` (each window's last token is the next window's first, so every token is a target once per epoch).
Epoch e visits the windows in a permutation drawn from NumPy's PCG64 seeded by (seed, e); step s takes the
windows at positions s*batch .. s*batch + batch - 1 of the epochs laid end to end. A batch is therefore a
pure function of (seed, step): a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch

from atlas_core.cache import cache_dir, cache_key, cached
from atlas_core.corpus import EVAL_FRACTION, CorpusError, load_text, token_stream


def train_start(n_tokens: int) -> int:
    """Index of the first training token of a stream of ``n_tokens``: ceil(EVAL_FRACTION * n_tokens)."""
    return math.ceil(EVAL_FRACTION * n_tokens)


def train_tokens(tokenizer, corpus: str) -> torch.LongTensor:
    """The tokens a model trains on: the corpus's stream after its eval split (module docstring), cached.

    Args:
        tokenizer: a Hugging Face tokenizer (``tokenizer.load_tokenizer``).
        corpus: a name in ``corpus.CORPORA`` or a text file path.
    Returns:
        (n_train,) LongTensor.
    """
    vocab = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    key = cache_key(kind="train-tokens", tokenizer=hashlib.sha256(vocab.encode()).hexdigest(),
                    text=hashlib.sha256(load_text(corpus).encode()).hexdigest(), fraction=EVAL_FRACTION)
    path = cache_dir("train") / f"tokens-{key}.npy"

    def build() -> np.ndarray:
        stream = token_stream(tokenizer, corpus)
        return stream[train_start(len(stream)):].numpy().astype(np.int32)

    def write(ids: np.ndarray, tmp) -> None:
        with open(tmp, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
            np.save(f, ids)

    ids = cached(path, build, write, lambda p: np.load(p, allow_pickle=False), "training tokens")
    return torch.from_numpy(ids.astype(np.int64))


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    """The order epoch ``epoch`` visits the windows in; (n_windows,)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, epoch)))).permutation(n_windows)


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens, one every seq_len, that a stream of ``n_tokens`` holds."""
    return (n_tokens - 1) // seq_len


def window_indices(seed: int, step: int, batch_size: int, n_win: int) -> np.ndarray:
    """Which windows step ``step`` trains on; (batch_size,) (module docstring)."""
    flat = np.arange(step * batch_size, (step + 1) * batch_size)  # positions in the epochs laid end to end
    epochs, pos = np.divmod(flat, n_win)
    return np.array([_permutation(seed, int(e), n_win)[p] for e, p in zip(epochs, pos)])


def batch(stream: torch.LongTensor, seed: int, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and next-token targets of step ``step``.

    Args:
        stream: (n_train,) training tokens (``train_tokens``).
        seed: the run's seed; step: the optimizer step (0-based).
    Returns:
        (inputs, targets), each (batch, seq_len); targets[b, t] = inputs[b, t + 1] within the stream.
    Raises:
        CorpusError: the stream holds no window of seq_len + 1 tokens.
    """
    n_win = n_windows(len(stream), seq_len)
    if n_win < 1:
        raise CorpusError(f"the training text holds {len(stream)} tokens, fewer than one window of seq_len + 1 = "
                          f"{seq_len + 1}; use a larger corpus or a shorter seq_len")
    starts = torch.from_numpy(window_indices(seed, step, batch_size, n_win) * seq_len)  # (batch,)
    rows = stream[starts[:, None] + torch.arange(seq_len + 1)]  # (batch, seq_len + 1)
    return rows[:, :-1], rows[:, 1:]


def epochs(n_tokens_trained: int, n_train: int) -> float:
    """How many passes over the training stream ``n_tokens_trained`` tokens make."""
    return n_tokens_trained / max(n_train, 1)
