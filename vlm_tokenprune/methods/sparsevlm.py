"""SparseVLM: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(Zhang et al., ICML 2025), arXiv 2410.04417; official ``Gumpest/SparseVLMs`` (v1.0 = commit 91fb6d9,
``modelling_sparse_llama.py``, ``score.py``, ``utils.py``; v1.5 = branch ``v1.5``). Learned from that
code, written anew.

Text-guided, progressive, inside the LLM. A stage at layer ``K`` scores with layer ``K-1`` (whose
output is the input of ``K``: the official "pruning layer" ``l`` is our ``K-1``, so its
``pruning_loc`` [2, 6, 15, 19] are our stages at layers 3 / 7 / 16 / 20 of 32):

1. **Raters** (once per prompt, on the hidden states entering decoder layer 0): ``V`` = the row's visual
   tokens, ``T`` = its real text tokens after the first visual token; ``m = mean_v softmax_T(V T^T)``
   ``[|T|]``; raters = ``{t : m_t > mean(m)}``. (Library rule: when no text token is above the mean,
   e.g. one text token, every text token rates; the official code would get no rater and NaN scores.)
2. **Scores**: the post-softmax causal attention of layer ``K-1`` (full rows, RoPE, every key),
   averaged over heads, rows = raters, columns = the current visual tokens: ``R`` ``[|raters|, n]``;
   a visual token's score is its mean over the raters.
3. **Count** (``count="rank"``, the paper's rank-based adaptation, official v1.0): ``r = rank(R)``
   (``torch.linalg.matrix_rank`` in fp32); a row whose ``r == n`` is left as it is (no pruning, no
   recycling); else it keeps ``k = min(int(r * scale + bias), n - 1)`` top-scored tokens (at least 1).
   The stage's budget caps k (``Criterion.adaptive_count``); a budget of every token keeps every token, as
   for any criterion, so the presets cap at the official ``n - 1`` with ``keep=0.999, of=current,
   rounding=floor`` (exactly ``n - 1`` for 1 < n <= 1000 tokens). The official README's settings: 192 tokens
   ``scale=13.5, bias=0``, 128 ``9, 6``, 64 ``0.8, 0``. ``count="topk"`` (v1.5 / v2.0): ``k`` = the
   stage's budget, as the v1.5 per-layer lists (a budget of every token keeps all; the official code would
   still drop one).
4. **Recycling** (``recycle > 0``): of the ``n - k`` pruned tokens, the ``int(recycle * (n - k)) + 1``
   best by score (``recycle=0.3``, in descending score order) are clustered on their hidden states at
   layer ``K-1``'s output with DPC-kNN (``cluster_and_merge``): ``c = n_sel // cluster_size + 1``
   clusters; distance ``||x_i - x_j|| / sqrt(D)``; density ``exp(-mean of the squared distances to the c
   nearest (self included))`` plus ``1e-6`` uniform noise; ``delta`` = distance to the nearest denser
   token (the largest distance for the densest); centres = the top ``c`` of ``delta * density``; each
   token joins its nearest centre. Each cluster becomes ONE token: the plain mean of its members.

Deviations, by design (the engine's LLM-site merge, ``engine._run_merge``):

* A merged token sits at its cluster centre's place and takes the centre's position id, attention
  mask row / column and KV-cache column (positions keep their gaps, as every LLM-site stage here).
  The official v1.x inserts merged tokens after the kept visual tokens and renumbers positions
  0..L'-1 (decode positions then follow each layer's cache length); both are unlike a prune here.
* The noise is drawn from a generator seeded with ``seed`` (on the CPU, then moved), not from the global
  RNG, so runs are reproducible and leave the caller's RNG alone.
* The official mean divides by ``n + 1e-6`` (``cluster_and_merge``); here the exact mean.
* Batched, left-padded rows each use their own raters, rank and count (the official code is batch 1).

Cost: the rater attention rows (``|raters|`` query rows over every key, as FastV's last row times
``|raters|``), an SVD of ``[|raters|, n]`` for the rank, and the ``n_sel^2`` distances of the clustering.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..policy import register_preset
from ..reduction import Reduction
from ..scoring import ScoringContext
from ..selection import right_packed
from .base import Criterion, Param, register_criterion


def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool over the text tokens ``text`` ``[T, D]``: the raters, from the visual tokens ``visual`` ``[V, D]``
    (both entering decoder layer 0): ``mean_v softmax_T(V T^T) > its mean`` (every text token if none is above)."""
    m = torch.softmax(visual.float() @ text.float().T, dim=1).mean(0)
    out = m > m.mean()
    return out if bool(out.any()) else torch.ones_like(out)


def dpc_knn(x: torch.Tensor, n_clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of ``x`` ``[n, D]`` into ``n_clusters`` (official ``cluster_and_merge``).

    Returns ``(centres [c], assign [n])``: the centre tokens in the official order (descending
    ``delta * density``) and the cluster (index into ``centres``) of every token; a centre is in its own cluster.
    ``noise`` ``[n]``: added to the densities (ties), as the official ``1e-6 * rand``.
    """
    n, D = x.shape
    x = x.float()
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(D)
    near = torch.topk(dist, k=n_clusters, dim=-1, largest=False).values
    density = (-(near ** 2).mean(-1)).exp() + noise.to(dist)
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = torch.topk(delta * density, k=n_clusters).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return centres, assign


def recycled_count(n_pruned: int, recycle: float, cluster_size: int) -> int:
    """Merged tokens added back for ``n_pruned`` pruned tokens (0 when ``recycle`` is 0 or nothing was pruned)."""
    if recycle <= 0 or n_pruned <= 0:
        return 0
    n_sel = min(int(n_pruned * recycle) + 1, n_pruned)
    return n_sel // cluster_size + 1


def _finite(v: float) -> bool:
    return math.isfinite(v)


@register_criterion
class SparseVLMCriterion(Criterion):
    name = "sparsevlm"
    paper = "SparseVLM: text-rater attention, rank-based adaptive counts, token recycling (DPC-kNN merge)"
    arxiv = "2410.04417"
    op = "merge"
    sites = ("llm",)
    needs_text = True  # raters are text tokens after the image (engine.fit_budget keeps rows without any)
    reads_embeds = True  # the raters are chosen from decoder layer 0's input (ScoringContext.embeds)
    params = {
        "count": Param("rank", str, "'rank': k = int(rank * scale + bias) (v1.0, the paper's adaptive count; the "
                       "budget caps it); 'topk': k = the budget (v1.5 lists)", choices=("rank", "topk")),
        "scale": Param(13.5, float, "rank multiplier (192: 13.5, 128: 9, 64: 0.8)",
                       check=lambda v: 0 < v and _finite(v), allowed="a finite number > 0"),
        "bias": Param(0.0, float, "added to rank * scale (128: 6)", check=lambda v: 0 <= v and _finite(v),
                      allowed="a finite number >= 0"),
        "recycle": Param(0.3, float, "share of the pruned tokens clustered and merged back (0: none)",
                         check=lambda v: 0 <= v <= 1, allowed="in [0, 1]"),
        "cluster_size": Param(10, int, "selected tokens per cluster: clusters = n_sel // cluster_size + 1",
                              check=lambda v: v >= 1, allowed="an integer >= 1"),
        "seed": Param(0, int, "seed of the DPC-kNN density noise (1e-6 * uniform)"),
    }

    def adaptive_count(self, params: Mapping[str, Any]) -> bool:
        return params.get("count", "rank") == "rank"

    def predicted_count(self, k: int, n: int, params: Mapping[str, Any]) -> int:
        if k >= n:
            return n
        k = min(k, n - 1)
        return k + recycled_count(n - k, params.get("recycle", 0.3), params.get("cluster_size", 10))

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        # raters unknown before the prompt is seen: 8 rater rows (q_proj + logits over every key), the rank SVD of
        # [8, n] and the clustering distances of at most 0.3 * n tokens; layer-0 V.T^T not counted
        rows = 8
        n_sel = int(params.get("recycle", 0.3) * n_visual) + 1
        return (rows * (2 * geometry.hidden_size * geometry.q_dim + 2 * n_tokens * geometry.q_dim)
                + 4.0 * rows * rows * n_visual + 3.0 * n_sel * n_sel * geometry.hidden_size)

    def raters(self, ctx: ScoringContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, ok)`` ``[B, R]``: each row's rater tokens as positions of the current sequence."""
        if ctx.embeds is None or ctx.cur_pos is None:
            raise RuntimeError("sparsevlm reads the hidden states entering decoder layer 0 (ScoringContext.embeds); "
                               "it runs at site llm")
        B, M = ctx.cur_pos.shape
        is_rater = torch.zeros(B, M, dtype=torch.bool, device=ctx.cur_pos.device)
        for b in range(B):
            vis0 = ctx.embeds_visual[b].nonzero().flatten()
            if vis0.numel() == 0:
                continue
            after = torch.arange(ctx.embeds.shape[1], device=vis0.device) > vis0[0]
            txt0 = (ctx.embeds_valid[b] & ~ctx.embeds_visual[b] & after).nonzero().flatten()
            if txt0.numel() == 0:
                continue
            chosen = txt0[text_raters(ctx.embeds[b, vis0], ctx.embeds[b, txt0])]
            is_rater[b] = torch.isin(ctx.cur_pos[b], chosen) & ctx.seq_valid[b]
        ar = torch.arange(M, device=is_rater.device).expand(B, M)
        return right_packed(is_rater, ar)

    def relation(self, ctx: ScoringContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R [B, R, N], rater_ok [B, R])``: head-mean attention of the raters over the current visual tokens."""
        idx, ok = self.raters(ctx)
        att = ctx.attention(query=idx, query_ok=ok)  # [B, H, R, N], softmax over each rater's full causal row
        return att.float().mean(1), ok

    def merge(self, ctx: ScoringContext, count: str, scale: float, bias: float, recycle: float, cluster_size: int,
              seed: int) -> list[Reduction]:
        if ctx.output is None:
            raise RuntimeError("sparsevlm merges the stage layer's input (ScoringContext.output); it runs at site llm")
        rel, rater_ok = self.relation(ctx)
        x = ctx.output
        B, M = x.shape[:2]
        ar = torch.arange(M, device=x.device)
        target = torch.where(ctx.seq_valid, ar.expand(B, M), -1).clone()
        for b in range(B):
            n = int(ctx.visual_ok[b].sum())
            r = int(rater_ok[b].sum())
            if n == 0 or r == 0:
                continue
            vis = ctx.visual_idx[b, :n]
            R = rel[b, :r, :n]
            score = R.mean(0)
            cap = int(ctx.keep[b])
            if count == "rank":
                rank = int(torch.linalg.matrix_rank(R))
                if rank == n:
                    continue
                k = min(int(rank * scale + bias), n - 1, cap)
            else:
                if cap >= n:
                    continue
                k = cap
            k = max(k, 1)
            order = torch.sort(score, descending=True, stable=True).indices
            kept = torch.zeros(n, dtype=torch.bool, device=x.device)
            kept[order[:k]] = True
            pruned = (~kept).nonzero().flatten()  # ascending visual order, as the official pruned list
            target[b, vis[pruned]] = -1
            n_c = recycled_count(pruned.numel(), recycle, cluster_size)
            if n_c == 0:
                continue
            n_sel = min(int(pruned.numel() * recycle) + 1, pruned.numel())
            sel = pruned[torch.sort(score[pruned], descending=True, stable=True).indices[:n_sel]]
            gen = torch.Generator().manual_seed(seed)
            noise = torch.rand(n_sel, generator=gen) * 1e-6
            centres, assign = dpc_knn(x[b, vis[sel]], n_c, noise)
            target[b, vis[sel]] = vis[sel[centres[assign]]]
        return [Reduction.from_targets(target)]


_DESC = ("SparseVLM: text raters (question tokens above the mean layer-0 relevance to the image) score visual "
         "tokens by their head-mean attention at layers 2 / 6 / 15 / 19 (stages 3 / 7 / 16 / 20 of 32); ")
# v1.0 (rank-based count, the paper's adaptive sparsification): official pruning_loc [2, 6, 15, 19]; the cap is the
# official min(., n - 1): floor(0.999 * n) = n - 1 for 1 < n <= 1000 (LLaVA-1.5: 576)
_NO_CAP = 0.999
_V10 = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
for _n, (_scale, _bias) in _V10.items():
    register_preset(
        "sparsevlm" if _n == 192 else f"sparsevlm_{_n}",
        [{"criterion": "sparsevlm", "layer": _l, "depth": 32, "keep": _NO_CAP, "of": "current", "rounding": "floor",
          "scale": _scale, "bias": _bias} for _l in (3, 7, 16, 20)],
        _DESC + f"kept = int(rank * {_scale} + {_bias:g}) per layer (official v1.0 setting for {_n} tokens), 30 % of "
        "the pruned recycled as DPC-kNN cluster means", "2410.04417",
    )
# v1.5 (fixed per-layer counts of 576 tokens; the "192" is the mean visual count over the 32 layers)
_V15 = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
for _n, _ks in _V15.items():
    register_preset(
        f"sparsevlm_v15_{_n}",
        [{"criterion": "sparsevlm", "layer": _l, "depth": 32, "keep": _k / 576, "count": "topk"}
         for _l, _k in zip((3, 7, 16), _ks)],
        f"SparseVLM v1.5 for {_n} tokens: text raters, keep {' / '.join(map(str, _ks))} of 576 before layers 3 / 7 / "
        "16 of 32 (+ recycled cluster means)", "2410.04417",
    )
