"""Attention rows for chosen queries, computed from a decoder layer's own modules.

SDPA and flash-attention return no attention weights, and a criterion needs only a few
rows of them. ``attention_rows`` rebuilds exactly those rows from the layer's
``input_layernorm``, ``q_proj``/``k_proj`` (only on the rows and keys needed), optional
``q_norm``/``k_norm``, RoPE from the layer's incoming ``(cos, sin)``, ``scaling`` and GQA
grouping. Memory is O(B * H * R * L) (O(B * H * R + B * L) for the reduced scores of the
Triton kernel), never L x L. Logits and softmax are computed in fp32 (scores decide
discrete selections, so bf16 rounding must not flip them).
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .reference_ops import gather_rows


def project_heads(attn: nn.Module, which: str, x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """``x`` [B, T, D] through the layer's own ``{which}_proj`` (and ``{which}_norm``) -> [B, heads, T, d]."""
    out = getattr(attn, f"{which}_proj")(x).view(*x.shape[:-1], n_heads, head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        out = norm(out)
    return out.transpose(1, 2)  # [B, heads, T, d]


def project_keys(attn, x, keys, idx, n_kv, head_dim):
    """Keys [B, H_kv, T, d] before RoPE: from the captured ``k_proj`` output ``keys`` when given, else projected."""
    if keys is None:
        return project_heads(attn, "k", x if idx is None else gather_rows(x, idx), n_kv, head_dim)
    k = keys if idx is None else gather_rows(keys, idx)
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
    reduce: str = "none",
    query_ok: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Post-softmax attention of query rows over chosen keys, per head or reduced.

    The projections run here; RoPE, logits, softmax and the reduction run in
    ``ops.attention_scores`` (PyTorch reference, or the streaming Triton kernel).

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
        reduce: ``"none"`` (per head and row), ``"mean"`` / ``"max"`` over heads and ``query_ok`` rows.
        query_ok: ``[B, R]`` real query rows for the reduction (None: all).
        row_keys: ``[B, R, L]`` bool, the keys each query row may attend when the layer's own mask rows are not
            causal (Gemma 3: ``ScoringContext.layer_mask``); replaces the causal rule, and-ed with ``seq_valid`` (both backends).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (``ops``).

    Returns:
        ``[B, H, R, N]`` (``reduce="none"``) or ``[B, N]`` float32 probabilities; 0 at invalid keys.
    """
    if softmax_over not in ("row", "keys"):
        raise ValueError(f"softmax_over must be 'row' or 'keys', got {softmax_over!r}")
    attn = layer.self_attn
    head_dim = attn.head_dim
    n_heads = attn.q_proj.out_features // head_dim
    n_kv = attn.k_proj.out_features // head_dim
    if keys is None:
        x = layer.input_layernorm(hidden)
        q = project_heads(attn, "q", gather_rows(x, query_idx), n_heads, head_dim)
    else:  # only the query rows need the norm
        x = None
        q = project_heads(attn, "q", layer.input_layernorm(gather_rows(hidden, query_idx)), n_heads, head_dim)
    if softmax_over == "row":  # every key of the row is in the softmax; the visual ones are returned
        k = project_keys(attn, x, keys, None, n_kv, head_dim)
        k_idx, k_valid, subset, subset_ok = None, seq_valid, key_idx, key_valid
    else:  # only the chosen keys are projected: they are the whole softmax
        k = project_keys(attn, x, keys, key_idx, n_kv, head_dim)
        k_idx, k_valid, subset, subset_ok = key_idx, key_valid, None, None
        if row_keys is not None:
            row_keys = torch.gather(row_keys, 2, key_idx[:, None, :].expand(-1, row_keys.shape[1], -1))
    cos, sin = position_embeddings if rope else (None, None)
    return ops.attention_scores(
        q, k, query_idx, k_valid, scaling=_scaling(attn), k_idx=k_idx, cos=cos, sin=sin, subset=subset,
        subset_ok=subset_ok, reduce=reduce, row_ok=query_ok, row_keys=row_keys, backend=backend,
    )


def _scaling(attn: nn.Module) -> float:
    """The attention module's logit scale; transformers < 4.48 modules (the original LLaVA's 4.36) have no
    ``scaling`` attribute and divide the logits by sqrt(head_dim)."""
    scaling = getattr(attn, "scaling", None)
    return attn.head_dim ** -0.5 if scaling is None else scaling
