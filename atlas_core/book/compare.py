"""Compare the numbers of two chapter results (``results/<model>/<chapter>.json``).

Rerunning a chapter with the same parameters must give the same numbers. Wall-clock measurements are
the exception (a benchmark's milliseconds, a run's seconds, and the speed-ups divided out of them), so
keys that name a duration or a speed-up are skipped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

# Keys that hold a measured duration ("seconds", "wall_s", "dense_s", "step_ms", "time", ...) or a ratio of
# two durations ("speedup", "speedup_pages").
TIMING_KEY = re.compile(r"^(seconds|time|wall|elapsed)$|_(s|ms|us|seconds|time)$|^speedup(_|$)")


def _walk(a: Any, b: Any, path: str) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if TIMING_KEY.search(str(key)):
                continue
            if key not in a or key not in b:
                yield f"{path}/{key}: only in {'the second' if key not in a else 'the first'}"
            else:
                yield from _walk(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _walk(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    elif a != b or type(a) is not type(b):
        yield f"{path}: {a!r} vs {b!r}"


def differences(first: Any, second: Any) -> list[str]:
    """Every place where two JSON values differ, as ``/path: value vs value`` (timings skipped)."""
    return list(_walk(first, second, ""))


def compare_files(first: Path | str, second: Path | str) -> list[str]:
    """:func:`differences` of two JSON files.

    Raises:
        ValueError: a file is not valid JSON (the message names it).
    """
    from atlas_core.cache import check_path, check_problem

    values = []
    for path in (first, second):
        if check_path(path).exists() and check_problem(path):  # a chapter's results are sealed when written
            raise ValueError(f"{path} {check_problem(path)}: the file changed after its chapter wrote it; rerun the chapter")
        try:
            values.append(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); rerun the chapter that wrote it") from None
        except OSError as err:  # missing, a folder, unreadable
            raise ValueError(f"{path} cannot be read ({err.strerror}); give a results JSON file") from None
    return differences(*values)
