"""Accuracy with its uncertainty, and two policies compared on the SAME examples.

``wilson``: the Wilson score interval of a binomial proportion (Wilson 1927), honest near 0 and 1 where
the normal interval is not. ``mcnemar``: the paired comparison of two classifiers on the same examples
(McNemar 1947): only the discordant examples (one right, the other wrong) carry information; under "no
difference" each is a fair coin, so the two-sided exact binomial p-value of the split says whether one
is better beyond noise.
"""
from __future__ import annotations

import math
from typing import Sequence


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval of ``correct`` / ``n``."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got {correct} of {n}")
    p = correct / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (twice the smaller tail, at most 1)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Paired comparison of per-example hits ``a`` and ``b``: ``a_only`` (a right, b wrong), ``b_only``,
    ``both``, ``neither`` and the exact McNemar p-value (two-sided binomial on the discordant pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired hits need the same examples: {len(a)} vs {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    both = sum(1 for x, y in zip(a, b) if x and y)
    return {"a_only": a_only, "b_only": b_only, "both": both, "neither": len(a) - a_only - b_only - both,
            "p": binomial_two_sided(a_only, a_only + b_only)}


def verdict(cmp: dict, alpha: float = 0.05) -> str:
    """``"beats"`` / ``"loses"`` (p < alpha, by the side with more discordant wins) or ``"tie"`` (within noise)."""
    if cmp["p"] < alpha:
        return "beats" if cmp["a_only"] > cmp["b_only"] else "loses"
    return "tie"
