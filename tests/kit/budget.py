"""Budget rules and selection margins shared by the oracle comparisons."""
from __future__ import annotations

import math


def kept_count(budget, n_visual: int) -> int:
    """Visual tokens a budget keeps, by the documented rule: ``keep=x`` -> max(1, floor(x * n + 0.5)),
    ``tokens=n`` -> n; none for a row without visual tokens. ``budget``: "keep=0.25" or ("keep", 0.25)."""
    key, value = budget.split("=") if isinstance(budget, str) else budget
    if n_visual == 0:
        return 0
    if key == "tokens":
        return int(value)
    if key != "keep":
        raise ValueError(f"budget: {budget!r} is neither keep=x nor tokens=n")
    return max(1, math.floor(float(value) * n_visual + 0.5))


def assert_clear_cut(scores, k: int, margin: float = 1e-7, *, relative: bool = False, what: str = "") -> None:
    """The k-th and (k+1)-th largest of ``scores`` differ by more than ``margin`` (relative to the k-th
    with ``relative``), so an equal top-k selection is not luck of rounding."""
    s = sorted(scores, reverse=True)
    if 0 < k < len(s):
        gap = s[k - 1] - s[k]
        if relative:
            gap /= s[k - 1]
        assert gap > margin, f"ill-conditioned cut{' ' + what if what else ''} at {k}: {s[k - 1]} vs {s[k]}"
