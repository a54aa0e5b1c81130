"""Pure selection functions on scores and grids. Ties go to the lower position; kept indices are sorted."""
from __future__ import annotations

from typing import Any

import torch

from . import ops


def topk_per_row(
    scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, *, backend: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k[b]`` valid entries of each row, returned in ascending index order.

    Args:
        scores: ``[B, N]``, higher = keep. valid: ``[B, N]`` bool. k: ``[B]`` long, ``k[b] <= valid[b].sum()``.
        backend: ``ops`` backend (``"torch"``: the PyTorch reference; criteria use ``ctx.topk``,
            which follows the patch's backend).
    Returns:
        ``(idx [B, K], ok [B, K])`` with ``K = max(k)``; row b's first ``k[b]`` entries are its kept
        indices in ascending order, the rest are padding (``ok`` False, index 0).
    """
    return ops.topk(scores, valid, k, backend=backend)


def right_packed(mask: torch.Tensor, values: torch.Tensor | None = None,
                 width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``mask`` [B, N] holds, ascending, padded on the right: ``(out [B, K], ok [B, K])``.

    ``out`` holds the indices (or, given ``values`` [B, N], those entries of ``values``); padding slots have
    ``ok`` False and 0. ``K`` = the longest row's count unless ``width`` is given. What a criterion's
    ``select`` returns for a kept set of any size; the engine packs positions with it too.
    """
    counts = mask.sum(1)
    K = width if width is not None else (int(counts.max()) if mask.shape[0] else 0)
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :K]
    ok = torch.arange(K, device=mask.device)[None, :] < counts[:, None]
    out = order if values is None else torch.gather(values, 1, order)
    return out.masked_fill(~ok, 0), ok


def left_packed(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``keep_mask`` [B, L] is True, in order, left-padded to the longest row.

    Returns ``(idx [B, M], ok [B, M])``. Padding slots sit on the LEFT so the last real token
    stays last (generation reads logits[:, -1]); they point at the row's first kept position.
    """
    B, L = keep_mask.shape
    counts = keep_mask.sum(1)
    M = int(counts.max()) if B else 0
    order = torch.sort((~keep_mask).to(torch.uint8), dim=1, stable=True).indices  # kept positions first, ascending
    slot = torch.arange(M, device=keep_mask.device)[None, :]
    src = slot - (M - counts)[:, None]
    ok = src >= 0
    idx = torch.gather(order, 1, src.clamp(min=0))
    return idx, ok


def stride_grid(ctx: Any, stride: int) -> torch.Tensor:
    """``[B, N]`` bool: visual tokens on the ``stride`` grid of their own patch grid (segment) (FEATHER's uniform
    grid, ATP-LLaVA's spatial score); ``ctx``: a ``ScoringContext`` (or anything with its ``visual_ok``, ``row``,
    ``col``, ``segment``, ``is_newline``).

    A token at ``(row, col)`` of segment ``s`` is on the grid when ``(row - r0) % stride == 0``
    and ``(col - c0) % stride == 0``, with ``(r0, c0)`` the smallest row / column present in
    ``s``. Tokens without grid coordinates (``image_newline``, CLS: row or col < 0) never are.
    """
    ok = ctx.visual_ok
    spatial = ok & (ctx.row >= 0) & (ctx.col >= 0) & ~ctx.is_newline
    B, N = ok.shape
    big = torch.iinfo(torch.long).max
    seg = ctx.segment.masked_fill(~spatial, 0).clamp(min=0)
    n_seg = int(seg.max()) + 1 if N else 1
    # per (row, segment): min row / col over its spatial tokens
    r0 = torch.full((B, n_seg), big, dtype=torch.long, device=ok.device)
    c0 = torch.full((B, n_seg), big, dtype=torch.long, device=ok.device)
    r0.scatter_reduce_(1, seg, ctx.row.masked_fill(~spatial, big), reduce="amin")
    c0.scatter_reduce_(1, seg, ctx.col.masked_fill(~spatial, big), reduce="amin")
    dr = ctx.row - torch.gather(r0, 1, seg)
    dc = ctx.col - torch.gather(c0, 1, seg)
    return spatial & (dr % stride == 0) & (dc % stride == 0)
