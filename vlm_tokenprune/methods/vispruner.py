"""VisPruner: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(Zhang et al., ICCV 2025), arXiv 2412.01818; official ``Theia-4869/VisPruner`` (``llava_arch.py: encode_images``).

Text-agnostic, at the vision tower's feature layer ``F`` (the layer LLaVA reads; 22 of 24), per crop,
with a budget of ``T`` patches and ``important_ratio`` ``r``:

1. ``T_imp = int(T * r)`` important tokens: the patches the CLS query attends to most at layer ``F``
   (post-softmax over every token, mean over heads; ties to the lower index). The other patches form
   the residual list ``R`` in that descending order.
2. ``T_div = T - T_imp`` diverse tokens from ``R``, on the L2-normalised features of layer ``F``'s
   output: while ``T_div > 0`` and ``s = min(8, |R| - T_div) > 0``, split ``R`` by parity of position
   (``a = R[0::2]``, ``b = R[1::2]``), score each ``a`` token by its highest cosine similarity to a
   ``b`` token, drop the ``s`` highest-scoring ``a`` tokens and continue with ``R = [the other a
   tokens in descending-score order] + b`` (the order matters: the next round splits by parity
   again). With ``T_div = 0`` only the important tokens stay.
3. Kept = important + ``R`` in their original spatial order; the language model sees them with the
   positions of the stage (``repack``: contiguous, as LLaVA's splice).

InternVL (pixel-shuffle groups, ``vision.groups``): the same steps over LLM tokens; a group's CLS attention
is the SUM of its patches' (head-mean) attention, its feature the concatenation of its patches' features
(the shuffled token), ``T`` counts groups per tile, and kept groups keep all their patches.

Towers without CLS (SigLIP of Gemma 3; ``VisionSeams.cls_token`` False): the official code's SigLIP variant
(``siglip_encoder.py``): importance = the post-softmax attention each patch RECEIVES at the last encoder layer
(the feature layer Gemma 3 reads), averaged over all queries, then over heads; the rest as above. Gemma 3 pools
each 4 x 4 window of patches into one LLM token, so the units are the pooling windows (groups): a window's
importance is the SUM of its patches', its feature their concatenation (members in raster order), ``T`` counts
LLM tokens per image.

LLaVA-OneVision (SigLIP, no pooling: every patch its own LLM token): the same SigLIP rule on single patches per crop
(the base image and each anyres crop; ``T`` counts patches per crop); the stage marks the dropped patches and the
model's own projector and ``pack_image_features`` run on all of them (``VisionSeams.mask_only``); an image that
``anyres_max_N`` resizes keeps all its tokens (its packed tokens mix patches; ``adapters/llava_onevision.py``).

Qwen3-VL, Qwen2-VL, Qwen2.5-VL (a library extension, ``vision.packed``): the same SigLIP rule on Qwen's packed ViT
(Qwen2.5-VL's window order of the units mapped back to placeholder order): importance = the
last block's attention each patch receives within its image (the block's own q / k and 2-D rotary), mean over
queries then heads; units = the merger's 2 x 2 groups (one LLM token each: summed importance, concatenated
last-block outputs); ``T`` counts LLM tokens per image; Qwen3-VL's DeepStack features follow the kept groups.

The official code splits an odd ``|R|`` into shapes that do not broadcast (it runs only with
even residual counts, e.g. 576 - 64); here ``a`` simply has one more token. Presets: ``vispruner``
keeps 128 of 576 (``r = 0.5``, the README's 64 + 64), ``vispruner_64`` 64 (``r = 0.75``, 48 + 16),
``vispruner_192`` 192 (``r = 0.5``); as fractions they scale to any tower.
"""
from __future__ import annotations

import torch

from ..errors import IncompatiblePolicyError
from ..policy import register_preset
from ..vision.base import VisionCriterion, tower_attention, tower_groups
from ..vision.groups import group_concat, group_sum
from .base import Param, register_criterion


def _feature_layer_qk(run, seams) -> tuple:
    """The feature layer's captured q / k projections ``[n, T, D]`` and its attention module."""
    (jq, q), (jk, k) = run.captured["q"], run.captured["k"]
    if jq != seams.feature_layer or jk != seams.feature_layer:
        raise RuntimeError(f"expected the feature layer's ({seams.feature_layer}) projections, got layers {jq}/{jk}")
    return q, k, tower_attention(seams, seams.feature_layer)


def feature_layer_cls_attention(run, seams) -> torch.Tensor:
    """``[n, H, T]`` post-softmax attention of the CLS query over every token at the feature layer (fp32),
    from that layer's captured q/k projections."""
    q, k, attn = _feature_layer_qk(run, seams)
    n, T, D = q.shape
    H = attn.num_heads
    qc = q[:, 0].float().view(n, H, D // H)
    kk = k.float().view(n, T, H, D // H)
    return torch.softmax(torch.einsum("nhd,nthd->nht", qc, kk) * attn.scale, dim=-1)


def feature_layer_received_attention(run, seams) -> torch.Tensor:
    """``[n, N]``: the official SigLIP variant's importance, for towers without CLS (every captured token a patch):
    the feature layer's post-softmax attention each token receives, mean over the queries, then over the heads
    (fp32; one head at a time, an ``N x N`` matrix each)."""
    q, k, attn = _feature_layer_qk(run, seams)
    n, N, D = q.shape
    H = attn.num_heads
    qh, kh = q.float().view(n, N, H, D // H), k.float().view(n, N, H, D // H)
    out = torch.zeros(n, N, dtype=torch.float32, device=q.device)
    for h in range(H):
        a = torch.softmax(torch.einsum("nqd,nkd->nqk", qh[:, :, h], kh[:, :, h]) * attn.scale, dim=-1)
        out += a.mean(1)
    return out / H


def keep_tokens(run, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep CLS and the patches where ``keep`` ``[n, T-1]`` is True (same count per crop), in order; record it."""
    n, T = hidden.shape[:2]
    idx = keep.nonzero()[:, 1].view(n, -1) + 1
    sel = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=idx.device), idx], dim=1)
    K = sel.shape[1]
    to = torch.full((n, T), -1, dtype=torch.long, device=sel.device)
    to.scatter_(1, sel, torch.arange(K, device=sel.device).expand(n, K))
    run.reassign(to, torch.gather(run.ident, 1, sel), torch.gather(run.size, 1, sel))
    return torch.gather(hidden, 1, sel.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))


def remove_duplicates(feats: torch.Tensor, residual: list[int], n_div: int) -> list[int]:
    """VisPruner's iterative duplicate removal: ``residual`` (indices into ``feats`` [N, C], normalised)
    shrunk to ``n_div`` tokens, at most 8 per round."""
    R = list(residual)
    while n_div > 0:
        s = min(8, len(R) - n_div)
        if s <= 0:
            break
        a, b = R[0::2], R[1::2]
        score = (feats[a] @ feats[b].T).max(dim=-1).values
        order = torch.sort(score, descending=True, stable=True).indices.tolist()
        R = [a[i] for i in order[s:]] + b
    return R if n_div > 0 else []


def select_patches(cls_attn: torch.Tensor, feats: torch.Tensor, budget: int, important_ratio: float) -> list[int]:
    """Kept patch indices (unsorted: important first) of one crop from its CLS attention ``[N]`` (mean over
    heads) and its L2-normalised features ``[N, C]``."""
    n_imp = int(budget * important_ratio)
    order = torch.sort(cls_attn, descending=True, stable=True).indices.tolist()
    return order[:n_imp] + remove_duplicates(feats, order[n_imp:], budget - n_imp)


@register_criterion
class VisPrunerCriterion(VisionCriterion):
    name = "vispruner"
    needs_cls = "its important tokens are ranked by the CLS token's attention at the feature layer"
    cls_free = True  # the official SigLIP variant: the mean attention each patch receives at the last layer
    paper = "VisPruner: important tokens by CLS attention + diverse tokens by duplicate removal (vision feature layer)"
    arxiv = "2412.01818"
    image_only_fixed_count = True  # each crop keeps its budget, chosen from that crop alone
    whole_groups = True  # pixel-shuffle towers (InternVL): the same selection over groups (summed attention)
    params = {
        "important_ratio": Param(0.5, float, "share of the budget taken by CLS attention (the rest: diverse tokens)",
                                 check=lambda v: 0.0 <= v <= 1.0, allowed="a number in [0, 1]"),
    }

    def select_units(self, importance: torch.Tensor, feats: torch.Tensor, budget: int, params: dict) -> list[int]:
        """Packed towers (Qwen3-VL, ``vision.packed``): kept units of one image from their importance ``[G]`` and
        L2-normalised features ``[G, C]`` (the same steps as per crop)."""
        return select_patches(importance, feats, budget, params.get("important_ratio", 0.5))

    def check_vision(self, seams, stage, where: str) -> None:
        if seams.select_strategy not in ("default", "full"):
            raise IncompatiblePolicyError(f"{where}.site", f"vision_feature_select_strategy {seams.select_strategy!r}; "
                                          "allowed: default, full")

    def capture_layers(self, seams, stage) -> tuple[int, ...]:
        return (seams.feature_layer,)

    def after_feature_layer(self, run, hidden: torch.Tensor, seams) -> torch.Tensor:
        n, T = hidden.shape[:2]
        N = T - 1
        groups = tower_groups(seams)
        units = N if groups is None else groups.shape[0]  # what the budget counts: patches or LLM tokens
        budget = min(run.keep_patches, units)
        if budget >= units:
            return hidden
        if getattr(seams, "cls_token", True):
            a = feature_layer_cls_attention(run, seams).mean(1)[:, 1:]  # [n, N]
        else:  # SigLIP (official SigLIP variant): attention received, mean over queries then heads
            a = feature_layer_received_attention(run, seams)
        feats = hidden[:, 1:].float()  # a tower without CLS: index 0 is the hooks' virtual CLS row
        if groups is not None:  # InternVL / Gemma 3: a group's attention is its patches' sum, its feature their concatenation
            a, feats = group_sum(a, groups), group_concat(feats, groups)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        keep = torch.zeros(n, N, dtype=torch.bool, device=hidden.device)
        for c in range(n):
            sel = select_patches(a[c], feats[c], budget, run.params.get("important_ratio", 0.5))
            keep[c, sel if groups is None else groups[sel].flatten().to(hidden.device)] = True
        return keep_tokens(run, hidden, keep)


_DOC = "VisPruner at the CLIP feature layer: {} of 576 patches ({} important by CLS attention + {} diverse)"
for _name, _n, _r in (("vispruner", 128, 0.5), ("vispruner_64", 64, 0.75), ("vispruner_192", 192, 0.5)):
    register_preset(_name, [{"criterion": "vispruner", "site": "vision", "keep": _n / 576, "important_ratio": _r,
                             "positions": "repack"}], _DOC.format(_n, int(_n * _r), _n - int(_n * _r)), "2412.01818")
