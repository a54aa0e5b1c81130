"""VisionZip: "Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR 2025),
arXiv 2412.04467; the authors' package ``visionzip==0.1.3`` (``CLIPVisionTower_VisionZip.forward``).

Text-agnostic, at the vision tower's feature layer ``F`` (the layer LLaVA reads; 22 of 24), per crop,
with a budget of ``T`` tokens reaching the language model, ``C = round(T * contextual)`` contextual
and ``D = T - C`` dominant (the official splits 54 + 10, 108 + 20, 162 + 30 for 64 / 128 / 192 are
``contextual = 10/64``):

1. Dominant: the patches the CLS query attends to most at layer ``F`` (post-softmax over every token,
   summed over heads; ties to the lower index), kept in original order.
2. Contextual: the other ``N_r`` patches in original order, keyed by layer ``F``'s ``k_proj`` output
   averaged over heads and L2-normalised; targets at the uniform stride ``max(1, N_r // C)`` of that
   list (the first ``C``); every other token joins the target of highest key cosine (first on ties).
   A contextual token is its target's feature **plus** the plain mean of its members (the target alone
   when it has none).

The official code feeds CLS to the projector as one of the ``D`` dominant tokens. HF LLaVA's
``vision_feature_select_strategy="default"`` drops CLS before the projector, so there the ``D``
dominant slots are ``D`` patches; with ``"full"`` CLS is kept and ``D - 1`` patches are dominant, as in
the official code. The official output order is [dominant; contextual]; here every token reaches the
language model at its own (a contextual token: its target's) place in the raster order, with the
stage's positions (``repack``: contiguous, as LLaVA's splice).
InternVL (pixel-shuffle groups, ``vision.groups``): the same over LLM tokens (``_zip_groups``): a group's
CLS attention is the SUM of its patches', its key / feature the concatenation of its patches' (the shuffled
token); the budget counts groups per tile; kept and merged groups stay whole.
Presets: ``visionzip`` (64 of 576), ``visionzip_128``, ``visionzip_192``; as fractions they scale to
any tower.
"""
from __future__ import annotations

import torch

from ..errors import IncompatiblePolicyError
from ..policy import register_preset
from ..vision.base import VisionCriterion, tower_attention, tower_groups
from ..vision.groups import group_concat, group_sum
from .base import Param, register_criterion
from .vispruner import feature_layer_cls_attention


def split_counts(total: int, contextual: float) -> tuple[int, int]:
    """``(dominant, contextual)`` token counts for a budget of ``total``."""
    c = min(total - 1, max(0, round(total * contextual))) if total > 1 else 0
    return total - c, c


def contextual_merge(keys: torch.Tensor, feats: torch.Tensor, rest: list[int], n_ctx: int):
    """``(targets, assign, values)``: targets (indices from ``rest``), each rest token's target index,
    and the ``n_ctx`` contextual features (target + mean of its members) from ``keys`` [T, d] / ``feats`` [T, D]."""
    step = max(1, len(rest) // n_ctx)
    tpos = list(range(0, len(rest), step))[:n_ctx]
    targets = [rest[i] for i in tpos]
    m = keys[rest].float()
    m = m / m.norm(dim=-1, keepdim=True)
    sim = m @ m[tpos].T  # [N_r, C]
    assign = sim.argmax(dim=1)
    is_target = torch.zeros(len(rest), dtype=torch.bool, device=keys.device)
    is_target[tpos] = True
    assign[tpos] = torch.arange(len(tpos), device=keys.device)
    x = feats[rest]
    one_hot = torch.zeros(len(rest), len(tpos), dtype=x.dtype, device=x.device)
    one_hot[torch.arange(len(rest))[~is_target], assign[~is_target]] = 1
    counts = one_hot.sum(0).clamp(min=1)[:, None]
    values = x[tpos] + (one_hot.T @ x) / counts
    return targets, assign, values


@register_criterion
class VisionZipCriterion(VisionCriterion):
    name = "visionzip"
    needs_cls = "its dominant tokens are the patches the CLS token attends to most at the feature layer"
    paper = "VisionZip: dominant tokens by CLS attention + contextual tokens merged by key similarity"
    arxiv = "2412.04467"
    image_only_fixed_count = True  # each crop keeps its budget, computed from that crop alone
    whole_groups = True  # pixel-shuffle towers (InternVL): dominant / contextual groups (``_zip_groups``)
    params = {
        "contextual": Param(10 / 64, float, "share of the budget merged into contextual tokens (official: 10/64)",
                            check=lambda v: 0.0 <= v < 1.0, allowed="a number in [0, 1)"),
    }

    def check_vision(self, seams, stage, where: str) -> None:
        if seams.select_strategy not in ("default", "full"):
            raise IncompatiblePolicyError(f"{where}.site", f"vision_feature_select_strategy {seams.select_strategy!r}; "
                                          "allowed: default, full")

    def capture_layers(self, seams, stage) -> tuple[int, ...]:
        return (seams.feature_layer,)

    def after_feature_layer(self, run, hidden: torch.Tensor, seams) -> torch.Tensor:
        if tower_groups(seams) is not None:
            return self._zip_groups(run, hidden, seams, tower_groups(seams))
        n, T, Dm = hidden.shape
        N = T - 1
        cls_counts = seams.select_strategy == "full"  # CLS reaches the LLM: it is one of the dominant tokens
        budget = min(run.keep_patches + (1 if cls_counts else 0), T if cls_counts else N)
        if budget >= (T if cls_counts else N):
            return hidden
        n_dom, n_ctx = split_counts(budget, run.params.get("contextual", 10 / 64))
        n_dom_patches = n_dom - (1 if cls_counts else 0)
        a = feature_layer_cls_attention(run, seams).sum(1)[:, 1:]  # [n, N]
        rank = torch.sort(a, dim=1, descending=True, stable=True).indices
        attn = tower_attention(seams, seams.feature_layer)
        keys = run.captured["k"][1].float().view(n, T, attn.num_heads, -1).mean(2)  # [n, T, d]
        out_len = 1 + n_dom_patches + n_ctx
        out = hidden.new_zeros(n, out_len, Dm)
        to = torch.full((n, T), -1, dtype=torch.long, device=hidden.device)
        sel = torch.zeros(n, out_len, dtype=torch.long, device=hidden.device)  # each slot's representative token
        for c in range(n):
            dom = sorted(int(i) + 1 for i in rank[c, :n_dom_patches])
            dom_set = set(dom)
            rest = [t for t in range(1, T) if t not in dom_set]
            slots = [0] + dom
            to[c, slots] = torch.arange(len(slots), device=hidden.device)
            out[c, : len(slots)] = hidden[c, slots]
            if n_ctx:
                targets, assign, values = contextual_merge(keys[c], hidden[c], rest, n_ctx)
                base = len(slots)
                to[c, rest] = base + assign.to(hidden.device)
                out[c, base:] = values.to(hidden.dtype)
                slots = slots + targets
            sel[c] = torch.tensor(slots, device=hidden.device)
        run.reassign(to, torch.gather(run.ident, 1, sel), run.size.new_zeros(n, out_len).scatter_add_(
            1, to.clamp(min=0).masked_fill(to < 0, 0), torch.where(to >= 0, run.size, 0.0)))
        return out

    def _zip_groups(self, run, hidden: torch.Tensor, seams, groups: torch.Tensor) -> torch.Tensor:
        """VisionZip over pixel-shuffle groups (InternVL; CLS never reaches the LLM there): dominant = the groups of
        largest summed (heads and patches) CLS attention; contextual = the other groups in raster order, keyed by
        the concatenation of their patches' head-mean keys; a contextual group is its target plus the mean of its
        members, patch by patch (the concatenated features). Whole groups only; ``T`` counts groups per tile."""
        n, T, Dm = hidden.shape
        G, g = groups.shape
        budget = min(run.keep_patches, G)
        if budget >= G:
            return hidden
        n_dom, n_ctx = split_counts(budget, run.params.get("contextual", 10 / 64))
        a = group_sum(feature_layer_cls_attention(run, seams).sum(1)[:, 1:], groups)  # [n, G]
        rank = torch.sort(a, dim=1, descending=True, stable=True).indices
        attn = tower_attention(seams, seams.feature_layer)
        keys = run.captured["k"][1].float().view(n, T, attn.num_heads, -1).mean(2)[:, 1:]  # [n, N, d]
        kg, xg = group_concat(keys, groups), group_concat(hidden[:, 1:], groups)  # [n, G, g * d], [n, G, g * Dm]
        members = (groups.to(hidden.device) + 1).tolist()  # token index of each group's patches
        out_len = 1 + (n_dom + n_ctx) * g
        out = hidden.new_zeros(n, out_len, Dm)
        to = torch.full((n, T), -1, dtype=torch.long, device=hidden.device)
        sel = torch.zeros(n, out_len, dtype=torch.long, device=hidden.device)
        for c in range(n):
            dom = sorted(int(q) for q in rank[c, :n_dom])
            dom_set = set(dom)
            rest = [q for q in range(G) if q not in dom_set]
            slots = [0] + [t for q in dom for t in members[q]]
            to[c, slots] = torch.arange(len(slots), device=hidden.device)
            out[c, : len(slots)] = hidden[c, slots]
            if n_ctx:
                targets, assign, values = contextual_merge(kg[c], xg[c], rest, n_ctx)
                base = len(slots)
                for q, k in zip(rest, assign.tolist()):
                    to[c, members[q]] = torch.arange(base + k * g, base + (k + 1) * g, device=hidden.device)
                out[c, base:] = values.reshape(n_ctx * g, Dm).to(hidden.dtype)
                slots = slots + [t for q in targets for t in members[q]]
            sel[c] = torch.tensor(slots, device=hidden.device)
        run.reassign(to, torch.gather(run.ident, 1, sel), run.size.new_zeros(n, out_len).scatter_add_(
            1, to.clamp(min=0).masked_fill(to < 0, 0), torch.where(to >= 0, run.size, 0.0)))
        return out


_DOC = "VisionZip at the CLIP feature layer: {} of 576 tokens ({} dominant by CLS attention + {} contextual merged by key similarity)"
for _name, _n in (("visionzip", 64), ("visionzip_128", 128), ("visionzip_192", 192)):
    _d, _c = split_counts(_n, 10 / 64)
    register_preset(_name, [{"criterion": "visionzip", "site": "vision", "keep": _n / 576, "positions": "repack"}],
                    _DOC.format(_n, _d, _c), "2412.04467")
