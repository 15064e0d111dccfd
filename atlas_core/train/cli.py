"""``python -m atlas_core.train``: train one variant (or a JSON config) into a run folder, resumably.

    python -m atlas_core.train dhead64 --out runs/dhead64-s0 --tokens 400000 --seed 0 --device auto
    python -m atlas_core.train my_run.json --out runs/mine     # {"arch": {...}, "train": {...}}, each optional

A variant name is a key of ``config.variants(ArchConfig())`` (the matched-parameter ablation of the default
base); a JSON file gives ``ArchConfig`` and ``TrainConfig`` fields directly (unset fields take the defaults,
no parameter matching). ``--tokens``, ``--seed``, ``--device`` override the run's fields. Every value is checked
before any text is tokenized or any model built: a bad one exits with status 2 and one line on stderr.
``add_parser`` lets the ``atlas`` command mount it as ``atlas train``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # no hub lookups (they retry for ~50 s offline)
    os.environ.setdefault(_var, "1")

from atlas_core.train.config import DEVICES, ArchConfig, TrainConfig, check_pair, from_dict, variants  # noqa: E402


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``train`` command to an ``add_subparsers`` object; returns its parser (``func`` = ``run``)."""
    p = sub.add_parser("train", help="train a small model from scratch (an ablation variant or a JSON config)")
    _arguments(p)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help=f"a variant ({', '.join(variants())}) or a JSON file {{\"arch\": ..., \"train\": ...}}")
    p.add_argument("--out", required=True, help="the run folder (resumed when it holds this run's checkpoints)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default: the config's)")
    p.add_argument("--seed", type=int, default=None, help="initialisation and data-order seed (default: the config's)")
    p.add_argument("--device", choices=DEVICES, default=None, help="cpu, cuda or auto (default: the config's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def resolve(config: str, tokens: int | None = None, seed: int | None = None,
            device: str | None = None) -> tuple[ArchConfig, TrainConfig]:
    """The run a command line names, checked (no text tokenized, no model built).

    Raises:
        ValueError: an unknown variant, an unreadable or invalid JSON file, or a bad field (named).
        CorpusError: the corpus is neither a corpus name nor a file.
    """
    table = variants()
    if config in table:
        arch, train = table[config], TrainConfig()
    elif Path(config).suffix == ".json" or Path(config).is_file():
        arch, train = _from_json(Path(config))
    else:
        raise ValueError(f"unknown variant {config!r}: choose one of {', '.join(table)}, or give a JSON file")
    from atlas_core.corpus import check_corpus  # torch: only once a command runs (``atlas`` builds its parser without)

    overrides = {k: v for k, v in (("tokens", tokens), ("seed", seed), ("device", device)) if v is not None}
    train = train.replace(**overrides)
    check_pair(arch, train)
    check_corpus(train.corpus)
    return arch, train


def _from_json(path: Path) -> tuple[ArchConfig, TrainConfig]:
    try:
        spec = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"config file {path} cannot be read ({err.strerror})") from None
    except ValueError as err:
        raise ValueError(f"config file {path} is not JSON ({err})") from None
    if not isinstance(spec, dict) or set(spec) - {"arch", "train"}:
        raise ValueError(f"config file {path} must hold a JSON object with the keys 'arch' and/or 'train'")
    return from_dict(ArchConfig, spec.get("arch", {})), from_dict(TrainConfig, spec.get("train", {}))


def check_out_folder(out: str) -> Path:
    """``--out`` as a folder that is or can be made: not empty, not a file, and under a writable folder.

    Raises:
        ValueError: the path is empty, is a file, has a file among its parents, or cannot be written (named).
    """
    if not str(out).strip():
        raise ValueError("--out is empty; give the run's folder")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {path}: {parent} is a file, not a folder; give a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot write in {parent}; give a folder you can write to")
    return path


def run(args: argparse.Namespace) -> int:
    """Check the run, train it, print each checkpoint and the last held-out loss; returns 0."""
    arch, cfg = resolve(args.config, args.tokens, args.seed, args.device)
    out = check_out_folder(args.out)
    from atlas_core.train.loop import train  # torch and transformers only once the values pass

    result = train(arch, cfg, out, progress=not args.no_progress)
    last = result.history[-1]
    print(f"{arch.n_parameters():,} parameters, {cfg.n_steps} step{'s' * (cfg.n_steps != 1)}; held-out loss {result.history[0]['held_out_loss']:.3f}"
          f" -> {last['held_out_loss']:.3f} nats/token")
    for fraction, folder in result.checkpoints.items():
        print(f"  {fraction:g}: {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 2 and one line on stderr for a bad value."""
    parser = argparse.ArgumentParser(prog="python -m atlas_core.train", description=__doc__.split("\n")[0])
    _arguments(parser)
    args = parser.parse_args(argv)
    from atlas_core.corpus import CorpusError

    try:
        return args.func(args)
    except (ValueError, CorpusError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
