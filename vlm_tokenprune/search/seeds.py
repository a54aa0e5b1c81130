"""Seeds for a search: the presets a space can express, each at the least compression that fits the budget.

A search should never return something worse than the presets it could have written itself, so these
join the first generation and the final selection (``evolution.evolve``'s ``seeds``). Families, in the
token sub-space (other sub-spaces at level 0): the entry merge alone (MCTF, arXiv 2403.10030, before the
LLM), one LLM stage at each unit layer with each criterion (FastV, arXiv 2403.06764; DART, arXiv
2502.11494; ...), and PDrop's halving schedule (arXiv 2410.17247: keep k, k/2, k/4, ... from the first
unit layer on). Each family is scaled to its smallest level (the most tokens kept) that is feasible.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .space import JointSpace
from .token_space import TokenSpace


def _families(tok: TokenSpace) -> list[tuple[str, Callable[[int], list[int]]]]:
    fams: list[tuple[str, Callable[[int], list[int]]]] = []
    if tok.entry:
        fams.append((f"{tok.entry} alone", lambda L: tok.vector(entry=L)))
    for c in tok.choices:
        for j in tok.layers:
            fams.append((f"{c} at layer {j}", lambda L, j=j, c=c: tok.vector(layers={j: L}, criterion=c)))
    if len(tok.layers) > 1:
        def pdrop(L: int) -> list[int]:
            keep = 1 - L / tok.levels  # keep, keep/2, keep/4, ... of the original tokens, from the first unit layer
            lv = {j: min(tok.levels - 1, round(tok.levels * (1 - keep / 2 ** i))) for i, j in enumerate(tok.layers)}
            return tok.vector(layers=lv, criterion=tok.choices[0])
        fams.append(("pdrop schedule", pdrop))
    return fams


def preset_seeds(joint: JointSpace, feasible: Callable[[tuple[int, ...]], bool]) -> list[tuple[str, tuple[int, ...]]]:
    """``(family, levels)`` per preset family of the joint space's token sub-space, at its smallest feasible level."""
    k = next((i for i, s in enumerate(joint.spaces) if isinstance(s, TokenSpace)), None)
    if k is None:
        return []
    tok = joint.spaces[k]
    zeros = [[0] * len(s.units) for s in joint.spaces]
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, fam in _families(tok):
        for L in range(1, tok.levels):
            parts = list(zeros)
            parts[k] = fam(L)
            lv = tuple(x for part in parts for x in part)
            if feasible(lv):
                out.append((name, lv))
                break
    return out


def seed_policies(joint: JointSpace, seeds: Sequence[tuple[str, tuple[int, ...]]]) -> list[dict]:
    """The seeds as ``{"family", "levels", "policy"}`` rows (for reports)."""
    return [{"family": f, "levels": list(lv), "policy": joint.policy_string(lv)} for f, lv in seeds]
