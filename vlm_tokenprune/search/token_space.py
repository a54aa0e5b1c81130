"""Token budgets per stage as EvoPress units (arXiv 2410.14649 applied to visual-token pruning).

Units: the language model's input (an ``entry`` stage at the vision / pre-LLM site, optional) and
decoder layers ``layers``. Level ``i`` of a unit keeps ``1 - i / levels`` of the ORIGINAL visual
tokens from that point on; levels never decrease with depth (pruned tokens do not come back), so a
valid vector is non-decreasing. Equal level steps remove equal numbers of tokens, i.e. (up to the
attention's quadratic term) equal FLOPs per step for units covering equal numbers of layers: the
level sum is the budget the level switch keeps exact.

``criteria`` (more than one): a last unit ``criterion`` picks the LLM stages' criterion (level i:
``criteria[i]``, e.g. FastV's or DART's), in a group of its own (the level switch never trades it
against token levels; ``mutation.budget_trade`` moves it).
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
    criteria: tuple[str, ...] = ()
    name: str = "tokens"

    def __post_init__(self) -> None:
        if list(self.layers) != sorted(set(self.layers)) or any(j < 1 for j in self.layers):
            raise ValueError(f"layers must be increasing decoder layers >= 1, got {self.layers}")
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")

    @property
    def choices(self) -> tuple[str, ...]:
        """The LLM stages' criteria to choose from (one: no ``criterion`` unit)."""
        return tuple(self.criteria) or (self.criterion,)

    @property
    def token_units(self) -> tuple[str, ...]:
        return (("input",) if self.entry else ()) + tuple(f"layer{j}" for j in self.layers)

    @property
    def units(self) -> tuple[str, ...]:
        return self.token_units + (("criterion",) if len(self.choices) > 1 else ())

    @property
    def max_levels(self) -> tuple[int, ...]:
        return tuple(self.levels - 1 for _ in self.token_units) + ((len(self.choices) - 1,) if len(self.choices) > 1 else ())

    def unit_groups(self) -> tuple[int, ...]:
        return tuple(0 for _ in self.token_units) + ((1,) if len(self.choices) > 1 else ())

    def keep(self, level: int) -> float:
        return round(1 - level / self.levels, 6)

    def valid(self, levels: Sequence[int]) -> bool:
        tok = list(levels)[: len(self.token_units)]
        return super().valid(levels) and all(a <= b for a, b in zip(tok, tok[1:]))

    def stages(self, levels: Sequence[int]) -> list[str]:
        out, prev = [], 0
        units = ([None] if self.entry else []) + list(self.layers)
        crit = self.choices[levels[len(units)]] if len(self.choices) > 1 else self.criterion
        for layer, lv in zip(units, levels):
            if lv > prev:
                if layer is None:
                    out.append(f"{self.entry},keep={self.keep(lv)}" if ":" in self.entry else f"{self.entry}:keep={self.keep(lv)}")
                else:
                    out.append(f"{crit}:layer={layer},keep={self.keep(lv)}")
            prev = lv
        return out

    def canonical(self, total: int) -> list[int] | None:
        """Token level sum ``total`` spread evenly (deeper units take the remainder); the first criterion."""
        n = len(self.token_units)
        if total < 0 or total > n * (self.levels - 1):
            return None
        base, extra = divmod(total, n)
        tail = [0] if len(self.choices) > 1 else []
        return [base + (1 if i >= n - extra else 0) for i in range(n)] + tail

    def vector(self, entry: int = 0, layers: "dict[int, int] | None" = None, criterion: str | None = None) -> list[int]:
        """The level vector of an entry level and per-layer levels (each held from that layer on, the
        running maximum: tokens do not come back) with ``criterion`` (default the first): how presets
        (MCTF's entry merge, a FastV / DART stage at layer j, PDrop's schedule) are written in this space."""
        if entry and not self.entry:
            raise ValueError("this token space has no entry unit")
        out, cur = ([entry] if self.entry else []), entry
        for j in self.layers:
            cur = max(cur, (layers or {}).get(j, 0))
            out.append(cur)
        for j in (layers or {}):
            if j not in self.layers:
                raise ValueError(f"layer {j} is not a unit of this token space (units: {self.layers})")
        if len(self.choices) > 1:
            out.append(self.choices.index(criterion or self.choices[0]))
        elif criterion not in (None, self.criterion):
            raise ValueError(f"criterion {criterion!r} is not in this token space ({self.criterion})")
        return out
