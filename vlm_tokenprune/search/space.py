"""A search space over policies: integer compression levels per unit, turned into a policy.

Each sub-space (``TokenSpace``, ``SublayerSpace``, ``HeadSpace``) lists units with levels
``0..max_level`` (0 = no compression) and writes policy stages for a level vector. ``JointSpace``
concatenates them; its ``groups`` tell the level-switch mutation (``mutation.level_switch``) which
units may trade levels, so each sub-space's level sum (its budget) stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..policy import Policy


class Space:
    """One kind of compression: ``units`` (names), ``max_levels``, the stages a level vector means."""

    name: str = "space"
    units: tuple[str, ...] = ()
    max_levels: tuple[int, ...] = ()

    def valid(self, levels: Sequence[int]) -> bool:
        return all(0 <= x <= m for x, m in zip(levels, self.max_levels))

    def unit_groups(self) -> tuple[int, ...]:
        """Which units may trade levels with the level switch (same number: same group); default: all."""
        return tuple(0 for _ in self.units)

    def stages(self, levels: Sequence[int]) -> list[str]:
        """Policy-string stages (joined with ``+``) for ``levels``; [] = nothing compressed."""
        raise NotImplementedError

    def canonical(self, total: int) -> list[int] | None:
        """A valid level vector with level sum ``total`` (the search's start), or None if there is none."""
        raise NotImplementedError


@dataclass(frozen=True)
class JointSpace:
    """Sub-spaces side by side: one level vector, one policy (token stages first, then structural)."""

    spaces: tuple[Space, ...]

    @property
    def units(self) -> list[str]:
        return [f"{s.name}:{u}" for s in self.spaces for u in s.units]

    @property
    def max_levels(self) -> list[int]:
        return [m for s in self.spaces for m in s.max_levels]

    @property
    def groups(self) -> list[int]:
        """Level-switch groups: each sub-space's own groups (``Space.unit_groups``), numbered across sub-spaces."""
        ids: dict[tuple[int, int], int] = {}
        return [ids.setdefault((k, g), len(ids)) for k, s in enumerate(self.spaces) for g in s.unit_groups()]

    def split(self, levels: Sequence[int]) -> list[list[int]]:
        out, i = [], 0
        for s in self.spaces:
            out.append(list(levels[i : i + len(s.units)]))
            i += len(s.units)
        return out

    def valid(self, levels: Sequence[int]) -> bool:
        return len(levels) == len(self.units) and all(s.valid(part) for s, part in zip(self.spaces, self.split(levels)))

    def policy_string(self, levels: Sequence[int]) -> str | None:
        """The policy as a string, or None when nothing is compressed (the unpruned model)."""
        parts = [st for s, part in zip(self.spaces, self.split(levels)) for st in s.stages(part)]
        return "+".join(parts) if parts else None

    def policy(self, levels: Sequence[int]) -> Policy | None:
        text = self.policy_string(levels)
        return Policy.parse(text) if text is not None else None
