"""Pure selection functions on scores. Ties go to the lower position; kept indices are sorted."""
from __future__ import annotations

import torch


def topk_per_row(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k[b]`` valid entries of each row, returned in ascending index order.

    Args:
        scores: ``[B, N]``, higher = keep. valid: ``[B, N]`` bool. k: ``[B]`` long, ``k[b] <= valid[b].sum()``.
    Returns:
        ``(idx [B, K], ok [B, K])`` with ``K = max(k)``; row b's first ``k[b]`` entries are its kept
        indices in ascending order, the rest are padding (``ok`` False, index 0).
    """
    B, N = scores.shape
    K = int(k.max()) if B else 0
    if K == 0:
        return scores.new_zeros((B, 0), dtype=torch.long), torch.zeros((B, 0), dtype=torch.bool, device=scores.device)
    s = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :K]  # stable: ties keep lower index first
    ok = torch.arange(K, device=scores.device)[None, :] < k[:, None]
    chosen = torch.where(ok, order, torch.full_like(order, N))
    chosen = torch.sort(chosen, dim=1).values
    return torch.where(ok, chosen, torch.zeros_like(chosen)), ok


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
