"""AIM, stage A (token merging before the LLM): "AIM: Adaptive Inference of Multi-Modal LLMs via
Token Merging and Pruning" (Zhong et al., ICCV 2025), arXiv 2412.03248; official
``bipartite_soft_matching_merge`` (LaVi-Lab/AIM ``llava/model/token_merge.py``), ToMe-style.

On the projected visual features of each patch grid (merging never crosses images), per iteration:

1. metric = the current features, L2-normalised; split alternately into A (even) and B (odd)
   in the current order; ``S = A . B^T``; each A token picks its most similar B token.
2. The ``r`` A tokens with the highest similarity are merged into their B tokens
   (``r = min(n // 2, n - k)``: halving, as the paper's r = N/2, N/4, ...; the last
   iteration stops at the budget ``k``).
3. ``mode="mean"`` (the paper): plain mean of the B token and the A tokens merged into it
   (``scatter_reduce(mean, include_self)``, no size weighting, so later iterations average
   means). ``mode="size"``: ToMe's size-weighted average (sizes add).

Iterated until each grid holds its share of the row's budget (``keep=0.25``: 2 iterations,
``keep=0.125``: 3; a row's budget is split over its grids in proportion to their token
counts, largest remainder, at least 1 per grid). ``order="spatial"`` (default) keeps the raster
order (a merged token sits at its B token's place); ``order="paper"`` is the official output
order ``[unmerged A in similarity-rank order, B]`` of every iteration. Similarity ties go to
the lower index. Positions follow the stage's ``positions`` (AIM's own: ``repack``).
"""
from __future__ import annotations

import torch

from ..policy import register_preset
from ..reduction import Reduction
from ..scoring import ScoringContext
from .base import Criterion, Param, register_criterion
from .baselines import split_budget


@register_criterion
class AIMMerge(Criterion):
    name = "aim_merge"
    paper = "AIM stage A: ToMe-style bipartite merging of projected visual features before the LLM"
    arxiv = "2412.03248"
    sites = ("pre_llm",)
    op = "merge"
    image_only_fixed_count = True  # merges within each image's features; each image's count is its budget share
    params = {
        "mode": Param("mean", str, "'mean': plain mean (the paper); 'size': size-weighted (ToMe)", choices=("mean", "size")),
        "order": Param("spatial", str, "'spatial': raster order kept; 'paper': [unmerged A, B] per iteration",
                       choices=("spatial", "paper")),
    }

    def merge(self, ctx: ScoringContext, mode: str, order: str) -> list[Reduction]:
        """Reductions over the whole sequence, one per iteration (the engine applies them in turn)."""
        x = ctx.hidden
        B, L = x.shape[:2]
        dev = x.device
        # per row: its grids as (segment id -> current positions); budget per grid
        seg_full = torch.full((B, L), -1, dtype=torch.long, device=dev)
        seg_full.scatter_(1, ctx.visual_idx, torch.where(ctx.visual_ok, ctx.segment, -1))
        seg_full = torch.where(ctx.seq_valid, seg_full, -1)
        quota: list[dict[int, int]] = []
        for b in range(B):
            segs = seg_full[b][seg_full[b] >= 0]
            ids = sorted(set(segs.tolist()))
            sizes = [int((segs == s).sum()) for s in ids]
            q = split_budget(int(ctx.keep[b]), sizes) if ids else []
            quota.append({s: max(1, n) for s, n in zip(ids, q)})
        valid = ctx.seq_valid
        size = torch.ones(B, L, dtype=x.dtype, device=dev)
        chain: list[Reduction] = []
        while True:
            M = x.shape[1]
            target = torch.where(valid, torch.arange(M, device=dev).expand(B, M), -1)
            key = torch.arange(M, device=dev, dtype=torch.float64).expand(B, M).clone()
            merged = False
            metric = x / x.norm(dim=-1, keepdim=True)
            for b in range(B):
                for s, k in quota[b].items():
                    t = (seg_full[b] == s).nonzero().flatten()
                    n = t.numel()
                    r = min(n // 2, n - k)
                    if r <= 0:
                        continue
                    merged = True
                    a_idx, b_idx = t[0::2], t[1::2]
                    sim = metric[b, a_idx].float() @ metric[b, b_idx].float().T
                    best, best_j = sim.max(dim=-1)
                    rank = torch.sort(-best, stable=True).indices  # most similar first, ties to the lower index
                    src, unm = rank[:r], rank[r:]
                    target[b, a_idx[src]] = b_idx[best_j[src]]
                    if order == "paper":  # [unmerged A in rank order, B] inside the grid's span
                        new = torch.cat([a_idx[unm], b_idx])
                        key[b, new] = t[0].double() + torch.arange(new.numel(), device=dev, dtype=torch.float64) / (n + 1)
            if not merged:
                return chain
            red = Reduction.from_targets(target, key, weight=mode)
            x = red.fuse(x, size)
            size = red.add(size)
            seg_full = torch.where(red.ok, red.take(seg_full), -1)
            valid = red.ok
            chain.append(red)


register_preset("aim_merge", [{"criterion": "aim_merge", "site": "pre_llm", "keep": 0.125, "positions": "repack"}],
                "AIM stage A: bipartite merging of projected visual tokens before the LLM to 12.5 % (3 halvings; "
                "keep=0.25 for the video setting), contiguous positions", arxiv="2412.03248")
