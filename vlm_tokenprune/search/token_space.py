"""Token budgets per stage as EvoPress units (arXiv 2410.14649 applied to visual-token pruning).

Units: the language model's input (an ``entry`` stage at the vision / pre-LLM site, optional) and
decoder layers ``layers``. Level ``i`` of a unit keeps ``1 - i / levels`` of the ORIGINAL visual
tokens from that point on; levels never decrease with depth (pruned tokens do not come back), so a
valid vector is non-decreasing. Equal level steps remove equal numbers of tokens, i.e. (up to the
attention's quadratic term) equal FLOPs per step for units covering equal numbers of layers: the
level sum is the budget the level switch keeps exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .space import Space


@dataclass(frozen=True)
class TokenSpace(Space):
    """``layers``: decoder layers with a unit (each >= 1, increasing); ``criterion``: the LLM stages'
    criterion (e.g. ``"fastv"``); ``entry``: a vision / pre-LLM stage written as a policy fragment
    (e.g. ``"mctf:layer=0"``), or None for no entry unit; ``levels``: level steps (``1/levels`` each)."""

    layers: tuple[int, ...]
    criterion: str = "fastv"
    entry: str | None = None
    levels: int = 16
    name: str = "tokens"

    def __post_init__(self) -> None:
        if list(self.layers) != sorted(set(self.layers)) or any(j < 1 for j in self.layers):
            raise ValueError(f"layers must be increasing decoder layers >= 1, got {self.layers}")
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")

    @property
    def units(self) -> tuple[str, ...]:
        return (("input",) if self.entry else ()) + tuple(f"layer{j}" for j in self.layers)

    @property
    def max_levels(self) -> tuple[int, ...]:
        return tuple(self.levels - 1 for _ in self.units)

    def keep(self, level: int) -> float:
        return round(1 - level / self.levels, 6)

    def valid(self, levels: Sequence[int]) -> bool:
        return super().valid(levels) and all(a <= b for a, b in zip(levels, levels[1:]))

    def stages(self, levels: Sequence[int]) -> list[str]:
        out, prev = [], 0
        units = ([None] if self.entry else []) + list(self.layers)
        for layer, lv in zip(units, levels):
            if lv > prev:
                if layer is None:
                    out.append(f"{self.entry},keep={self.keep(lv)}" if ":" in self.entry else f"{self.entry}:keep={self.keep(lv)}")
                else:
                    out.append(f"{self.criterion}:layer={layer},keep={self.keep(lv)}")
            prev = lv
        return out

    def canonical(self, total: int) -> list[int] | None:
        n = len(self.units)
        if total < 0 or total > n * (self.levels - 1):
            return None
        base, extra = divmod(total, n)
        return [base + (1 if i >= n - extra else 0) for i in range(n)]  # deeper units take the remainder
