"""Removed attention / MLP sublayers (FinerCut, arXiv 2405.18218) as EvoPress units: one binary
unit per candidate sublayer (level 1 = removed). The level sum is the number of removed sublayers;
the level switch swaps a removed sublayer for a kept one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .space import Space


@dataclass(frozen=True)
class SublayerSpace(Space):
    """``attn_layers`` / ``ffn_layers``: the candidate layers (attention never at a layer whose KV cache the
    cache length and masks are read from, ``structural.plan.mask_layers``, see ``skip_sublayers``)."""

    attn_layers: tuple[int, ...]
    ffn_layers: tuple[int, ...]
    name: str = "sublayers"

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(f"attn{j}" for j in self.attn_layers) + tuple(f"ffn{j}" for j in self.ffn_layers)

    @property
    def max_levels(self) -> tuple[int, ...]:
        return tuple(1 for _ in self.units)

    def removed(self, levels: Sequence[int]) -> tuple[list[int], list[int]]:
        a = len(self.attn_layers)
        return ([j for j, x in zip(self.attn_layers, levels[:a]) if x],
                [j for j, x in zip(self.ffn_layers, levels[a:]) if x])

    def stages(self, levels: Sequence[int]) -> list[str]:
        attn, ffn = self.removed(levels)
        if not attn and not ffn:
            return []
        parts = ([f"attn={';'.join(map(str, attn))}"] if attn else []) + ([f"ffn={';'.join(map(str, ffn))}"] if ffn else [])
        return ["skip_sublayers:" + ",".join(parts)]

    def canonical(self, total: int) -> list[int] | None:
        """The ``total`` deepest attention sublayers first (FinerCut's typical first removals), then MLPs."""
        n = len(self.units)
        if total < 0 or total > n:
            return None
        a = len(self.attn_layers)
        order = list(range(a))[::-1] + list(range(a, n))[::-1]
        out = [0] * n
        for i in order[:total]:
            out[i] = 1
        return out
