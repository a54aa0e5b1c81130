"""Pixel-shuffle groups: vision-site reduction at the granularity of LLM tokens (InternVL).

InternVL (arXiv 2404.16821, InternVL 3: 2504.10479) pixel-shuffles each tile's square patch grid after
InternViT: every ``(1 / downsample_ratio)^2`` block of patches (2 x 2 at 0.5) becomes ONE LLM token, the
patches' features concatenated along channels. The shuffle needs the full grid, so a vision-site stage on
such a tower keeps or merges whole GROUPS and the reduced features go back onto the full grid before the
model's own shuffle runs; the projector then sees only the kept groups' tokens.

``groups`` ``[G, g]`` (``VisionSeams.groups``): the patches (0-based, CLS excluded) each LLM token packs, in
channel-block order, found by running the model's own ``pixel_shuffle`` on index-coded features
(``adapters.internvl``). A group's score under a method's per-patch criterion is the SUM of its members'
scores; a group's feature (or key) is the concatenation of its members' in that order (the shuffled token,
so cosines between groups are those of the LLM tokens' inputs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .state import VisionRun


def group_sum(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``[n, N]`` per-patch scores -> ``[n, G]`` per-group sums (members added in channel-block order)."""
    g = groups.to(x.device)
    out = x[:, g[:, 0]]
    for m in range(1, g.shape[1]):
        out = out + x[:, g[:, m]]
    return out


def group_concat(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``[n, N, C]`` per-patch vectors -> ``[n, G, g * C]`` (members concatenated in channel-block order)."""
    n, _, C = x.shape
    G, g = groups.shape
    return x[:, groups.to(x.device)].reshape(n, G, g * C)


def group_of_patch(groups: torch.Tensor) -> torch.Tensor:
    """``[N]``: the group (LLM token) of every patch."""
    G, g = groups.shape
    out = torch.empty(G * g, dtype=torch.long, device=groups.device)
    out[groups.flatten()] = torch.arange(G, device=groups.device).repeat_interleave(g)
    return out


def widen_to_grid(run: "VisionRun", hidden: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The reduced feature-layer output ``[n, T, D]`` (CLS first) back on the full grid ``[n, 1 + N, D]``: every
    current token at its original slot (a merged token at its destination's), the dropped groups' slots zero;
    what the model's own pixel shuffle then packs. Every group must be whole (all its patches present or none)."""
    n, _, D = hidden.shape
    N = run.owner.shape[1] - 1
    ident = run.ident.to(hidden.device)
    full = hidden.new_zeros(n, N + 1, D).scatter(1, ident[..., None].expand(-1, -1, D), hidden)
    present = torch.zeros(n, N + 1, dtype=torch.bool, device=hidden.device).scatter(1, ident, True)[:, 1:]
    per_group = present[:, groups.to(hidden.device)]  # [n, G, g]
    if not bool((per_group.all(-1) | ~per_group.any(-1)).all()):
        raise RuntimeError(f"vision criterion {run.stage.criterion!r} kept part of a pixel-shuffle group; on this "
                           "tower a vision stage keeps whole groups")
    return full


def to_groups(run: "VisionRun", groups: torch.Tensor) -> torch.Tensor:
    """Move the run's bookkeeping from patches to LLM tokens (groups) and return the kept groups ``[n, K]``
    (ascending, the raster order of the tile's LLM tokens): ``ident`` becomes ``0`` (CLS) + ``1 + group``,
    ``owner`` ``[n, 1 + G]`` the current slot of the group each original group lives in (-1: dropped),
    ``size`` the original groups per kept group."""
    dev = run.ident.device
    grp = groups.to(dev)
    n = run.ident.shape[0]
    G, g = grp.shape
    gop = group_of_patch(grp)
    present = torch.zeros(n, G * g + 1, dtype=torch.bool, device=dev).scatter(1, run.ident, True)[:, 1:]
    keep = present[:, grp[:, 0]]  # [n, G]
    K = keep.sum(1)
    if not bool((K == K[0]).all()):
        raise RuntimeError("every crop must keep the same number of pixel-shuffle groups")
    kept = keep.nonzero()[:, 1].view(n, int(K[0]))
    slot = torch.full((n, G), -1, dtype=torch.long, device=dev).scatter(
        1, kept, torch.arange(kept.shape[1], device=dev).expand(n, -1))
    cur = run.owner[:, 1 + grp]  # [n, G, g]: current token of every member
    rep = torch.where(cur >= 0, torch.gather(run.ident, 1, cur.clamp(min=0).view(n, -1)).view(n, G, g) - 1, -1)
    rep_group = torch.where(rep >= 0, gop[rep.clamp(min=0)], -1)
    if not bool((rep_group == rep_group[..., :1]).all()):
        raise RuntimeError(f"vision criterion {run.stage.criterion!r} split a pixel-shuffle group over several "
                           "tokens; on this tower a vision stage keeps or merges whole groups")
    rg = rep_group[..., 0]
    owner = torch.where(rg >= 0, torch.gather(slot, 1, rg.clamp(min=0)) + 1, -1)
    zero = torch.zeros(n, 1, dtype=torch.long, device=dev)
    run.owner = torch.cat([zero, owner], dim=1)
    run.ident = torch.cat([zero, kept + 1], dim=1)
    run.size = torch.zeros(n, kept.shape[1] + 1, device=dev).scatter_add_(
        1, run.owner.clamp(min=0), (run.owner >= 0).float())
    return kept
