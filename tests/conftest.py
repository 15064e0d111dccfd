"""Shared fixtures: offline environment, toy models of each family, the real default model (slow)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from atlas_core.models import load_model  # noqa: E402
from atlas_core.toy import FAMILIES  # noqa: E402


@pytest.fixture(params=FAMILIES)
def toy_lm(request):
    """A tiny random model of each supported family."""
    return load_model(f"toy-{request.param}")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (converted once into the user cache)."""
    return load_model("smollm2-135m")


class LeftPadded:
    """Issue 14's batch: row 0 is 6 pad tokens then 14 tokens, row 1 is 20 tokens, with the attention
    mask and per-row position ids; and the same rows run alone, for comparison."""

    def __init__(self, pad_id: int = 3, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(4, 260, (n,), generator=gen) for n in (14, 20)]
        self.pads = [6, 0]
        self.ids = torch.stack([torch.cat([torch.full((p,), pad_id), r]) for p, r in zip(self.pads, self.rows)])
        self.mask = (torch.arange(20)[None] >= torch.tensor(self.pads)[:, None]).long()  # (batch, token)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (batch, token)

    def logit_gap(self, model) -> float:
        """Max |logit| difference between each row's real positions in the batch and the row run alone."""
        with torch.no_grad():
            batch = model(self.ids, attention_mask=self.mask, position_ids=self.positions).logits
            solo = [model(r[None]).logits[0] for r in self.rows]
        return max((batch[b, p:] - s).abs().max().item() for b, (p, s) in enumerate(zip(self.pads, solo)))

    def greedy_agrees(self, model, steps: int = 8) -> bool:
        """Greedy generation on the padded batch continues each row exactly as the row alone does."""
        kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        with torch.no_grad():
            batch = model.generate(self.ids, attention_mask=self.mask, **kw)[:, 20:]
            solo = [model.generate(r[None], **kw)[0, len(r):] for r in self.rows]
        return all(torch.equal(batch[b], s) for b, s in enumerate(solo))


@pytest.fixture
def left_padded():
    """The left-padded two-row batch of issue 14 (see ``LeftPadded``)."""
    return LeftPadded()


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(obj, "name")`` wraps ``obj.name`` for the test and returns {"calls": n}, counted as it runs."""
    def wrap(obj, name: str) -> dict:
        counts, fn = {"calls": 0}, getattr(obj, name)

        def counted(*args, **kwargs):
            counts["calls"] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(obj, name, counted)
        return counts
    return wrap
