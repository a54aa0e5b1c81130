"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., EMNLP 2025), arXiv 2502.11494; official ``ZichenWen1/DART`` (logic as in its ports:
llmc ``token_reduction/dart.py: get_retained_image_token``).

Prune by duplication, not importance, before decoder layer ``K`` (default 2). No attention map
is needed, so it runs under every attention backend (flash included). For each row:

1. ``k`` = the keys of layer ``K-1`` (its own ``k_proj`` output, ``k_norm`` if any, RoPE), all
   key heads concatenated; pivots = the ``pivot_image`` visual tokens and the ``pivot_text`` text
   tokens (real tokens after the first visual token) with the largest L1 norm of ``k``.
2. ``z`` = the hidden states entering layer ``K`` through the model's final norm (``model.norm``).
3. Candidates = the visual tokens minus the image pivots. For each pivot, in the official order
   (CPython's iteration order of the ``set`` built from [image pivots, text pivots] as row
   positions without padding), take the ``q`` candidates of lowest cosine similarity to it
   (``eps = 1e-8``), keep them and remove them from the candidates.
4. Kept visual tokens = image pivots + every pick (text pivots are only probes), in sequence order;
   position ids keep their gaps.

``count="official"``: ``q = k // (pivot_image + pivot_text)`` for a budget ``k``, so the kept count
is ``pivot_image + 8 q`` (132 for the paper's 128, not 128). ``count="exact"`` (a library option)
spreads ``k - pivot_image`` over the pivots (the first in order take one more) so exactly ``k``
are kept. Key heads are not repeated to the query heads (GQA): the L1 norm only scales, ranks stay. The keys carry
RoPE at the positions the model runs with: ``generate()`` gives left-padded rows their own positions;
a plain left-padded forward without ``position_ids`` runs them shifted (as the unpatched model does),
which changes the pivots' key norms.
Presets: ``dart`` (layer 2, ``keep=128/576``, official count), ``dart_64`` / ``dart_192``; as fractions
they scale to any visual-token count.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import project_heads, project_keys
from ..errors import IncompatiblePolicyError
from ..policy import register_preset
from ..reference_ops import rope
from ..scoring import ScoringContext
from ..selection import right_packed
from .base import Criterion, Param, register_criterion


def pivot_order(image_pivots: list[int], text_pivots: list[int]) -> list[int]:
    """The official iteration order over the pivots: that of a Python ``set`` built from the list."""
    return list(set(image_pivots + text_pivots))


def duplicate_picks(z: torch.Tensor, pivots: list[int], candidates: list[int], quota: list[int]) -> list[int]:
    """For pivot ``pivots[i]`` take the ``quota[i]`` remaining ``candidates`` least cosine-similar on ``z`` [L, D]."""
    left = list(candidates)
    picked: list[int] = []
    for p, q in zip(pivots, quota):
        q = min(q, len(left))
        if q <= 0:
            continue
        sim = F.cosine_similarity(z[p][None], z[left], dim=-1, eps=1e-8)
        top = torch.topk(-sim, q).indices.tolist()
        chosen = [left[i] for i in top]
        picked += chosen
        gone = set(chosen)
        left = [c for c in left if c not in gone]
    return picked


@register_criterion
class DARTCriterion(Criterion):
    name = "dart"
    paper = "DART: pivot tokens (key L1 norm) and duplication (cosine similarity to the pivots)"
    arxiv = "2502.11494"
    params = {
        "pivot_image": Param(4, int, "image pivots", check=lambda v: v >= 0, allowed="an integer >= 0"),
        "pivot_text": Param(4, int, "text pivots", check=lambda v: v >= 0, allowed="an integer >= 0"),
        "count": Param("official", str, "'official': k // pivots per pivot (128 -> 132 kept); 'exact': k kept",
                       choices=("official", "exact")),
    }

    norm: nn.Module | None = None  # the language model's final norm (set on the copy bind() returns)

    def bind(self, model: nn.Module, params: Mapping[str, Any], where: str, seams: Any) -> "DARTCriterion":
        lm = seams.language_model
        norm = getattr(lm, "norm", None)
        if not isinstance(norm, nn.Module):
            raise IncompatiblePolicyError(f"{where}.criterion", f"DART reads the language model's final norm; "
                                          f"{type(lm).__name__} has no 'norm' module; allowed: Llama-style models")
        if params.get("pivot_image", 4) + params.get("pivot_text", 4) < 1:
            raise IncompatiblePolicyError(f"{where}.pivot_image", "DART needs at least one pivot; allowed: "
                                          "pivot_image + pivot_text >= 1")
        return self.bound(norm=norm)

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        # L1 norms of the captured keys, then the cosines of the visual tokens to every pivot (final norm not counted)
        pivots = params.get("pivot_image", 4) + params.get("pivot_text", 4)
        return float(n_tokens * geometry.kv_dim) + 2.0 * n_visual * pivots * geometry.hidden_size

    def _keys(self, ctx: ScoringContext) -> torch.Tensor:
        attn = ctx.layer.self_attn
        d = attn.head_dim
        n_kv = attn.k_proj.out_features // d
        if ctx.keys is not None:
            k = project_keys(attn, None, ctx.keys, None, n_kv, d)
        else:
            k = project_heads(attn, "k", ctx.layer.input_layernorm(ctx.hidden), n_kv, d)
        if ctx.position_embeddings is not None:
            cos, sin = ctx.position_embeddings
            k = rope(k.float(), cos.float(), sin.float())
        return k.float().transpose(1, 2).flatten(2)  # [B, L, H_kv * d]

    def score(self, ctx: ScoringContext, pivot_image: int, pivot_text: int, count: str) -> torch.Tensor:
        if self.norm is None:
            raise RuntimeError("dart scores with the model's final norm, which bind() gives it (patch() binds it)")
        if ctx.output is None:
            raise RuntimeError("dart needs the stage layer's input (ScoringContext.output); it runs at site llm")
        B, N = ctx.visual_idx.shape
        l1 = self._keys(ctx).abs().sum(-1)  # [B, L]
        z = self.norm(ctx.output).float()
        rowpos = torch.cumsum(ctx.seq_valid.long(), 1) - 1  # position within the row without its left padding
        scores = torch.zeros(B, N, device=ctx.visual_idx.device)
        for b in range(B):
            vis = ctx.visual_idx[b][ctx.visual_ok[b]]
            txt = ctx.text_idx[b][ctx.text_ok[b]] if ctx.text_idx is not None else vis[:0]
            k = int(ctx.keep[b])
            n_img, n_txt = min(pivot_image, vis.numel()), min(pivot_text, txt.numel())
            if count == "exact":
                n_img = min(n_img, k)
            img_piv = vis[torch.topk(l1[b, vis], n_img).indices].tolist()
            txt_piv = txt[torch.topk(l1[b, txt], n_txt).indices].tolist()
            # the official order is defined on row positions (batch 1, no padding): map there and back
            to_seq = {int(rowpos[b, p]): p for p in img_piv + txt_piv}
            order = [to_seq[r] for r in pivot_order([int(rowpos[b, p]) for p in img_piv],
                                                     [int(rowpos[b, p]) for p in txt_piv])]
            if count == "official":
                quota = [k // (pivot_image + pivot_text)] * len(order)
            else:
                rest, n = max(0, k - len(img_piv)), max(1, len(order))
                quota = [rest // n + (1 if i < rest % n else 0) for i in range(len(order))]
            piv = set(img_piv)
            cands = [p for p in vis.tolist() if p not in piv]
            kept = set(img_piv) | set(duplicate_picks(z[b], order, cands, quota))
            local = {p: i for i, p in enumerate(ctx.visual_idx[b].tolist())}
            scores[b, [local[p] for p in kept]] = 1.0
        return scores

    def select(self, ctx: ScoringContext, scores: torch.Tensor, **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens ``score`` marked (the official count may exceed the budget: pivots + 8 * (k // 8))."""
        return right_packed((scores > 0) & ctx.visual_ok)


register_preset("dart", [{"criterion": "dart", "layer": 2, "keep": 128 / 576}],
                "DART: 4 image + 4 text pivots by key L1 norm at layer 1, keep the tokens least similar to each "
                "pivot; layer 2, max_num_trunction 128 of 576 (official count: 132 kept)", "2502.11494")
for _n in (64, 192):
    register_preset(f"dart_{_n}", [{"criterion": "dart", "layer": 2, "keep": _n / 576}],
                    f"DART at layer 2 with max_num_trunction {_n} of 576 (official count)", "2502.11494")
