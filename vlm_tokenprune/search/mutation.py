"""EvoPress's level-switch mutation (Sieberling et al., "EvoPress: Towards Optimal Dynamic Model
Compression via Evolutionary Search", arXiv 2410.14649, section 3).

A candidate is a vector of integer compression levels, one per unit. A switch raises one unit's
level by one and lowers another unit's by one, so the sum of levels -- the global budget when every
level step costs the same -- is kept EXACTLY. Units are grouped (e.g. token budgets, removed
sublayers, pruned heads): a switch stays inside one group, so each group's sum is kept.
"""
from __future__ import annotations

import random
from typing import Sequence


def switchable_groups(levels: Sequence[int], max_levels: Sequence[int], groups: Sequence[int]) -> list[int]:
    """Groups where some unit can go up and ANOTHER unit can go down."""
    out = []
    for g in sorted(set(groups)):
        members = [i for i, x in enumerate(groups) if x == g]
        up = [i for i in members if levels[i] < max_levels[i]]
        down = [i for i in members if levels[i] > 0]
        if up and down and (len(up) > 1 or len(down) > 1 or up[0] != down[0]):
            out.append(g)
    return out


def level_switch(levels: Sequence[int], max_levels: Sequence[int], groups: Sequence[int], rng: random.Random,
                 switches: int = 1) -> list[int]:
    """``levels`` after ``switches`` random level switches (each group's sum unchanged).

    Each switch picks a switchable group uniformly, then a unit that can go up and a different unit
    that can go down, uniformly; with no switchable group the levels come back unchanged.
    """
    out = list(levels)
    for _ in range(switches):
        cand = switchable_groups(out, max_levels, groups)
        if not cand:
            break
        g = cand[rng.randrange(len(cand))]
        members = [i for i, x in enumerate(groups) if x == g]
        up = [i for i in members if out[i] < max_levels[i]]
        a = up[rng.randrange(len(up))]
        down = [i for i in members if out[i] > 0 and i != a]
        if not down:  # the only unit that can go down is a: pick another up unit
            up = [i for i in up if i != a]
            down = [a]
            a = up[rng.randrange(len(up))]
        b = down[rng.randrange(len(down))]
        out[a] += 1
        out[b] -= 1
    return out
