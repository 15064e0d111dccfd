"""The sparse chapter's rules: the source defaults, the budget sweep around them and the variants.

One home for the list of rules the chapter runs and for the text lengths every one of them needs, so
that the chapter's pre-check (``atlas_core.book.chapter_params``) and the chapter itself ask the same
question of the same rules (``SparseConfig.check_block`` and ``check_context``), before any kernel starts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from atlas_core.sparse.kept import SparseConfig

__all__ = ["SparseExperiment"]


@dataclass(frozen=True, kw_only=True)
class SparseExperiment:
    """The rules of the sparse chapter: ``rule`` (the source defaults), the W × k sweep and four variants.

    ``windows`` and ``topks`` span the sweep (every W with every k, the other fields as ``rule``). The
    variants are ``rule`` with the first two layers dense, with head-averaged selection, with the page
    selector, and with the page selector at 4k (the same pages budget as exact top-k at 4k).
    """

    rule: SparseConfig
    windows: tuple[int, ...]
    topks: tuple[int, ...]

    def __post_init__(self):
        for name in ("windows", "topks"):
            if not getattr(self, name):
                raise ValueError(f"{name} needs at least one value")
        self.rules()  # every rule of the sweep is a valid SparseConfig (the message names its field)

    def grid(self) -> list[SparseConfig]:
        """The budget sweep: ``rule`` with every window W and top-k, W-major."""
        return [replace(self.rule, window=w, topk=k) for w in self.windows for k in self.topks]

    def variants(self) -> list[SparseConfig]:
        """``rule`` with the first two layers dense, head-averaged, by pages, and by pages at 4k."""
        r = self.rule
        return [replace(r, dense_layers=2), replace(r, head_average=True), replace(r, selector="pages"),
                replace(r, topk=r.topk * 4, selector="pages")]

    def rules(self) -> list[SparseConfig]:
        """Every rule the chapter measures: ``rule`` first, the rest of the grid, then the variants."""
        return [self.rule] + [c for c in self.grid() if c != self.rule] + self.variants()

    def check_block(self, seq_len: int, name: str = "seq_len") -> None:
        """Raise ValueError (naming ``name``) unless every rule is scored in blocks of ``seq_len`` tokens."""
        max(self.rules(), key=SparseConfig.min_block_tokens).check_block(seq_len, name)  # the most demanding

    def check_prompt(self, prompt_tokens: int, name: str = "prompt_tokens") -> None:
        """Raise ValueError (naming ``name``) unless every rule drops keys from the generation's first step."""
        max(self.rules(), key=lambda cfg: cfg.budget).check_context(prompt_tokens, name)  # the largest budget
