import numpy as np
import pytest
import torch

from atlas_core import clouds
from atlas_core.clouds import CloudSpec, head_clouds, kv_groups, point_indices, weights_fingerprint
from atlas_core.models import load_model

SMALL = CloudSpec(corpus="pydoc", seq_len=64, n_blocks=3, n_points=100, seed=1)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))


def test_point_indices_skip_position_zero_and_are_deterministic():
    idx = point_indices(SMALL)
    assert len(idx) == len(set(idx)) == 100
    assert np.all(idx % SMALL.seq_len != 0) and idx.max() < SMALL.n_blocks * SMALL.seq_len
    assert np.array_equal(idx, point_indices(SMALL))
    assert not np.array_equal(idx, point_indices(CloudSpec(corpus="pydoc", seq_len=64, n_blocks=3, n_points=100, seed=2)))


def test_spec_rejects_impossible_point_counts():
    with pytest.raises(ValueError, match="n_points"):
        CloudSpec(seq_len=64, n_blocks=1, n_points=64)


def test_clouds_match_extraction_and_come_back_from_cache(monkeypatch):
    lm = load_model("toy-qwen2")
    first = head_clouds(lm, [0, -1], "eps", SMALL, progress=False)
    assert set(first) == {0, 1} and first[1].shape == (4, 100, 16) and first[1].dtype == np.float32

    def no_extraction(*args, **kwargs):
        raise AssertionError("cache miss: extracted again")

    monkeypatch.setattr(clouds, "extract", no_extraction)
    again = head_clouds(lm, [1], "eps", SMALL, progress=False)
    assert np.array_equal(again[1], first[1])


def test_c_clouds_live_in_d_model_and_sum_like_the_model():
    lm = load_model("toy-llama")
    c = head_clouds(lm, [1], "c", SMALL, progress=False)[1]
    z = head_clouds(lm, [1], "z", SMALL, progress=False)[1]
    w_o = clouds.out_proj(lm, 1)  # (head, d_head, d_model)
    assert c.shape == (4, 100, 64)
    np.testing.assert_allclose(c, np.einsum("hpd,hdm->hpm", z, w_o), atol=1e-5)


def test_fingerprint_follows_the_weights():
    a = load_model("toy-gpt2")
    b = load_model("toy-gpt2")
    assert weights_fingerprint(a.model) == weights_fingerprint(b.model)
    next(b.model.parameters()).data[0, 0] += 1.0
    assert weights_fingerprint(a.model) != weights_fingerprint(b.model)


def test_kv_groups():
    assert list(kv_groups(load_model("toy-llama"))) == [0, 0, 1, 1]
    assert list(kv_groups(load_model("toy-gemma3"))) == [0, 0, 0, 0]
    assert list(kv_groups(load_model("toy-gpt2"))) == [0, 1, 2, 3]


def test_bad_residual_and_layer():
    lm = load_model("toy-llama")
    with pytest.raises(ValueError, match="residual"):
        head_clouds(lm, [0], "q", SMALL)
    with pytest.raises(ValueError, match="layers"):
        head_clouds(lm, [7], "eps", SMALL)


def test_subsample_of_every_point_equals_the_sampled_clouds():
    """One extraction at every eligible position serves every seed: the crossarch chapter's old assert."""
    from dataclasses import replace

    lm = load_model("toy-llama")
    every = replace(SMALL, n_points=SMALL.n_blocks * (SMALL.seq_len - 1))
    full = head_clouds(lm, [1], "eps", every, progress=False)[1]  # (head, eligible, d_head)
    assert np.array_equal(clouds.eligible_positions(SMALL), point_indices(every))
    for seed in (0, 1, 5):
        spec = replace(SMALL, seed=seed)
        assert np.array_equal(clouds.subsample(full, spec), head_clouds(lm, [1], "eps", spec, progress=False)[1])
    with pytest.raises(ValueError, match="every eligible point"):
        clouds.subsample(full[:, :-1], SMALL)


def test_fingerprint_does_not_depend_on_the_thread_count():
    """An fp32 sum split over two or three threads rounds differently from one thread (here -710.394531 on one,
    -710.394043 on two); the fingerprint must not, or a run on two threads misses every cache one thread wrote."""
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 1024))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        prints = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            prints.add(weights_fingerprint(model))
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert len(prints) == 1
