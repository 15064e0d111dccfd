import pytest
import torch

from atlas_core.models import load_model
from atlas_core.sparse.fidelity import agreement, fidelity_report, greedy, teacher_forced, trajectory_agreement
from atlas_core.sparse.kept import SparseConfig


def test_agreement_known_answers():
    a = torch.tensor([1, 2, 3, 4])
    assert agreement(a, a) == {"agree": 1.0, "first_divergence": None, "identical_prefix": 4}
    assert agreement(a, torch.tensor([1, 2, 9, 4])) == {"agree": 0.75, "first_divergence": 2, "identical_prefix": 2}
    with pytest.raises(ValueError, match="length"):
        agreement(a, a[:3])


@pytest.fixture(scope="module")
def qwen_toy():
    return load_model("toy-qwen2")


def _prompt(n, seed=0):
    return torch.randint(4, 200, (n,), generator=torch.Generator().manual_seed(seed))


def test_teacher_forced_dense_perplexity_is_the_models_own(qwen_toy):
    from atlas_core.eval import perplexity

    blocks = torch.stack([_prompt(40, 1), _prompt(40, 2)])
    r = teacher_forced(qwen_toy, blocks, SparseConfig(anchors=1, window=8, topk=20))
    assert r["ppl_dense"] == pytest.approx(perplexity(qwen_toy.model, blocks, progress=False), rel=1e-6)
    assert r["ppl_sparse"] != r["ppl_dense"]


def test_teacher_forced_counts_positions_past_the_budget(qwen_toy):
    cfg = SparseConfig(anchors=1, window=3, topk=2)
    r = teacher_forced(qwen_toy, torch.stack([_prompt(40, 1)]), cfg)
    assert r["positions"] == 39 - cfg.budget
    assert r["kl"] > 0 and r["mass"]["discarded"].mean() > 0
    with pytest.raises(ValueError, match="too short"):
        teacher_forced(qwen_toy, torch.stack([_prompt(6)]), cfg)


def test_trajectory_check_finds_greedy_first_divergence(qwen_toy):
    prompt = _prompt(30)
    dense = greedy(qwen_toy, prompt, 25)
    for cfg in (SparseConfig(1, 3, 2), SparseConfig(1, 6, 4), SparseConfig(1, 2, 0)):
        sparse = greedy(qwen_toy, prompt, 25, cfg)
        assert trajectory_agreement(qwen_toy, prompt, dense, cfg)["first_divergence"] == agreement(dense, sparse)["first_divergence"]


def test_greedy_is_deterministic_and_matches_across_backends(qwen_toy):
    prompt = _prompt(20)
    first = greedy(qwen_toy, prompt, 10)
    assert torch.equal(first, greedy(qwen_toy, prompt, 10))
    assert first.shape == (10,)
    with pytest.raises(ValueError, match="n_new"):
        greedy(qwen_toy, prompt, 0)


def test_fidelity_report_fields(qwen_toy):
    r = fidelity_report(qwen_toy, SparseConfig(1, 3, 2), _prompt(20), 5, torch.stack([_prompt(30, 3)]))
    assert set(r) >= {"token_agreement", "first_divergence", "top1_agreement", "kl", "ppl_change", "discarded_mass"}
    assert 0 <= r["token_agreement"] <= 1 and 0 < r["discarded_mass"] < 1
