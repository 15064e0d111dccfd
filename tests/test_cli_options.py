"""Every option of every ``atlas`` command refuses an impossible value up front (issue 17, "Errors a user can make").

The parser is walked (every subcommand, nested ones such as ``bench sparse-decode`` included, and every
option), and each option is given the impossible values of its kind: an int 0, -1, 10**9 and a non-number, a
float nan, inf, -1 and a non-number, a choice outside its choices, a path that is missing or a file where a
folder is wanted. ``RULES`` says, per option, which of those values are in fact allowed (``--layer -1`` counts
from the end) and adds the values only the option's rule knows (``--rank 99`` on a 16-wide head). Each value
must give exit status 2, one line on stderr that names the option, no file written, and no model loaded and
no kernel started (those are replaced by a tripwire).
"""

from __future__ import annotations

import argparse
import os
import subprocess

import pytest

import atlas_core.bench  # noqa: F401  imported before any tripwire is set: they bind load_model at import
import atlas_core.kvquant.bench  # noqa: F401
import atlas_core.sparse.bench  # noqa: F401
from atlas_core.book.cli import _parser, main


class Tripwire(BaseException):
    """Raised by a model load or a kernel start that the option's check should have prevented (a
    BaseException, so the CLI's own error handling cannot turn it into a message)."""


# Where each command would load a model or start work; the check must come before all of these.
HEAVY = [
    ("atlas_core.models", "load_model"),
    ("atlas_core.bench", "load_model"),  # the benchmarks check their settings, then load
    ("atlas_core.kvquant.bench", "load_model"),
    ("torch", "randn"),  # bench sparse-decode's synthetic cache: no tensor before the sizes and device pass
    ("atlas_core.book.browser", "Chromium"),
    ("papermill", "execute_notebook"),
    ("atlas_core.book.book_bench", "fresh_clone_build"),
    ("atlas_core.book.book_bench", "rebuild"),
    ("atlas_core.book.book_bench", "qwen_kvquant"),
    ("atlas_core.book.book_bench", "cli_figure"),
    ("atlas_core.train.loop", "train"),  # atlas train: the run's values pass before any text is tokenized
]

# Small sizes that work, so that a wrongly accepted value reaches a tripwire at once.
BASE = {
    ("ppl",): ["--model", "toy-llama", "--tokens", "128", "--seq-len", "64"],
    ("overlap",): ["--model", "toy-llama", "--blocks", "2", "--seq-len", "32", "--n-points", "40", "--k", "3"],
    ("id",): ["--model", "toy-llama", "--blocks", "2", "--seq-len", "32", "--n-points", "40"],
    ("run",): ["atlas", "--model", "toy-llama", "--out", "{out}"],
    ("book",): ["--cores", "1", "--models", "toy-llama"],
    ("compare",): ["{file}", "{file}"],
    ("check-book",): ["--html", "{tmp}"],
    ("kvquant",): ["--model", "toy-llama", "--method", "headq", "--tokens", "256", "--seq-len", "64", "--prefill", "16",
                   "--calib-tokens", "128", "--group", "16", "--rank", "4"],
    ("kv-storage",): ["--model", "toy-llama", "--bits", "2", "--tokens", "256", "--seq-len", "64", "--prefill", "16",
                      "--calib-tokens", "128", "--group", "16", "--rank", "4"],
    ("sparse",): ["--model", "toy-llama", "--prompt-tokens", "128", "--gen-tokens", "4", "--eval-tokens", "256",
                  "--seq-len", "128", "--window", "8", "--topk", "4"],
    ("wquant",): ["--model", "toy-llama", "--tokens", "256", "--seq-len", "64", "--calib-tokens", "128",
                  "--calib-seq-len", "64"],
    ("bench", "extract"): ["--model", "toy-llama", "--blocks", "2", "--seq-len", "32", "--repeats", "1"],
    ("bench", "kvquant"): ["--model", "toy-llama", "--ctx", "64", "--steps", "2", "--rounds", "1", "--group", "16",
                           "--rank", "4"],
    ("bench", "kv-decode"): ["--context", "128", "--heads", "4", "--kv-heads", "2", "--d-head", "32", "--rounds", "1",
                             "--steps", "1"],
    ("bench", "sparse-decode"): ["--context", "256", "--heads", "4", "--kv-heads", "2", "--d-head", "16",
                                 "--rounds", "1", "--steps", "1", "--window", "8", "--topk", "4"],
    ("bench", "book"): ["--results", "{tmp}"],
    ("models",): [],
    ("train",): ["base", "--out", "{out}", "--tokens", "4096"],
}

BIG = str(10**9)
INT_BAD = ("0", "-1", BIG, "x")
FLOAT_BAD = ("nan", "inf", "-1", "x")
MISSING = "{tmp}/no-such-file"
A_FILE = "{file}"  # a file where a folder is wanted

# Values refused only after the model loads: none. A request for more tokens than the corpus holds (10**9
# --tokens, --calib-tokens, --eval-tokens, --blocks) is counted with the model's tokenizer alone
# (models.load_tokenizer, corpus.check_blocks) before the weights load.
LATE: frozenset = frozenset()

# (command, option) -> {"ok": values of the type's sweep that the option allows (and why),
#                       "bad": [(value, word the message must hold)] the rule knows beyond the type,
#                       "word": the word naming the option when neither the flag nor its field name is used}
RULES = {
    ("overlap", "--layer"): {"ok": ("0", "-1")},  # negative counts from the end
    ("id", "--layer"): {"ok": ("0", "-1")},
    ("bench", "extract", "--layer"): {"ok": ("0", "-1")},
    ("overlap", "--seed"): {"ok": ("0", BIG)},  # any non-negative seed
    ("id", "--seed"): {"ok": ("0", BIG)},
    ("kvquant", "--seed"): {"ok": ("0", BIG)},
    ("kvquant", "--residual"): {"ok": ("0",)},  # no full-precision tokens
    ("sparse", "--dense-layers"): {"ok": ("0",)},  # no dense layer
    ("wquant", "--group"): {"ok": ()},
    ("kvquant", "--rank"): {"bad": [("17", "--rank"), ("99", "--rank")]},  # toy-llama's d_head is 16
    ("bench", "kvquant", "--rank"): {"bad": [("17", "--rank"), ("99", "--rank")]},
    ("bench", "kvquant", "--group"): {"bad": [("5", "--group")]},  # does not divide d_head 16
    ("overlap", "--k"): {"bad": [("16", "--k")]},  # k < d_head = 16
    ("kvquant", "--calib-tokens"): {"bad": [("100", "--calib-tokens")]},  # not a whole number of --seq-len blocks
    ("kvquant", "--prefill"): {"bad": [("63", "--prefill")]},  # leaves nothing to decode in 64-token blocks
    ("kvquant", "--basis"): {"bad": [(("whitened", "--control", "key-pca"), "--basis"),  # a HeadQ variant, not a control
                                     (("whitened", "--method", "kivi"), "--basis")]},  # nor another method's
    # Counts whose only limit at 10**9 is time, not a rule: a billion rounds is slow, not impossible.
    ("bench", "extract", "--repeats"): {"ok": (BIG,)},
    ("bench", "kvquant", "--rounds"): {"ok": (BIG,)},
    ("bench", "sparse-decode", "--rounds"): {"ok": (BIG,)},
    ("bench", "kv-decode", "--rounds"): {"ok": (BIG,)},  # slow, not impossible
    ("bench", "kv-decode", "--steps"): {"ok": (BIG,)},
    ("bench", "kv-decode", "--kv-heads"): {"bad": [("3", "--kv-heads")]},  # does not divide --heads 4
    ("bench", "kv-decode", "--d-head"): {"bad": [("48", "group")]},  # the value group 32 does not divide 48
    ("bench", "kv-decode", "--context"): {"bad": [("63", "--context")]},  # one key group beside the 32-token window
    ("bench", "sparse-decode", "--steps"): {"ok": (BIG,)},
    ("bench", "sparse-decode", "--heads"): {"ok": (BIG,)},  # 10**9 query heads: 64 GB of queries, which may fit
    ("kvquant", "--batch"): {"ok": (BIG,)},  # more blocks per forward than blocks: one forward
    ("kvquant", "--group"): {"ok": (BIG,), "bad": [("5", "--group")]},  # wider than the head: the whole head
    ("kvquant", "--grid"): {"bad": [("lloyd-max", "--grid")]},  # per-channel keys only: not HeadQ (the base command)
    ("kvquant", "--budget"): {"bad": [("3", "--budget")]},  # query-tc only: not HeadQ (the base command)
    ("kv-storage", "--bits"): {"bad": [(("2", "2"), "bits"), (("2", "9"), "bits")]},  # distinct, each 1..8
    ("kv-storage", "--families"): {"bad": [(("kivi pre-RoPE", "--model", "toy-gpt2"), "--families")]},  # GPT-2: no RoPE
    ("kv-storage", "--group"): {"bad": [("5", "--group"), ("64", "KIVI's residual")]},  # 5: does not divide d_head 16;
    # 64 (and 10**9): KIVI's fp window, its group, holds the whole 64-token block
    ("kv-storage", "--rank"): {"bad": [("17", "--rank"), ("99", "--rank")]},  # toy-llama's d_head is 16
    ("kv-storage", "--calib-tokens"): {"bad": [("100", "--calib-tokens")]},  # not a whole number of --seq-len blocks
    ("kv-storage", "--prefill"): {"bad": [("63", "--prefill")]},  # leaves nothing to decode in 64-token blocks
    ("sparse", "--anchors"): {"ok": ("0",), "word": "budget"},  # no anchor; 10**9: a budget above the prompt
    ("sparse", "--window"): {"word": "budget"},
    ("sparse", "--topk"): {"ok": ("0",), "word": "budget"},  # anchors and window only
    ("sparse", "--page-size"): {"ok": (BIG,)},  # unused by the default top-k selector
    ("bench", "sparse-decode", "--anchors"): {"ok": ("0",), "word": "budget"},
    ("bench", "sparse-decode", "--window"): {"word": "budget"},
    ("bench", "sparse-decode", "--topk"): {"ok": ("0",), "word": "budget"},
    ("wquant", "--seed"): {"ok": ("0", BIG, "-1")},  # torch seeds the rotations from any 64-bit integer
    ("wquant", "--calib-tokens"): {"word": "calibration tokens"},
    ("wquant", "--calib-seq-len"): {"word": "seq_len"},  # CalibConfig's field: the calibration seq_len
    ("overlap", "--blocks"): {"word": "n_blocks"},  # CloudSpec's fields
    ("id", "--blocks"): {"word": "n_blocks"},
    ("overlap", "--seq-len"): {"word": "seq_len"},
    ("id", "--seq-len"): {"word": "seq_len"},
    ("book", "--cores"): {"ok": (BIG,)},  # more jobs than cores: Snakemake queues them
    ("bench", "sparse-decode", "--device"): {"bad": [("foo", "--device"), ("cuda:99", "--device")]},
    ("bench", "sparse-decode", "--real-keys"): {"bad": [("no-such-model", "--real-keys")]},  # needs --selector certified
    ("bench", "sparse-decode", "--real-corpus"): {"bad": [(MISSING, "--real-corpus")]},  # needs --real-keys
    ("ppl", "--corpus"): {"bad": [(MISSING, "corpus")]},
    ("overlap", "--corpus"): {"bad": [(MISSING, "corpus")]},
    ("id", "--corpus"): {"bad": [(MISSING, "corpus")]},
    ("kvquant", "--corpus"): {"bad": [(MISSING, "corpus")]},
    ("kv-storage", "--corpus"): {"bad": [(MISSING, "corpus")]},
    ("sparse", "--corpus"): {"bad": [(MISSING, "corpus")]},
    ("wquant", "--corpus"): {"bad": [(MISSING, "corpus")]},
    ("wquant", "--calib-corpus"): {"bad": [(MISSING, "corpus")]},
    ("run", "chapter"): {"bad": [("no-such-chapter", "no-such-chapter")]},
    ("run", "--param"): {"bad": [(("no_such", "1"), "no_such"), (("k", "x"), "'k'")]},
    ("run", "--out"): {"bad": [(A_FILE, "--out")] + ([("{readonly}", "--out")] if os.geteuid() else [])},  # root writes anyway
    ("run", "--source"): {"bad": [(MISSING, "no-such-file")]},
    ("book", "--models"): {"bad": [("no-such-model", "no-such-model")]},
    ("compare", "first"): {"bad": [(MISSING, "no-such-file"), ("{tmp}", "cannot be read")]},
    ("compare", "second"): {"bad": [(MISSING, "no-such-file"), ("{tmp}", "cannot be read")]},
    ("check-book", "--html"): {"bad": [(MISSING, "no-such-file"), (A_FILE, "HTML")]},
    ("bench", "book", "--results"): {"bad": [(MISSING, "--results"), (A_FILE, "--results")]},
    ("train", "config"): {"bad": [("no-such-variant", "no-such-variant"), (MISSING, "no-such-file")]},
    ("train", "--out"): {"bad": [(A_FILE, "--out")]},
    ("train", "--tokens"): {"ok": (BIG,), "bad": [("100", "tokens")]},  # 10**9: many epochs, slow, not impossible;
    # 100: less than one step of batch_size * seq_len tokens
    ("train", "--seed"): {"ok": ("0", BIG)},  # any non-negative seed
}
MODEL_BAD = [("no-such-model", "no-such-model")]
UNTYPED_OK = {"--model"}  # checked by MODEL_BAD


def commands(parser=None, path=()):
    """(command path, subparser) for every leaf command, nested subcommands included."""
    parser = parser or _parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and path:
        yield path, parser
    for s in subs:
        for name, child in s.choices.items():
            yield from commands(child, (*path, name))


def options():
    """Every (command, action) with a value: flags without one (--json, --memo) take no bad value."""
    for path, sub in commands():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreConstAction)):
                continue
            yield path, action


def _name(action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def cases():
    """(command, option, value, word) for every option's impossible values."""
    out = []
    for path, action in options():
        name = _name(action)
        rule = RULES.get((*path, name), {})
        if action.choices is not None:
            values = [("no-such", name)]
        elif action.type is int:
            values = [(v, name) for v in INT_BAD if v not in rule.get("ok", ())]
        elif action.type is float:
            values = [(v, name) for v in FLOAT_BAD if v not in rule.get("ok", ())]
        elif name == "--model":
            values = list(MODEL_BAD)
        else:
            values = []
        values += rule.get("bad", [])
        assert values, f"{' '.join(path)} {name}: no impossible value is known; add it to RULES"
        out += [pytest.param(path, name, v, rule.get("word", w), (*path, name, v) in LATE, id=f"{' '.join(path)} {name} {v}")
                for v, w in values]
    return out


def _argv(path, name, value, places) -> list[str]:
    """The command's base arguments with ``name`` set to ``value`` (a positional replaced in place)."""
    base = [a.format(**places) for a in BASE[path]]
    value = [v.format(**places) for v in value] if isinstance(value, tuple) else [value.format(**places)]
    sub = dict(commands())[path]
    action = next(a for a in sub._actions if _name(a) == name)
    if not action.option_strings:  # a positional: its place among the positionals
        positionals = [a for a in sub._actions if not a.option_strings]
        index = [i for i, a in enumerate(base) if not a.startswith("-") and (i == 0 or not base[i - 1].startswith("-"))]
        base[index[positionals.index(action)]] = value[0]
        return [*path, *base]
    if name in base:
        i = base.index(name)
        del base[i:i + 2]
    return [*path, *base, name, *value]


@pytest.fixture
def places(tmp_path, monkeypatch, request):
    """Paths the values name, a tripwire on every model load and kernel start (a model load is allowed for
    a LATE value), and a cache and working folder that must stay empty."""
    import importlib

    late = request.node.callspec.params.get("late", False)
    for module, attr in HEAVY:
        if late and attr in ("load_model", "randn"):  # loading the toy model draws its weights
            continue
        def trip(*args, _what=f"{module}.{attr}", **kwargs):
            raise Tripwire(f"{_what} was called: the bad value was not refused first")
        monkeypatch.setattr(importlib.import_module(module), attr, trip)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(Tripwire(f"subprocess.run{a}")))
    (tmp_path / "a-file").write_text("{}\n")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(cache))
    yield {"tmp": str(tmp_path), "file": str(tmp_path / "a-file"), "out": str(tmp_path / "out"),
           "readonly": str(readonly)}
    readonly.chmod(0o700)


def _written(root, late: bool = False) -> list[str]:
    """Files under ``root`` (the cache left out once a model has loaded: it may hold the corpus's tokens)."""
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not (late and (root / "cache") in p.parents))


@pytest.mark.parametrize("path, name, value, word, late", cases())
def test_an_impossible_value_is_refused_before_any_work(path, name, value, word, late, places, tmp_path, capsys):
    argv = _argv(path, name, value, places)
    before = _written(tmp_path, late)
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own refusal (a type or a choice): usage, then one error line
        status = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and err and err[-1].startswith("atlas") and ": error: " in err[-1], (argv, err)
        assert f"argument {name}" in err[-1] or name in err[-1], (argv, err)
    else:
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("atlas: error: "), (argv, status, err)
        named = {word, name, name.lstrip("-").replace("-", "_")}  # the flag, its field, or RULES' word
        if late and path[0] in ("overlap", "id", "bench"):  # the corpus's own message, the blocks asked for
            named.add("were asked for")  # (their blocks are cut inside the library: no flag to prefix)
        assert any(w in lines[0] for w in named), (argv, named, lines[0])
    assert _written(tmp_path, late) == before, f"{argv} wrote files"
    assert not os.path.exists(places["out"]), f"{argv} created the output folder"


def test_every_command_and_option_is_swept():
    """The walk reaches the nested benchmarks and every option; RULES and BASE name nothing that is gone."""
    found = {(*path, _name(a)) for path, a in options()}
    assert {("bench", "sparse-decode", "--device"), ("bench", "kvquant", "--rank"), ("run", "--out")} <= found
    assert set(RULES) <= found, set(RULES) - found
    assert {path for path, _ in commands()} == set(BASE)


@pytest.mark.parametrize("args, message", [
    # issue 17's cases, each refused before any model loads; before the fix (HEAD 4edf542):
    (["bench", "sparse-decode", "--device", "foo", "--context", "1024", "--heads", "4", "--kv-heads", "2", "--d-head", "16"],
     "device 'foo' is not a torch device name"),  # was a RuntimeError traceback from torch.randn(...).to("foo")
    (["overlap", "--model", "toy-llama", "--seed", "-1", "--blocks", "2", "--seq-len", "32", "--n-points", "40", "--k", "3"],
     "seed must be an integer ≥ 0, got -1"),  # was numpy's "expected non-negative integer" after the extraction
    (["bench", "extract", "--model", "toy-llama", "--repeats", "0", "--blocks", "2", "--seq-len", "32"],
     "repeats must be an integer ≥ 1, got 0"),  # was "no median for empty data" after the timed runs
    (["bench", "kvquant", "--model", "toy-llama", "--rank", "99", "--ctx", "64", "--steps", "2", "--rounds", "1",
      "--group", "16"], "rank (99) must be at most d_head (16)"),  # was exit 0, a report of rank 99
    (["kvquant", "--model", "toy-llama", "--method", "headq", "--calib-tokens", "100", "--tokens", "256", "--seq-len", "64",
      "--prefill", "16", "--group", "16", "--rank", "4"],
     "--calib-tokens (100) must be a multiple of --seq-len (64)"),  # was exit 0 on one calibration block
    (["ppl", "--model", "toy-gpt2", "--seq-len", "1024"], "longer than the 512 positions of toy-gpt2"),
])
def test_the_issues_cases_are_refused_before_the_model_loads(args, message, places, capsys):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("atlas: error: ") and message in err, err


@pytest.mark.parametrize("broken, message", [
    ("read-only", "is not writable (Read-only file system)"),  # a read-only mount refuses even root
    ("full", "MiB free"),  # was an OSError only after the whole chapter had run
])
def test_an_output_folder_that_cannot_take_the_outputs_is_refused_before_the_kernel(broken, message, places, monkeypatch,
                                                                                       capsys):
    import errno
    import shutil
    import tempfile
    from collections import namedtuple

    from atlas_core.book import runner

    if broken == "read-only":
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    else:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    assert main(["run", "atlas", "--model", "toy-llama", "--out", places["out"]]) == 2  # papermill is a tripwire
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and message in err, err
    assert not os.path.exists(places["out"])
    assert runner.OUTPUT_FREE_BYTES > 2**20


@pytest.mark.parametrize("command, prog", [(["book", "--pdf"], "atlas book"), (["run", "models"], "atlas run"),
                                           (["check-book"], "atlas check-book"), (["bench", "book"], "atlas bench book"),
                                           ([], "atlas")])
def test_an_unknown_option_is_reported_by_its_own_command(command, prog, capsys):
    """`atlas book --bogus` names `atlas book` and its --help, not the top-level parser."""
    from atlas_core.book.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*command, "--bogus"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"{prog}: error: unrecognized arguments: --bogus "
                                       f"(`{prog} --help` lists the options)\n")


def test_check_book_reads_the_repository_build_wherever_it_runs(tmp_path, monkeypatch, capsys):
    from atlas_core.book import runner
    from atlas_core.book.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "ROOT", tmp_path / "repo")
    assert main(["check-book"]) == 2
    assert capsys.readouterr().err.strip() == f"atlas: error: no HTML pages under {tmp_path / 'repo' / '_build' / 'html'}: build the book first"
