"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024), arXiv 2403.06764.

Score of visual token j = attention it receives from the last prompt token in layer K-1,
averaged over heads, with RoPE and the softmax over the whole causal row (as the
official code ranks). Keep the top-k; defaults K = 2, R = 50 %.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..policy import register_preset
from ..scoring import ScoringContext
from .base import Criterion, last_row_flops, register_criterion


@register_criterion
class FastVCriterion(Criterion):
    name = "fastv"
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (FastV)"
    arxiv = "2403.06764"

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        return last_row_flops(geometry, n_tokens)  # softmax over the whole causal row

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        return ctx.attention_scores("last", rope=True, softmax_over="row", reduce="mean")  # [B, N], heads averaged


register_preset(
    "fastv", [{"criterion": "fastv", "layer": 2, "keep": 0.5}],
    "last-token attention at layer K-1 (RoPE, full-row softmax), top-k; K=2, R=50%", "2403.06764",
)
