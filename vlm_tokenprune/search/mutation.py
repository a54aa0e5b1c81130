"""EvoPress's level-switch mutation (Sieberling et al., "EvoPress: Towards Optimal Dynamic Model
Compression via Evolutionary Search", arXiv 2410.14649, section 3).

A candidate is a vector of integer compression levels, one per unit. A switch raises one unit's
level by one and lowers another unit's by one, so the sum of levels -- the global budget when every
level step costs the same -- is kept EXACTLY. Units are grouped (e.g. token budgets, removed
sublayers, pruned heads): a switch stays inside one group, so each group's sum is kept.
``budget_trade`` moves budget between groups whose level steps cost different amounts, under one constraint.
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


def budget_trade(levels: Sequence[int], max_levels: Sequence[int], rng: random.Random, valid, within) -> list[int]:
    """A move across sub-spaces under ONE budget (e.g. the FLOPs ratio), for units whose level steps cost
    different amounts (tokens vs sublayers vs heads), where the level switch's equal-sum rule does not apply.

    One random unit goes down a level (less compression: spends budget); then, while the budget is exceeded
    (``within`` false), random units go up a level (repair); then, while some unit can go down a level and
    stay ``within``, a random such unit does (relax: no budget left unused that one level step could use).
    Every step keeps ``valid`` (the space's structure, e.g. token levels non-decreasing with depth). The
    result is ``within`` and tight (no single unit can go down a level and stay within), or ``levels``
    unchanged when no such move exists. ``levels`` is assumed valid and within.
    """
    out = list(levels)
    n = len(out)

    def moved(v: list[int], i: int, d: int) -> list[int]:
        w = list(v)
        w[i] += d
        return w

    downs = [i for i in range(n) if out[i] > 0 and valid(moved(out, i, -1))]
    if not downs:
        return out
    a = downs[rng.randrange(len(downs))]
    out[a] -= 1
    while not within(out):
        ups = [i for i in range(n) if i != a and out[i] < max_levels[i] and valid(moved(out, i, +1))]
        if not ups:
            return list(levels)
        u = ups[rng.randrange(len(ups))]
        out[u] += 1
    while True:
        relax = [i for i in range(n) if out[i] > 0 and valid(moved(out, i, -1)) and within(moved(out, i, -1))]
        if not relax:
            return out
        out[relax[rng.randrange(len(relax))]] -= 1
