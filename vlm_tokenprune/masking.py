"""Shrinking a layer's incoming attention mask to the kept tokens.

Every decoder layer receives the mask built once for the full-length prompt. After a
prune, each later layer gathers ITS OWN mask with the kept original positions:
rows and columns in prefill, columns only while decoding (new tokens keep their rows).
Slots that pad a row to the batch's longest row are masked as keys; as queries they see
only themselves so no softmax row is empty.

Formats (see ``Seams.mask_format``): ``bool4d`` (sdpa; True = attend), ``float4d`` (eager;
0 / dtype min), ``2d`` (flash-attention padding mask, ``[B, kv]``).
"""
from __future__ import annotations

import torch


def _causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    return (torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None])[None, None]  # [1, 1, Q, KV]


def shrink_mask(
    mask: torch.Tensor | None,
    fmt: str,
    kept: torch.Tensor,
    kept_ok: torch.Tensor,
    prompt_len: int,
    q_len: int,
    kv_len: int,
    prefill: bool,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The mask for a layer whose cache/sequence holds only ``kept`` of the prompt.

    Args:
        mask: the layer's incoming mask for the full sequence (or None).
        kept: ``[B, M]`` original prompt positions kept at this layer; ``kept_ok`` marks real slots.
        prompt_len: length of the original prompt L; columns ``>= L`` are tokens after it.
        q_len, kv_len: query length and key length of the INCOMING (unpruned) geometry.
        prefill: the queries are the prompt itself (rows are gathered too).
    """
    B, M = kept.shape
    device = kept.device
    all_ok = bool(kept_ok.all())
    if mask is None and all_ok:
        return None  # plain causal over the kept sequence, no padding: backends need no mask
    tail = torch.arange(prompt_len, kv_len, device=device).expand(B, -1)
    cols = torch.cat([kept, tail], dim=1)
    cols_ok = torch.cat([kept_ok, torch.ones_like(tail, dtype=torch.bool)], dim=1)

    if fmt == "2d":
        base = torch.ones(B, kv_len, dtype=torch.bool, device=device) if mask is None else mask
        out = torch.gather(base.expand(B, -1), 1, cols)
        return out.masked_fill(~cols_ok, 0)

    if mask is None:
        allowed = _causal(q_len, kv_len, device).expand(B, 1, q_len, kv_len)
        float_mask = False
    else:
        allowed = mask.expand(B, *mask.shape[1:])
        float_mask = allowed.dtype.is_floating_point
    if prefill:
        allowed = torch.gather(allowed, 2, kept[:, None, :, None].expand(B, allowed.shape[1], M, allowed.shape[3]))
    Q = allowed.shape[2]
    allowed = torch.gather(allowed, 3, cols[:, None, None, :].expand(B, allowed.shape[1], Q, cols.shape[1]))
    if float_mask:
        neg = torch.finfo(allowed.dtype).min
        allowed = allowed.masked_fill(~cols_ok[:, None, None, :], neg)
    else:
        allowed = allowed & cols_ok[:, None, None, :]
    if prefill and not all_ok:  # padding slots attend to themselves only
        diag = torch.eye(M, cols.shape[1], dtype=torch.bool, device=device)[None, None] & ~kept_ok[:, None, :, None]
        allowed = allowed.masked_fill(diag, 0.0 if float_mask else True)
    if fmt == "float4d" and not float_mask:
        neg = torch.finfo(dtype).min
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, neg)
    return allowed


def allowed_of(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """``[B, Q, KV]`` bool (True = may attend) of a layer's 4-D mask ``[B or 1, 1, Q, KV]`` (``bool4d``: True =
    attend; ``float4d``: 0 = attend); None (the backend's own causal rule) stays None."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected a 4-D mask [B, 1, Q, KV], got {tuple(mask.shape)}")
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    return allowed.expand(batch, *allowed.shape[1:])
