"""Baselines: ``random`` (seeded) and ``uniform`` (an even spatial grid of the budget).

``uniform`` splits each row's budget over its patch grids (largest remainder, in
proportion to their token counts), then on each grid picks the centres of a
``gr x gc`` sub-grid with the grid's aspect ratio (``gr * gc >= k``), thinning the extra
points evenly in raster order. ``image_newline`` and CLS tokens come last.
"""
from __future__ import annotations

import hashlib
import math

from typing import Any, Mapping

import torch

from ..errors import InputError
from ..policy import register_preset
from ..scoring import ScoringContext
from .base import Criterion, Param, register_criterion


@register_criterion
class RandomCriterion(Criterion):
    name = "random"
    paper = "random visual-token subset (baseline)"
    sites = ("llm", "pre_llm")
    image_only_fixed_count = True  # content-free: the kept count follows from the budget alone
    params = {
        "seed": Param(0, int, "seed; every row draws from its own generator, so a row's subset does not depend on its batch"),
        "draw": Param("row", str, "row: a fresh subset per input, seeded from (seed, the row's content); fixed: one "
                      "subset per seed for every input", check=lambda v: v in ("row", "fixed"), allowed="row or fixed"),
    }

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        return 0.0

    def score(self, ctx: ScoringContext, seed: int, draw: str = "row") -> torch.Tensor:
        """Uniform scores from a generator per row. ``draw="row"`` (default) seeds it with ``(seed, fingerprint)``:
        the fingerprint is the order of the row's first 16 visual tokens by the norm of their hidden state at the
        scoring point (projected features for ``site=pre_llm``), so each input gets its own subset, the same one
        every time and in any batch (an order, unlike the values, does not move with padding's float noise).
        ``draw="fixed"``: the seed alone (one subset for every input of a given size)."""
        B, N = ctx.visual_idx.shape
        rows = []
        for b in range(B):
            g = torch.Generator()
            if draw == "row":
                n = int(ctx.visual_ok[b].sum())
                h = ctx.hidden[b, ctx.visual_idx[b, :n]].float()
                key = f"{seed}:" + ",".join(map(str, torch.argsort(h.norm(dim=-1), stable=True)[:16].tolist()))
                g.manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1)
            else:
                g.manual_seed(seed)
            rows.append(torch.rand(N, generator=g))
        return torch.stack(rows).to(ctx.visual_idx.device)


def grid_points(rows: int, cols: int, k: int) -> list[tuple[int, int]]:
    """``k`` cells spread evenly over a ``rows x cols`` grid, in raster order."""
    if k <= 0:
        return []
    if k >= rows * cols:
        return [(r, c) for r in range(rows) for c in range(cols)]
    gr = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    gc = min(cols, math.ceil(k / gr))
    while gr * gc < k:  # grow the short side until the sub-grid holds k points
        if gr < rows and (gr / rows <= gc / cols or gc == cols):
            gr += 1
        else:
            gc += 1
    pts = [(int((a + 0.5) * rows / gr), int((b + 0.5) * cols / gc)) for a in range(gr) for b in range(gc)]
    n = len(pts)
    return [pts[int((i + 0.5) * n / k)] for i in range(k)]


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Split ``k`` over groups of ``sizes`` in proportion (largest remainder; ties to earlier groups)."""
    total = sum(sizes)
    # integer arithmetic: k * s / total = q + rem / total, so equal remainders tie exactly (no float rounding)
    out = [min(s, k * s // total) for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-((k * sizes[i]) % total), i))
    left = k - sum(out)
    while left > 0:
        for i in order:
            if left and out[i] < sizes[i]:
                out[i] += 1
                left -= 1
    return out


@register_criterion
class UniformCriterion(Criterion):
    name = "uniform"
    paper = "even spatial grid over each image's patch grid (baseline)"
    sites = ("llm", "pre_llm")
    image_only_fixed_count = True  # the grid and the count follow from the layout and the budget alone

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        return 0.0

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        if not ctx.coords_known:
            raise InputError("uniform", "needs the patch grid of every image (LLaVA-NeXT: pass image_sizes and pixel_values)")
        B, N = ctx.visual_idx.shape
        scores = torch.zeros(B, N)
        seg, row, col = ctx.segment.tolist(), ctx.row.tolist(), ctx.col.tolist()
        ok, keep = ctx.visual_ok.tolist(), ctx.keep.tolist()
        for b in range(B):
            members: dict[int, list[int]] = {}
            for i in range(N):
                if ok[b][i]:
                    members.setdefault(seg[b][i], []).append(i)
            segs = sorted(members)
            quota = split_budget(keep[b], [len(members[s]) for s in segs])
            picked: list[int] = []
            for s, q in zip(segs, quota):
                picked += _spread(members[s], row[b], col[b], q)
            scores[b, picked] = 1.0
        return scores.to(ctx.visual_idx.device)


def _spread(tokens: list[int], row: list[int], col: list[int], q: int) -> list[int]:
    """``q`` of ``tokens`` (one patch grid) spread evenly; CLS / newline tokens (row or col < 0) last."""
    cell = {(row[i], col[i]): i for i in tokens if row[i] >= 0 and col[i] >= 0}
    other = [i for i in tokens if row[i] < 0 or col[i] < 0]
    want = min(q, len(cell))
    picked: list[int] = []
    if cell:
        r0, c0 = min(r for r, _ in cell), min(c for _, c in cell)
        rows, cols = max(r for r, _ in cell) - r0 + 1, max(c for _, c in cell) - c0 + 1
        picked = [cell[(r0 + r, c0 + c)] for r, c in grid_points(rows, cols, want) if (r0 + r, c0 + c) in cell]
        if len(picked) < want:  # ragged grid: top up with the remaining cells in raster order
            taken = set(picked)
            rest = [i for i in cell.values() if i not in taken]
            need = want - len(picked)
            picked += [rest[int((t + 0.5) * len(rest) / need)] for t in range(need)]
    return picked + other[: q - len(picked)]


for _name, _desc in (("random", "seeded random subset"), ("uniform", "even spatial grid of the budget")):
    register_preset(_name, [{"criterion": _name, "layer": 2, "keep": 0.5}], f"{_desc}; layer 2, keep 0.5 (FastV's setting)")
