"""DivPrune: "Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al., CVPR 2025),
arXiv 2503.02175; official code ``vbdi/divprune`` (``llava_arch.py: DivPrune``).

Token selection as a Max-Min Diversity Problem, solved greedily (farthest point) on the visual
tokens as the language model receives them (projector outputs; LLaVA-NeXT's ``image_newline``
tokens are candidates like any other). No attention, no text.

With ``D = 1 - cos(v_i, v_j)`` over an image's ``N`` tokens (fp32) and ``k`` to keep:

- pick 1: ``argmax_j`` of column ``j``'s second-smallest value (its nearest-neighbour distance;
  the smallest is the token itself);
- pick ``i > 1``: ``argmax_j min_{s in S} D[s, j]`` (first index on ties). Tokens already picked are
  never picked again (the official loop could re-pick one only when every remaining token
  duplicates a picked one; here the next unpicked token with the largest distance is taken).

Kept tokens stay in sequence order. The official code selects from one image per sample; here
every image of a row is its own set, the row's budget split over its images in proportion to
their token counts (largest remainder), so an image's kept set depends on that image alone.
Presets: ``divprune`` is the official ``SUBSET_RATIO=0.098`` (56 of 576) before the LLM with
contiguous positions (LLaVA passes no position ids); ``divprune_64/128/192`` keep 64 / 128 / 192
of 576. Site ``llm`` (an extension) selects on the hidden states entering layer ``layer - 1``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..policy import register_preset
from ..scoring import ScoringContext
from .base import Criterion, register_criterion
from .baselines import split_budget


def max_min_diverse(x: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min diversity: ``k`` indices of the rows of ``x`` ``[N, D]`` in pick order."""
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    f = x.float()
    f = f / f.norm(dim=1, keepdim=True)
    dist = 1.0 - f @ f.T
    if n == 1:
        return [0]
    first = int(torch.topk(dist, 2, dim=0, largest=False).values[1].argmax())
    picked = [first]
    score = dist[first].clone()
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[first] = True
    for _ in range(k - 1):
        j = int(score.masked_fill(taken, float("-inf")).argmax())
        picked.append(j)
        taken[j] = True
        score = torch.minimum(score, dist[j])
    return picked


@register_criterion
class DivPruneCriterion(Criterion):
    name = "divprune"
    paper = "DivPrune: greedy max-min diversity (cosine distance) over each image's visual tokens"
    arxiv = "2503.02175"
    sites = ("pre_llm", "llm")
    image_only_fixed_count = True  # each image's kept set and count depend on that image alone

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        return 2.0 * n_visual * n_visual * geometry.hidden_size  # the v x v cosine matrix (greedy picks not counted)

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        """``[B, N]``: ``k - rank`` for the picked tokens (earliest pick highest), 0 otherwise."""
        B, N = ctx.visual_idx.shape
        scores = torch.zeros(B, N, device=ctx.visual_idx.device)
        image = ctx.image if ctx.image is not None else ctx.segment
        feats = torch.gather(ctx.hidden, 1, ctx.visual_idx[..., None].expand(-1, -1, ctx.hidden.shape[-1]))
        for b in range(B):
            ok = ctx.visual_ok[b]
            ids = sorted(set(image[b][ok].tolist()))
            members = [(image[b] == i).logical_and(ok).nonzero().flatten() for i in ids]
            quota = split_budget(int(ctx.keep[b]), [len(m) for m in members]) if ids else []
            for m, q in zip(members, quota):
                order = max_min_diverse(feats[b, m], q)
                scores[b, m[order]] = torch.arange(len(order), 0, -1, dtype=scores.dtype, device=scores.device)
        return scores


register_preset("divprune", [{"criterion": "divprune", "site": "pre_llm", "keep": 0.098, "positions": "repack"}],
                "DivPrune: greedy max-min cosine diversity before the LLM, official SUBSET_RATIO 0.098 (56 of 576)",
                "2503.02175")
for _n in (64, 128, 192):
    register_preset(f"divprune_{_n}", [{"criterion": "divprune", "site": "pre_llm", "keep": _n / 576,
                                        "positions": "repack"}],
                    f"DivPrune before the LLM keeping {_n} of 576 visual tokens", "2503.02175")
