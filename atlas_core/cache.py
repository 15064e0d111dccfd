"""On-disk cache: a user cache directory, explicit hash keys and atomic writes.

A file is written to a temporary name in the same directory and renamed into place, so a reader
sees either nothing or a whole file; an interrupted write never leaves a half-file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    Works for files and directories alike (whatever the block creates at the yielded path).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir():
            _remove(target)
        os.replace(staged, target)
    finally:
        _remove(tmp)


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as pretty JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
