import math

import numpy as np
import pytest
import torch

from atlas_core.sparse.bench import bytes_read
from atlas_core.sparse.kept import SparseConfig
from atlas_core.sparse.segments import (gb_per_s, repeated_ngram_share, segment_agreement, segment_repetition, segments,
                                        speedup_gap)


def test_segments_cut_the_steps_and_drop_cuts_outside():
    assert segments(1500, [300]) == [(0, 300), (300, 1500)]
    assert segments(40, [20, 60]) == [(0, 20), (20, 40)]  # a cut at or past the end adds nothing
    assert segments(10, []) == [(0, 10)]
    with pytest.raises(ValueError, match="increasing"):
        segments(10, [5, 3])
    with pytest.raises(ValueError, match="at least 1"):
        segments(0, [1])


def test_segment_agreement_known_answers_and_unmeasured_segments():
    matches = [True, True, False, True, False, False]
    assert segment_agreement(matches, [(0, 4), (4, 6)]) == [0.75, 0.0]
    # a rule checked over the first 4 steps only: the second segment is not measured (NaN), never partial
    short = segment_agreement(matches[:4], [(0, 4), (4, 6)])
    assert short[0] == 0.75 and math.isnan(short[1])
    assert math.isnan(segment_agreement(matches[:5], [(0, 4), (4, 6)])[1])
    # the segments' agreements, weighted by their lengths, give the whole continuation's
    m = np.random.default_rng(0).random(1500) < 0.9
    bounds = segments(1500, [300])
    parts = segment_agreement(m, bounds)
    assert parts[0] * 300 / 1500 + parts[1] * 1200 / 1500 == pytest.approx(m.mean())


def test_repeated_ngram_share_known_answers():
    assert repeated_ngram_share(list(range(20)), 4) == 0.0  # no phrase repeats
    # a loop of period 3 over 30 tokens: 27 four-grams, 3 distinct
    loop = [7, 8, 9] * 10
    assert repeated_ngram_share(loop, 4) == pytest.approx(1 - 3 / 27)
    assert repeated_ngram_share(torch.tensor(loop), 4) == repeated_ngram_share(np.array(loop), 4)
    assert repeated_ngram_share([1, 1, 1, 1, 1], 1) == pytest.approx(0.8)
    assert math.isnan(repeated_ngram_share([1, 2, 3], 4))
    with pytest.raises(ValueError, match="at least 1"):
        repeated_ngram_share([1, 2], 0)


def test_segment_repetition_counts_ngrams_inside_each_segment():
    tokens = list(range(100, 110)) + [1, 2] * 5  # fresh text, then a loop of period 2
    first, second = segment_repetition(tokens, [(0, 10), (10, 20)], 4)
    assert first == 0.0 and second == pytest.approx(1 - 2 / 7)
    assert math.isnan(segment_repetition(tokens, [(0, 30)], 4)[0])  # past the tokens


def test_speedup_gap_is_the_bytes_ratio_times_the_bandwidth_ratio():
    cfg = SparseConfig(anchors=1, window=64, topk=32, page_size=16)
    n = 131072
    row = {"dense_s": 0.040, "pages_s": 0.0008,
           "dense_bytes": bytes_read("dense", n, 9, 3, 64, cfg, 4), "pages_bytes": bytes_read("pages", n, 9, 3, 64, cfg, 4)}
    gap = speedup_gap(row, "pages")
    assert gap["speedup"] == pytest.approx(50.0)
    assert gap["speedup"] == pytest.approx(gap["bytes_ratio"] * gap["bandwidth_ratio"])
    assert gap["dense_gbps"] == pytest.approx(row["dense_bytes"] / 0.040 / 1e9)
    assert gap["kernel_gbps"] > gap["dense_gbps"]  # faster than its bytes ratio: it streams its bytes faster
    assert gb_per_s(2e9, 0.5) == 4.0
    with pytest.raises(ValueError, match="positive"):
        gb_per_s(1.0, 0.0)
