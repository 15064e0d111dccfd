"""On-disk cache: a user cache directory, explicit hash keys, atomic writes and checked artifacts.

A file is written to a temporary name in the same directory and renamed into place, so a reader
sees either nothing or a whole file; an interrupted write never leaves a half-file under the real name
(and a temporary left by a killed process is removed the next time that artifact is written).

An artifact the library later trusts (a cloud, a dense continuation, a reference NLL, an assembled GGUF)
goes through ``write_checked``/``read_checked``: its SHA-256 is written beside it (``<name>.sha256``) after
the file itself, and a read verifies it first. A missing, truncated, bit-flipped or unreadable artifact is
removed with a one-line notice and rebuilt by ``cached``, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
CHECK_SUFFIX = ".sha256"

from atlas_core import CACHE_VERSION

CACHE_ENV = "ATLAS_CACHE_DIR"


class CacheError(ValueError):
    """The cache folder cannot be created or written (a user's setting: the CLI reports it in one line)."""


def cache_dir(*parts: str) -> Path:
    """Return (and create) a directory under the user cache root.

    The root is ``$ATLAS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/atlas`` or ``~/.cache/atlas``.

    Raises:
        CacheError: the folder cannot be created, or is not writable.
    """
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "atlas")
    path = Path(root, *parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cannot create the cache folder {path} ({err.strerror}); set {CACHE_ENV} to a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CacheError(f"the cache folder {path} is not writable; set {CACHE_ENV} to a writable folder")
    return path


def cache_key(**fields) -> str:
    """Hash keyword fields (JSON-serialisable) plus the library cache version into a short hex key."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tokens_hash(tokens) -> str | None:
    """SHA-256 of a token tensor's ids (as int64) and shape, for a cache key: changes whenever either does.

    Args:
        tokens: an integer ``torch.Tensor`` of any shape (a block (seq,), blocks (n, seq)), or None.
    Returns:
        64 hex digits, or None for None.
    """
    if tokens is None:
        return None
    import torch  # here, not at the top: the cache module is imported by commands that never load torch

    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes() + str(tuple(tokens.shape)).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    Works for files and directories alike (whatever the block creates at the yielded path).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir():
            _remove(target)
        os.replace(staged, target)
    finally:
        _remove(tmp)


def jsonable(obj):
    """``obj`` with numpy arrays and scalars made Python values, tuples made lists, every key a string and
    interval Estimates made {value, lo, hi, units}, so that ``write_json`` can write it (recursively through
    dicts, lists and tuples)."""
    if hasattr(obj, "as_dict"):  # an interval.Estimate
        return jsonable(obj.as_dict())
    if isinstance(obj, float) and not math.isfinite(obj):  # an undefined figure: null, as strict JSON allows
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars (and tensors): Python lists and numbers
        return jsonable(obj.tolist())
    return obj


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as pretty, strict JSON atomically (``jsonable``: undefined figures become null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_path(path: str | Path) -> Path:
    """The file holding ``path``'s SHA-256: ``<path>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECK_SUFFIX)


def write_checked(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write an artifact atomically with ``write(tmp_path)``, then its SHA-256 beside it.

    The checksum is written second, so a reader never trusts an artifact whose checksum is missing or from
    an earlier write (``read_checked`` treats both as damaged).
    """
    path = Path(path)
    check_path(path).unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        write(tmp)
    seal(path)


def seal(path: str | Path) -> None:
    """Write the SHA-256 of an existing file beside it (``<name>.sha256``), for files another tool wrote
    atomically (a chapter's notebook and results), so that later reads can verify them (``check_problem``)."""
    path = Path(path)
    digest = file_sha256(path)
    with atomic_path(check_path(path)) as tmp:
        tmp.write_text(digest + "\n")


def check_problem(path: str | Path) -> str | None:
    """Why a sealed file cannot be trusted ("is missing", "has no checksum", "does not match its checksum"),
    or None when it matches its ``.sha256``."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    try:
        expected = check_path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return "has no checksum"
    return None if file_sha256(path) == expected else "does not match its checksum"


def read_checked(path: str | Path, read: Callable[[Path], T], what: str) -> T | None:
    """``read(path)`` if the artifact exists and matches its SHA-256; else None, the damaged files removed.

    Args:
        read: loads the file (e.g. ``np.load``); an exception it raises on a file that passed the check is
            treated as damage too.
        what: the artifact's kind, for the notice ("cloud", "dense continuation", ...).
    Returns:
        the loaded value, or None when absent or damaged (a one-line notice on stderr names the file).
    """
    path = Path(path)
    if not path.exists():
        check_path(path).unlink(missing_ok=True)
        return None
    problem = check_problem(path)
    if problem is None:
        try:
            return read(path)
        except Exception as err:  # noqa: BLE001 - any failure to load a checked file means it must be rebuilt
            problem = f"cannot be read ({type(err).__name__})"
    print(f"[atlas] cached {what} {path} {problem}; removing it and rebuilding", file=sys.stderr)
    path.unlink(missing_ok=True)
    check_path(path).unlink(missing_ok=True)
    return None


def cached(path: str | Path, build: Callable[[], T], write: Callable[[T, Path], None], read: Callable[[Path], T],
           what: str) -> T:
    """The checked artifact at ``path``, or ``build()`` written there (checked) and returned.

    Args:
        write: ``write(value, tmp_path)`` saves a built value; read: ``read(path)`` loads it.
    """
    value = read_checked(path, read, what)
    if value is None:
        value = build()
        write_checked(path, lambda tmp: write(value, tmp))
    return value


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporaries of ``target`` left by a process killed mid-write (older than an hour: a running
    writer's own temporary is younger)."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
