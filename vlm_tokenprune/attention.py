"""Attention rows for chosen queries, computed from a decoder layer's own modules.

SDPA and flash-attention return no attention weights, and a criterion needs only a few
rows of them. ``attention_rows`` rebuilds exactly those rows from the layer's
``input_layernorm``, ``q_proj``/``k_proj`` (only on the rows and keys needed), optional
``q_norm``/``k_norm``, RoPE from the layer's incoming ``(cos, sin)``, ``scaling`` and GQA
grouping. Memory is O(B * H * R * L), never L x L. Logits and softmax are computed in
fp32 (scores decide discrete selections, so bf16 rounding must not flip them).
"""
from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, d]; cos/sin: [B, T, d] (already gathered at x's positions)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, L, ...] -> [B, R, ...] at idx [B, R]."""
    if x.shape[0] == 1 and idx.shape[0] > 1:
        x = x.expand(idx.shape[0], *x.shape[1:])
    return torch.gather(x, 1, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def _project(attn: nn.Module, which: str, x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    out = getattr(attn, f"{which}_proj")(x).view(*x.shape[:-1], n_heads, head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        out = norm(out)
    return out.transpose(1, 2)  # [B, heads, T, d]


def _keys(attn, x, keys, idx, n_kv, head_dim):
    if keys is None:
        return _project(attn, "k", x if idx is None else _gather_rows(x, idx), n_kv, head_dim)
    k = keys if idx is None else _gather_rows(keys, idx)
    k = k.view(*k.shape[:-1], n_kv, head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    return k.transpose(1, 2)


def attention_rows(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    query_idx: torch.Tensor,
    key_idx: torch.Tensor,
    key_valid: torch.Tensor,
    seq_valid: torch.Tensor,
    *,
    rope: bool = True,
    softmax_over: str = "row",
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-softmax attention of query rows over chosen keys, per head.

    Args:
        layer: a Llama-style decoder layer (``input_layernorm``, ``self_attn.{q,k}_proj``).
        hidden: ``[B, L, D]`` hidden states entering ``layer``.
        position_embeddings: ``(cos, sin)`` of shape ``[B or 1, L, d]`` as the layer receives them.
        query_idx: ``[B, R]`` query positions in the current sequence.
        key_idx: ``[B, N]`` key positions whose attention is returned; ``key_valid`` ``[B, N]``.
        seq_valid: ``[B, L]`` tokens that may be attended (not padding, not a dropped slot).
        rope: apply RoPE to q and k (FastV) or not (FEATHER).
        softmax_over: ``"row"`` normalises over the whole causal row, exactly like the
            model's attention; ``"keys"`` normalises over the chosen keys only.
        keys: optional ``[B, L, H_kv * d]`` output of the layer's own ``k_proj`` on ``hidden``
            (captured while the layer ran), so keys are not projected a second time.

    Returns:
        ``[B, H, R, N]`` float32 probabilities; 0 at invalid keys.
    """
    if softmax_over not in ("row", "keys"):
        raise ValueError(f"softmax_over must be 'row' or 'keys', got {softmax_over!r}")
    attn = layer.self_attn
    head_dim = attn.head_dim
    n_heads = attn.q_proj.out_features // head_dim
    n_kv = attn.k_proj.out_features // head_dim
    B, L = hidden.shape[:2]
    if keys is None:
        x = layer.input_layernorm(hidden)
        q = _project(attn, "q", _gather_rows(x, query_idx), n_heads, head_dim)
    else:  # only the query rows need the norm
        x = None
        q = _project(attn, "q", layer.input_layernorm(_gather_rows(hidden, query_idx)), n_heads, head_dim)
    if softmax_over == "row":
        k_pos = torch.arange(L, device=hidden.device).expand(B, L)
        k = _keys(attn, x, keys, None, n_kv, head_dim)
    else:
        k_pos = key_idx
        k = _keys(attn, x, keys, key_idx, n_kv, head_dim)
    if rope:
        cos, sin = position_embeddings
        q = _rope(q, _gather_rows(cos, query_idx), _gather_rows(sin, query_idx))
        k = _rope(k, _gather_rows(cos, k_pos), _gather_rows(sin, k_pos))

    q = q.float().view(B, n_kv, n_heads // n_kv, q.shape[2], head_dim)
    k = k.float()[:, :, None]  # [B, H_kv, 1, T, d]: GQA by broadcasting, no repeat
    logits = (q @ k.transpose(-1, -2)) * attn.scaling  # [B, H_kv, G, R, T]
    logits = logits.reshape(B, n_heads, query_idx.shape[1], k_pos.shape[1])

    if softmax_over == "row":
        allowed = seq_valid[:, None, :] & (k_pos[:, None, :] <= query_idx[:, :, None])  # [B, R, L]
    else:
        allowed = key_valid[:, None, :] & (k_pos[:, None, :] <= query_idx[:, :, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    if softmax_over == "row":
        probs = torch.gather(probs, 3, key_idx[:, None, None, :].expand(B, n_heads, query_idx.shape[1], -1))
    return probs * key_valid[:, None, None, :]
