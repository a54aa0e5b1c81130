"""EfficientVLA's visual-token selection: "EfficientVLA: Training-Free Acceleration and
Compression for Vision-Language-Action Models" (Yang et al., NeurIPS 2025), arXiv 2506.10100.

Only the task-relevance + diversity token selection (the paper's part 2) is implemented;
its layer deletion and diffusion-head caching are not token pruning.

Per row, with ``K_final`` = the row's budget ``ctx.keep[b]``:

1. Relevance ``r_i = sum_{j in text} (1/H) sum_h A^h[j, i]``: the attention of the
   instruction text tokens ``j`` (``ctx.text_idx``: real non-visual tokens after the row's
   first visual token) to visual token ``i`` in the scoring layer (RoPE, softmax over the
   whole causal row: the model's own attention probabilities), heads averaged, summed over
   the text queries. **Direction**: the paper writes ``A[i, j]`` (visual token i attending to
   the task tokens), which a causal mask makes zero whenever the text follows the image, as
   in every LLaVA prompt; we use text -> visual attention ``A[j, i]``, the direction that
   carries information. Summing or averaging over text queries ranks identically after the
   normalisation below.
2. ``s = (r - min r) / (max r - min r)`` over the row's visual tokens (all 0 when flat).
3. ``V_key``: the top ``K_key`` by ``s`` (``k_key``, paper: 4, "4 to 8"; capped at K_final).
4. ``V_task``: the next ``K_task = floor(alpha * (K_final - K_key))`` by ``s`` (``alpha`` = 0.5).
5. ``V_div``: the remaining ``K_div = K_final - K_key - K_task`` among the other tokens, those
   with the highest ``1 - max_{k in V_key} cos(v_j, v_k)``. **Representation** ``v``: the
   hidden states ENTERING the scoring layer (the residual stream, before its
   ``input_layernorm``) at the visual positions, i.e. ``ctx.hidden`` at ``ctx.visual_idx``.
   Keep ``V_key + V_task + V_div`` (exactly K_final tokens). Ties go to the lower position.

Where: the paper prunes "from the 2nd Transformer layer". In this library's convention (a
stage at layer K scores with layer K-1's input and drops before layer K, FastV's "K = 2")
that is ``layer=2``: the 2nd layer (index 1) scores, layers >= 2 see the kept tokens.
Budget: the paper keeps 56 (or 112) of CogACT's 256 visual tokens; the preset keeps the
same fraction, ``keep = 56/256 = 0.21875``.

A row with visual tokens but no instruction text after them has no relevance signal: the
criterion raises an ``InputError`` rather than guess.
"""
from __future__ import annotations

import math

from typing import Any, Mapping

import torch

from ..errors import InputError
from ..policy import register_preset
from ..scoring import ScoringContext
from .base import Criterion, Param, last_row_flops, register_criterion


def minmax(r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row of ``r`` [B, N] over ``valid`` entries (0 where invalid or flat)."""
    big = torch.finfo(r.dtype).max
    lo = r.masked_fill(~valid, big).amin(1, keepdim=True)
    hi = r.masked_fill(~valid, -big).amax(1, keepdim=True)
    span = hi - lo
    s = torch.where(span > 0, (r - lo) / span.clamp(min=torch.finfo(r.dtype).tiny), torch.zeros_like(r))
    return s.masked_fill(~valid, 0.0)


def _order(values: torch.Tensor, allowed: torch.Tensor) -> list[int]:
    """Indices where ``allowed`` sorted by ``values`` descending, ties to the lower index."""
    v = values.masked_fill(~allowed, float("-inf"))
    order = torch.sort(v, descending=True, stable=True).indices
    return order[: int(allowed.sum())].tolist()


@register_criterion
class EfficientVLACriterion(Criterion):
    name = "efficientvla"
    needs_text = True  # task relevance is the attention of the text after the image (engine.fit_budget)
    paper = "EfficientVLA: Training-Free Acceleration and Compression for Vision-Language-Action Models"
    arxiv = "2506.10100"
    budget_predicts_count = True  # select() is not a plain top-k, but it keeps exactly ctx.keep[b] tokens
    params = {
        "k_key": Param(4, int, "key tokens taken first by task relevance (paper: 4, '4 to 8')",
                       check=lambda v: v >= 1, allowed="an integer >= 1"),
        "alpha": Param(0.5, float, "share of the remaining budget taken by task relevance; the rest by diversity",
                       check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]"),
    }

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        # every non-visual token counted as a text query (an upper bound: only the text after the image is),
        # plus the cosines of every visual token to the k_key key tokens
        return (n_tokens - n_visual) * last_row_flops(geometry, n_tokens) \
            + 2.0 * n_visual * params.get("k_key", 4) * geometry.hidden_size

    def score(self, ctx: ScoringContext, k_key: int, alpha: float) -> torch.Tensor:
        """Min-max normalised text->visual relevance ``s`` [B, N] (the ranking of steps 3-4)."""
        has_vis = ctx.visual_ok.any(1)
        has_text = ctx.text_ok.any(1) if ctx.text_ok is not None else torch.zeros_like(has_vis)
        bad = (has_vis & ~has_text & (ctx.keep < ctx.visual_ok.sum(1))).nonzero().flatten().tolist()
        if bad:
            raise InputError(
                "efficientvla",
                f"sample {bad[0]} has no instruction text after its visual tokens; task relevance is the attention "
                "of the text that follows the image (put the question after the image)",
            )
        r = ctx.attention("text", rope=True, softmax_over="row").mean(dim=1).sum(dim=1)  # [B, N]
        return minmax(r, ctx.visual_ok)

    def select(self, ctx: ScoringContext, scores: torch.Tensor, k_key: int, alpha: float):
        B, N = scores.shape
        K = int(ctx.keep.max()) if B else 0
        idx = torch.zeros(B, K, dtype=torch.long, device=scores.device)
        ok = torch.zeros(B, K, dtype=torch.bool, device=scores.device)
        vis = torch.gather(ctx.hidden, 1, ctx.visual_idx[..., None].expand(B, N, ctx.hidden.shape[-1])).float()
        vis = vis / vis.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        s_all, valid_all = scores.float().cpu(), ctx.visual_ok.cpu()
        for b in range(B):
            k_final = int(ctx.keep[b])
            if k_final == 0:
                continue
            rank = _order(s_all[b], valid_all[b])
            n_key = min(k_key, k_final)
            n_task = math.floor(alpha * (k_final - n_key) + 1e-9)  # 0.29 * 100 is 28.999999999999996 in floats
            n_div = k_final - n_key - n_task
            key, task = rank[:n_key], rank[n_key: n_key + n_task]
            chosen = key + task
            if n_div:
                cos = vis[b] @ vis[b, key].T  # [N, K_key]
                diversity = (1.0 - cos.max(dim=1).values).cpu()
                rest = valid_all[b].clone()
                rest[chosen] = False
                chosen = chosen + _order(diversity, rest)[:n_div]
            picked = torch.tensor(sorted(chosen), dtype=torch.long, device=scores.device)
            idx[b, :k_final] = picked
            ok[b, :k_final] = True
        return idx, ok


register_preset(
    "efficientvla", [{"criterion": "efficientvla", "layer": 2, "keep": 0.21875}],
    "text->visual relevance (4 key + alpha=0.5 task) + diversity by cosine to the key set; layer 2, keep 56/256",
    "2506.10100",
)
