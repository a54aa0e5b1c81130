"""FlowCut, vision-encoder part: "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models" (Tong et al., NeurIPS 2025), arXiv 2505.19536.

Inside the CLIP tower, after every encoder layer ``idx`` while a crop holds more than its target
``K + 1`` tokens (K patches + CLS), from that layer's own attention (q/k/v projections captured
while it ran, under whatever attention backend the tower uses; scores in fp32):

    a_j    = mean_h softmax_j'(q_CLS . k_j' * scale)[j]         CLS attention, patches j
    sem_j  = mean_h softmax_j'(v_CLS . v_j')[j]                 value similarity to CLS (no scale)
    dens_j = || mean_h v_j ||_1
    S_j    = (a_j / sum a + sem_j / sum sem) * dens_j;   S_cum = 0.5 S_cum + 0.5 S  (S at the first layer)

With ``F`` the feature layer (the encoder layer whose output LLaVA reads; 22 of 24 for
``vision_feature_layer=-2``) and ``rpl = F - idx - 1`` the remaining pruning layers, tokens are
pruned after layers with even ``rpl >= 0`` (idx = 1, 3, ..., 21 for LLaVA-1.5): with
``p = a / sum a`` over the N current patches, ``r_H = H(p) / log N``,

    P = round((N - K) / sqrt(rpl) * (1 - r_H^2)),   kept = max(T - P, K + 1)   (rpl = 0: kept = K + 1)

keeping CLS and the top ``kept - 1`` patches by ``S_cum`` (ties to the lower index) in their order.
Encoder layers after the last pruning (the feature layer included) run on the kept tokens only.

Batches: the tower encodes every crop of every image of the batch at once, and FlowCut's count
is per layer, COMMON to all crops: ``P`` is the maximum over the crops (the official code's
choice), so no attention mask is needed and an image's count can depend on the other images of
the batch (the kept SET of each crop is its own top-k). The budget (``keep`` / ``tokens``) counts
patches per crop: LLaVA-1.5 ``tokens=128`` is the paper's 128; on LLaVA-NeXT the paper keeps
``target / 2`` per crop in the tower, i.e. ``tokens=64`` for its 128 (its second, LLM stage is
``flowcut_llm``). Presets: ``flowcut_vit`` keeps 128 of 576 (``keep=2/9``), ``flowcut_vit_192`` /
``flowcut_vit_64`` keep 192 / 64 of 576; as fractions they scale to any tower (36 patches -> 8);
``flowcut_next`` is the official LLaVA-NeXT pipeline for a target of 320 tokens (``flowcut_next_640`` /
``flowcut_next_160``): 160 of 576 per crop in the tower, no ``image_newline`` tokens (``newlines=drop``), then
``flowcut_llm`` at layer 2 keeps 320 tokens (``tokens=320``, an absolute count of however many arrive) renumbered
contiguously (``positions=repack``); ``flowcut_next_fraction`` is the library's earlier reading (newlines kept and
selectable by the LLM stage, which keeps 320 / 2880 of the original visual tokens at their original positions).
InternVL (pixel-shuffle groups, ``vision.groups``): the same schedule over whole groups (``_prune_groups``): a
group's ``a`` and ``S_cum`` are the SUMS over its patches, ``N`` / ``K`` count groups (LLM tokens) per tile, and
a kept group keeps all its patches through the later layers.
Qwen2-VL (a packed ViT, no CLS): the official FlowCut_Qwen rule runs instead (``vision.packed_flowcut``: the
image's mean query, single patches, 4 consecutive kept patches merged), budget in LLM tokens per image;
``flowcut_qwen`` (``_33`` / ``_11``) is its official two-stage pipeline with ``flowcut_llm``.
Positions default to ``repack`` (LLaVA's contiguous re-numbering in the official code). On LLaVA-NeXT
the kept patches then go through the model's own unpadding and ``image_newline`` packing: kept tokens
in the padded border of an anyres grid leave with it (the LLM may see fewer than K per crop); the
newline tokens stay unless the stage says ``newlines=drop`` (the official code packs the kept patches without them).
"""
from __future__ import annotations

import math

import torch

from ..errors import IncompatiblePolicyError
from ..policy import register_family_preset, register_preset
from ..vision.base import VisionCriterion, tower_attention, tower_groups
from ..vision.groups import group_of_patch
from .base import register_criterion


def flow_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float):
    """``(a, score)`` ``[n, T-1]`` over the patches from one layer's q/k/v ``[n, T, D]`` (token 0 = CLS)."""
    n, T, D = q.shape
    d = D // heads
    qc = q[:, 0].float().view(n, heads, d)
    kk = k.float().view(n, T, heads, d)
    vv = v.float().view(n, T, heads, d)
    a = torch.softmax(torch.einsum("nhd,nthd->nht", qc, kk) * scale, dim=-1).mean(1)[:, 1:]
    sem = torch.softmax(torch.einsum("nhd,nthd->nht", vv[:, 0], vv), dim=-1).mean(1)[:, 1:]
    dens = vv.mean(2)[:, 1:].abs().sum(-1)
    return a, (a / a.sum(-1, keepdim=True) + sem / sem.sum(-1, keepdim=True)) * dens


def adaptive_prune_count(a: torch.Tensor, rpl: int, keep_patches: int) -> int:
    """``P``: how many tokens to drop at a pruning layer (entropy of the CLS attention; max over crops)."""
    N = a.shape[-1]
    p = a / a.sum(-1, keepdim=True)
    ratio = -(p * p.log()).sum(-1) / math.log(N)
    r = (N - keep_patches) / math.sqrt(rpl) * (1 - ratio**2)
    return int(torch.round(r.max()))


@register_criterion
class FlowCutViT(VisionCriterion):
    name = "flowcut_vit"
    needs_cls = "it scores the information flow from the CLS token's attention"
    cls_free_note = ("its official code's CLS-free rule is for Qwen2-VL's packed ViT only (flowcut_vit runs there, "
                     "vision.packed_flowcut)")
    paper = "FlowCut (vision-encoder part): CLS-attention + value-similarity flow, cumulative, entropy-adaptive"
    arxiv = "2505.19536"
    whole_groups = True  # pixel-shuffle towers (InternVL): the same schedule over whole groups (``_prune_groups``)
    prunes_in_tower = True  # on a packed tower (Qwen2-VL) the merger sees the kept patches only (``eval.flops``)

    def check_vision(self, seams, stage, where: str) -> None:
        if stage.layer is not None:
            raise IncompatiblePolicyError(
                f"{where}.layer", f"FlowCut's schedule follows the feature layer ({seams.feature_layer}); "
                "allowed: no layer")
        if seams.feature_layer < 1:
            raise IncompatiblePolicyError(
                f"{where}.site", "FlowCut prunes after encoder layers below the feature layer; this tower reads "
                "layer 0; allowed: vision_feature_layer reading layer 1 or later")
        if seams.select_strategy not in ("default", "full"):
            raise IncompatiblePolicyError(f"{where}.site", f"vision_feature_select_strategy "
                                          f"{seams.select_strategy!r}; allowed: default, full")

    def capture_layers(self, seams, stage) -> tuple[int, ...]:
        return tuple(range(seams.feature_layer))

    def before_layer(self, run, j: int, layer, hidden: torch.Tensor, seams) -> torch.Tensor:
        target = run.keep_patches + 1
        T = hidden.shape[1]
        groups = tower_groups(seams)
        g = 1 if groups is None else groups.shape[1]
        if j == 0 or (T - 1) // g <= run.keep_patches:
            return hidden
        idx = j - 1  # the layer that just ran; its q/k/v were captured
        (jq, q), (_, k), (_, v) = run.captured["q"], run.captured["k"], run.captured["v"]
        if jq != idx:
            raise RuntimeError(f"flowcut_vit: expected layer {idx}'s projections, got layer {jq}'s")
        attn = tower_attention(seams, idx)
        a, score = flow_scores(q, k, v, attn.num_heads, attn.scale)
        cum = run.scratch.get("cum")
        cum = score if cum is None else 0.5 * cum + 0.5 * score
        run.scratch["cum"] = cum
        rpl = seams.feature_layer - idx - 1
        if rpl < 0 or rpl % 2:
            return hidden
        if groups is not None:
            return self._prune_groups(run, hidden, a, cum, rpl, groups)
        drop = adaptive_prune_count(a, rpl, run.keep_patches) if rpl else T
        kept = max(T - drop, target)
        top = torch.sort(cum, dim=1, descending=True, stable=True).indices[:, : kept - 1].sort(dim=1).values
        run.scratch["cum"] = torch.gather(cum, 1, top)
        n = hidden.shape[0]
        sel = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=top.device), top + 1], dim=1)
        to = torch.full((n, T), -1, dtype=torch.long, device=sel.device)
        to.scatter_(1, sel, torch.arange(kept, device=sel.device).expand(n, kept))
        run.reassign(to, torch.gather(run.ident, 1, sel), torch.gather(run.size, 1, sel))
        return torch.gather(hidden, 1, sel.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))

    @staticmethod
    def _prune_groups(run, hidden: torch.Tensor, a: torch.Tensor, cum: torch.Tensor, rpl: int,
                      groups: torch.Tensor) -> torch.Tensor:
        """InternVL: the pruning step over whole pixel-shuffle groups. A group's CLS attention and ``S_cum`` are the
        SUMS over its patches; ``N`` (the entropy's and the count's) counts the current groups, ``K`` the target
        groups; the top groups by summed ``S_cum`` (ties to the lower group) keep all their patches, in order."""
        n, T = hidden.shape[:2]
        g = groups.shape[1]
        dev = cum.device
        tok_group = group_of_patch(groups.to(dev))[run.ident[:, 1:].to(dev) - 1]  # [n, T-1]: each patch's group
        cur = tok_group.sort(dim=1).values[:, ::g].contiguous()  # [n, U]: the current groups, ascending
        slot = torch.searchsorted(cur, tok_group)  # [n, T-1]: each patch's group among them
        U = cur.shape[1]
        ag = torch.zeros(n, U, device=dev).scatter_add_(1, slot, a.float())
        cg = torch.zeros(n, U, device=dev).scatter_add_(1, slot, cum.float())
        drop = adaptive_prune_count(ag, rpl, run.keep_patches) if rpl else U
        kept = max(U - drop, run.keep_patches)
        top = torch.sort(cg, dim=1, descending=True, stable=True).indices[:, :kept]
        keep = torch.gather(torch.zeros(n, U, dtype=torch.bool, device=dev).scatter(1, top, True), 1, slot)
        idx = keep.nonzero()[:, 1].view(n, -1)  # kept patch tokens, in their order
        run.scratch["cum"] = torch.gather(cum, 1, idx)
        sel = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=dev), idx + 1], dim=1)
        K = sel.shape[1]
        to = torch.full((n, T), -1, dtype=torch.long, device=dev)
        to.scatter_(1, sel, torch.arange(K, device=dev).expand(n, K))
        run.reassign(to, torch.gather(run.ident, 1, sel), torch.gather(run.size, 1, sel))
        return torch.gather(hidden, 1, sel.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))


# LLaVA-NeXT as the official code does it (``flowcut/main.py``, ``llava_arch.py``, ``modeling_llama_flowcut.py``) for
# a target T: T / 2 patches per crop in the tower, the kept patches packed WITHOUT image_newline tokens
# (``newlines=drop``), then ``flowcut_llm`` after decoder layer 1 keeps T of however many arrive (an absolute count;
# a row with at most T keeps them all) and renumbers the kept tokens contiguously (``positions=repack``)
for _name, _t in (("flowcut_next", 320), ("flowcut_next_640", 640), ("flowcut_next_160", 160)):
    register_preset(_name, [
        {"criterion": "flowcut_vit", "site": "vision", "keep": _t / 2 / 576, "positions": "repack", "newlines": "drop"},
        {"criterion": "flowcut_llm", "layer": 2, "tokens": _t, "positions": "repack"},
    ], f"FlowCut on LLaVA-NeXT as officially coded, target {_t}: {_t // 2} of 576 patches per crop in the CLIP tower, "
       f"no image_newline tokens, then flowcut_llm at layer 2 keeps {_t} tokens, renumbered contiguously", "2505.19536")
# the library's earlier reading of the NeXT pipeline: newlines kept (the LLM stage may select them), the LLM stage keeps
# a fraction (320 / 2880) of the ORIGINAL visual tokens, kept tokens keep their original position ids there
register_preset("flowcut_next_fraction", [
    {"criterion": "flowcut_vit", "site": "vision", "keep": 160 / 576, "positions": "repack"},
    {"criterion": "flowcut_llm", "layer": 2, "keep": 320 / 2880},
], "FlowCut on LLaVA-NeXT, the library's reading: 160 of 576 patches per crop in the CLIP tower (image_newline tokens "
   "kept), then flowcut_llm at layer 2 to 320 / 2880 of the original visual tokens, original position ids",
    "2505.19536")

_DOC = "FlowCut in the CLIP tower: prune every 2 layers up to the feature layer, entropy-adaptive, to {} of 576 patches"
for _name, _n in (("flowcut_vit", 128), ("flowcut_vit_192", 192), ("flowcut_vit_64", 64)):
    register_preset(_name, [{"criterion": "flowcut_vit", "site": "vision", "keep": _n / 576, "positions": "repack"}],
                    _DOC.format(_n), "2505.19536")

# Qwen2-VL as the official FlowCut_Qwen code does it, for a retain ratio R of each image's LLM tokens: 2 R in the
# packed ViT (``vision.packed_flowcut``: single patches, 4 consecutive kept patches merged, the image's first
# placeholders' positions), then ``flowcut_llm`` after decoder layer 1 keeps R of the original at their positions
for _name, _r, _what in (("flowcut_qwen", 2 / 9, "22.2 %"), ("flowcut_qwen_33", 3 / 9, "33.3 %"),
                         ("flowcut_qwen_11", 1 / 9, "11.1 %")):
    register_preset(_name, [
        {"criterion": "flowcut_vit", "site": "vision", "keep": 2 * _r, "positions": "gaps"},
        {"criterion": "flowcut_llm", "layer": 2, "keep": _r, "positions": "gaps"},
    ], f"FlowCut on Qwen2-VL as officially coded, retain {_what}: twice that in the ViT (single patches, 4 consecutive "
       f"kept patches per token, at the image's first placeholders), then flowcut_llm at layer 2 keeps {_what} of the "
       "original visual tokens at their positions", "2505.19536")

# FlowCut by its paper's name: the setting the paper (and its code) uses for each model family, picked by patch()
register_family_preset("flowcut", {"llava": "flowcut_vit", "llava_next": "flowcut_next", "qwen2_vl": "flowcut_qwen",
                                   "qwen2_5_vl": "flowcut_llm"},
                       "FlowCut, the paper's setting for the model's family (chosen by patch()): LLaVA-1.5 flowcut_vit "
                       "(128 of 576 in the CLIP tower), LLaVA-NeXT flowcut_next (160 per crop, no newlines, then 320 "
                       "tokens at LLM layer 2, renumbered), Qwen2-VL flowcut_qwen (the official Qwen code: 44.4 % in "
                       "the ViT, then 22.2 % at LLM layer 2), Qwen2.5-VL flowcut_llm (its LLM stage, -77.8 %: FlowCut's "
                       "in-tower stage is not mapped on its windowed ViT); without a model: flowcut_vit",
                       "2505.19536")
