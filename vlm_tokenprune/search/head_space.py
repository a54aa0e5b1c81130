"""Pruned attention heads for visual computation (YOPO's op, arXiv 2410.06169) as EvoPress units:
one binary unit per (layer, head) candidate (level 1 = pruned for visual tokens). The level sum is
the number of pruned heads; the level switch swaps a pruned head for a kept one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .space import Space


@dataclass(frozen=True)
class HeadSpace(Space):
    """``heads``: candidate ``(layer, head)`` pairs; ``scope``: ``prune_heads``' scope (``visual``)."""

    heads: tuple[tuple[int, int], ...]
    scope: str = "visual"
    name: str = "heads"

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(f"{layer}/{h}" for layer, h in self.heads)

    @property
    def max_levels(self) -> tuple[int, ...]:
        return tuple(1 for _ in self.heads)

    def stages(self, levels: Sequence[int]) -> list[str]:
        pruned = [f"{layer}/{h}" for (layer, h), x in zip(self.heads, levels) if x]
        return [f"prune_heads:heads={';'.join(pruned)},scope={self.scope}"] if pruned else []

    def canonical(self, total: int) -> list[int] | None:
        """The last ``total`` candidates (deepest layers first)."""
        n = len(self.heads)
        if total < 0 or total > n:
            return None
        return [1 if i >= n - total else 0 for i in range(n)]
