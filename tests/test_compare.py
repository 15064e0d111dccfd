"""compare: exact equality of numbers, timings skipped, every difference located."""

import json

import pytest

from atlas_core.book.compare import compare_files, differences


def test_identical_values_have_no_differences():
    value = {"a": [1, 2.5, {"b": "x", "c": float("nan")}], "d": None}
    assert differences(value, json.loads(json.dumps(value))) == []


def test_every_difference_is_located():
    first = {"ppl": 23.76, "rows": [{"kl": 0.1}, {"kl": 0.2}], "only": 1}
    second = {"ppl": 23.7600001, "rows": [{"kl": 0.1}, {"kl": 0.3}]}
    assert differences(first, second) == [
        "/only: only in the first", "/ppl: 23.76 vs 23.7600001", "/rows[1]/kl: 0.2 vs 0.3"]


def test_timings_are_skipped_but_not_lookalikes():
    first = {"seconds": 1.0, "wall_s": 2.0, "bench": [{"dense_s": 0.1, "step_ms": 3, "speedup_pages": 25.1}],
             "ids": 1, "speedups_seen": 1}
    second = {"seconds": 9.0, "wall_s": 8.0, "bench": [{"dense_s": 0.2, "step_ms": 4, "speedup_pages": 27.7}],
              "ids": 2, "speedups_seen": 2}
    assert differences(first, second) == ["/ids: 1 vs 2", "/speedups_seen: 1 vs 2"]


def test_int_and_float_are_not_the_same_number_type():
    assert differences({"n": 1}, {"n": 1.0}) == ["/n: 1 vs 1.0"]


def test_a_corrupt_file_is_named(tmp_path):
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text("{}")
    bad.write_text("{truncated")
    with pytest.raises(ValueError, match="b.json is not valid JSON"):
        compare_files(good, bad)
