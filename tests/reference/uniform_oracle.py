"""Independent reference for the ``uniform`` baseline (an even spatial grid of the budget), one row.

Written from the method's spec (vlm_tokenprune/methods/baselines.py docstring), sharing no code with
``vlm_tokenprune``: the row's budget is split over its patch grids in proportion to their token counts
(largest remainder, earlier grid on ties); on each grid the centres of a ``gr x gc`` sub-grid with the
grid's aspect ratio (``gr * gc >= k``) are taken, thinned evenly in raster order; newline / CLS tokens
of a grid come last. Grids are written out by hand by the tests (positions of each cell).
"""
from __future__ import annotations

import math


def _grid_points(rows: int, cols: int, k: int) -> list[tuple[int, int]]:
    """``k`` cells spread over a rows x cols grid: centres of a gr x gc sub-grid of the grid's aspect,
    grown until it holds k, then thinned evenly in raster order (the uniform baseline's spec)."""
    if k >= rows * cols:
        return [(r, c) for r in range(rows) for c in range(cols)]
    gr = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    gc = min(cols, math.ceil(k / gr))
    while gr * gc < k:
        if gr < rows and (gr / rows <= gc / cols or gc == cols):
            gr += 1
        else:
            gc += 1
    pts = [(int((a + 0.5) * rows / gr), int((b + 0.5) * cols / gc)) for a in range(gr) for b in range(gc)]
    return [pts[int((i + 0.5) * len(pts) / k)] for i in range(k)]


def kept(grids: list[dict], k: int) -> list[int]:
    """grids: per grid {'cells': {(r, c): position}, 'other': [newline positions]}; the row's budget split in
    proportion to the grids' token counts (largest remainder, earlier grid on ties), newlines picked last."""
    sizes = [len(g["cells"]) + len(g["other"]) for g in grids]
    raw = [k * s / sum(sizes) for s in sizes]
    quota = [min(s, math.floor(r)) for r, s in zip(raw, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    while sum(quota) < k:
        for i in order:
            if sum(quota) < k and quota[i] < sizes[i]:
                quota[i] += 1
    kept = []
    for g, q in zip(grids, quota):
        rows = max(r for r, _ in g["cells"]) + 1
        cols = max(c for _, c in g["cells"]) + 1
        pts = _grid_points(rows, cols, min(q, len(g["cells"])))
        kept += [g["cells"][p] for p in pts] + g["other"][: q - len(pts)]
    return sorted(kept)
