"""PyTorch references of the hot ops: the ``backend="torch"`` path and the kernels' test oracle.

Each function here has a Triton twin in ``kernels/`` (never in this file); ``ops.py`` picks
one. Shapes: ``B`` batch, ``H``/``H_kv`` query/key heads (GQA: ``H % H_kv == 0``), ``R``
query rows, ``Nk`` keys, ``S`` subset keys, ``L`` sequence length, ``M`` gathered tokens.

- ``attention_scores``: post-softmax attention of query rows over a key subset, fp32, per
  head or reduced over heads and rows (mean / max).
- ``topk``: per-row top-k with a per-row budget, kept indices ascending, ties to the lower index.
- ``gather_tokens`` / ``scatter_tokens`` / ``scatter_add_tokens``: token gathers and their inverses.
"""
from __future__ import annotations

from typing import Sequence

import torch

# Largest [B, H, R_chunk, Nk] logits block the reduced scores materialise at once (fp32 elements,
# 64 MiB); query rows are processed in chunks under it. A single row is never split.
SCORES_CHUNK_ELEMENTS = 1 << 24


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` -> ``[-x2, x1]`` (the Llama/NeoX rotary convention, halves not interleaved)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: ``[B, H, T, d]``; cos/sin: ``[B, T, d]`` (already gathered at x's positions)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: ``[B or 1, L, ...]`` -> ``[B, R, ...]`` at idx ``[B, R]``."""
    if x.shape[0] == 1 and idx.shape[0] > 1:
        x = x.expand(idx.shape[0], *x.shape[1:])
    return torch.gather(x, 1, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def check_scores_args(q, k, q_idx, k_valid, k_idx, cos, sin, subset, subset_ok, softmax_over, reduce, row_ok,
                      row_keys=None) -> None:
    """Shape and option checks shared by both backends (errors name the argument)."""
    if softmax_over not in ("row", "keys"):
        raise ValueError(f"softmax_over must be 'row' or 'keys', got {softmax_over!r}")
    if reduce not in ("mean", "max", "none"):
        raise ValueError(f"reduce must be 'mean', 'max' or 'none', got {reduce!r}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be [B, H, R, d] and k [B, H_kv, Nk, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, R, d = q.shape
    if k.shape[0] != B or k.shape[3] != d or H % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} (same B and d, H a multiple of H_kv)")
    Nk = k.shape[2]
    if tuple(q_idx.shape) != (B, R):
        raise ValueError(f"q_idx must be [B, R] = {(B, R)}, got {tuple(q_idx.shape)}")
    if tuple(k_valid.shape) != (B, Nk):
        raise ValueError(f"k_valid must be [B, Nk] = {(B, Nk)}, got {tuple(k_valid.shape)}")
    if k_idx is not None and tuple(k_idx.shape) != (B, Nk):
        raise ValueError(f"k_idx must be [B, Nk] = {(B, Nk)}, got {tuple(k_idx.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin go together (both None: no RoPE)")
    if cos is not None and (cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[2] != d or cos.shape != sin.shape):
        raise ValueError(f"cos/sin must be [B or 1, L, d={d}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if (subset is None) != (subset_ok is None):
        raise ValueError("subset and subset_ok go together")
    if subset is not None and (subset.dim() != 2 or subset.shape[0] != B or subset_ok.shape != subset.shape):
        raise ValueError(f"subset/subset_ok must be [B, S], got {tuple(subset.shape)} and {tuple(subset_ok.shape)}")
    if row_ok is not None and tuple(row_ok.shape) != (B, R):
        raise ValueError(f"row_ok must be [B, R] = {(B, R)}, got {tuple(row_ok.shape)}")
    if row_keys is not None and (tuple(row_keys.shape) != (B, R, Nk) or row_keys.dtype != torch.bool):
        raise ValueError(f"row_keys must be bool [B, R, Nk] = {(B, R, Nk)}, got {row_keys.dtype} {tuple(row_keys.shape)}")


def _rotated(q, k, q_idx, k_idx, cos, sin):
    """fp32 ``q [B, H_kv, G, R, d]``, ``k [B, H_kv, 1, Nk, d]`` after RoPE (in their own dtype), key positions."""
    B, H, R, d = q.shape
    n_kv, Nk = k.shape[1], k.shape[2]
    k_pos = torch.arange(Nk, device=k.device).expand(B, Nk) if k_idx is None else k_idx
    if cos is not None:
        q = rope(q, gather_rows(cos, q_idx), gather_rows(sin, q_idx))
        k = rope(k, gather_rows(cos, k_pos), gather_rows(sin, k_pos))
    q = q.float().view(B, n_kv, H // n_kv, R, d)
    k = k.float()[:, :, None]  # [B, H_kv, 1, Nk, d]: GQA by broadcasting, no repeat
    return q, k, k_pos


def _probs(q, k, q_idx, k_pos, k_valid, scaling, subset, subset_ok, row_keys=None) -> torch.Tensor:
    """``[B, H, R, S]`` probabilities of the rows of ``q`` (from ``_rotated``), softmax over every allowed
    key (causal, or ``row_keys`` [B, R, Nk] when given); 0 where not allowed."""
    B, n_kv, G, R, _ = q.shape
    H, Nk = n_kv * G, k.shape[3]
    logits = (q @ k.transpose(-1, -2)) * scaling  # [B, H_kv, G, R, Nk]
    logits = logits.reshape(B, H, R, Nk)
    rule = (k_pos[:, None, :] <= q_idx[:, :, None]) if row_keys is None else row_keys
    allowed = k_valid[:, None, :] & rule  # [B, R, Nk]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    if subset is None:
        return probs * k_valid[:, None, None, :]
    probs = torch.gather(probs, 3, subset[:, None, None, :].expand(B, H, R, -1))
    return probs * subset_ok[:, None, None, :]


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_idx: torch.Tensor,
    k_valid: torch.Tensor,
    *,
    scaling: float,
    k_idx: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    subset: torch.Tensor | None = None,
    subset_ok: torch.Tensor | None = None,
    softmax_over: str = "row",
    reduce: str = "mean",
    row_ok: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention probabilities of query rows over a key subset, in fp32.

    Args:
        q: ``[B, H, R, d]`` queries before RoPE (model dtype). k: ``[B, H_kv, Nk, d]`` keys before RoPE.
        q_idx: ``[B, R]`` sequence position of each query row (RoPE row and causal limit).
        k_valid: ``[B, Nk]`` keys that may be attended (not padding, not a dropped slot).
        scaling: logit scale (``module.scaling``).
        k_idx: ``[B, Nk]`` sequence position of each key; None: key j sits at position j.
        cos, sin: ``[B or 1, L, d]`` rotary tables indexed by sequence position; None: no RoPE.
            RoPE is applied in the tensors' own dtype (as the model does), logits in fp32.
        subset, subset_ok: ``[B, S]`` indices into the Nk keys whose probabilities are returned
            (unique where ``subset_ok``); None: every key (``S = Nk``, ``subset_ok = k_valid``).
        softmax_over: ``"row"`` normalises over every allowed key (the model's own attention row);
            ``"keys"`` over the allowed subset keys only.
        reduce: ``"none"`` -> ``[B, H, R, S]``; ``"mean"`` -> ``[B, S]`` mean over heads and
            ``row_ok`` rows (0 for a row without any); ``"max"`` -> ``[B, S]`` max over heads and rows.
        row_ok: ``[B, R]`` real query rows (None: all). Ignored by ``"none"`` (the caller masks).
        row_keys: ``[B, R, Nk]`` bool: the keys each row may attend, REPLACING the causal rule ``k <= q``
            (still and-ed with ``k_valid``): a layer whose own mask rows are not causal, e.g. Gemma 3's sliding
            window of original positions and bidirectional image block (``ScoringContext.layer_mask``).

    Returns:
        fp32 probabilities, 0 at keys that are not allowed (invalid, after the query, not in the subset).
    """
    check_scores_args(q, k, q_idx, k_valid, k_idx, cos, sin, subset, subset_ok, softmax_over, reduce, row_ok,
                      row_keys)
    if softmax_over == "keys" and subset is not None:  # the subset is the whole normaliser: keep only it
        k = torch.gather(k, 2, subset[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3]))
        pos = torch.arange(k_valid.shape[1], device=k.device).expand_as(k_valid) if k_idx is None else k_idx
        k_idx = torch.gather(pos, 1, subset)
        k_valid = torch.gather(k_valid, 1, subset) & subset_ok
        if row_keys is not None:
            row_keys = torch.gather(row_keys, 2, subset[:, None, :].expand(-1, row_keys.shape[1], -1))
        subset = subset_ok = None
    qf, kf, k_pos = _rotated(q, k, q_idx, k_idx, cos, sin)
    args = (k_pos, k_valid, scaling, subset, subset_ok)
    if reduce == "none":
        return _probs(qf, kf, q_idx, *args, row_keys)
    B, H, R = q.shape[:3]
    S = k.shape[2] if subset is None else subset.shape[1]
    chunk = max(1, SCORES_CHUNK_ELEMENTS // max(1, B * H * k.shape[2]))
    out = None
    for r0 in range(0, R, chunk):
        rows = slice(r0, r0 + chunk)
        p = _probs(qf[:, :, :, rows], kf, q_idx[:, rows], *args,
                   None if row_keys is None else row_keys[:, rows])  # [B, H, r, S]
        if row_ok is not None:
            p = p * row_ok[:, None, rows, None]
        if reduce == "mean":
            part = p.mean(dim=1).sum(dim=1)
            out = part if out is None else out + part
        else:
            part = p.amax(dim=(1, 2))
            out = part if out is None else torch.maximum(out, part)
    if out is None:  # R == 0
        return q.new_zeros((B, S), dtype=torch.float32)
    if reduce == "mean":
        n_rows = row_ok.sum(1, keepdim=True).clamp(min=1) if row_ok is not None else R
        out = out / n_rows
    return out


def topk(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k[b]`` valid entries of each row, returned in ascending index order.

    Args:
        scores: ``[B, N]``, higher = keep. valid: ``[B, N]`` bool. k: ``[B]`` long, ``k[b] <= valid[b].sum()``.
    Returns:
        ``(idx [B, K], ok [B, K])`` with ``K = max(k)``; row b's first ``k[b]`` entries are its kept
        indices in ascending order, the rest are padding (``ok`` False, index 0). Ties go to the
        lower index (a stable descending sort).
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


def token_view(t: torch.Tensor, dim: int, batch: int) -> torch.Tensor:
    """``t`` with its token axis at ``dim`` (batch axis just before it) as ``[P, B, L, W]`` (batch expanded).

    ``[B, L, D]`` (dim 1) -> ``[1, B, L, D]``; position ids ``[3, B, L]`` (dim 2) -> ``[3, B, L, 1]``.
    """
    dim = dim % t.dim()
    if dim < 1:
        raise ValueError(f"the token axis of a {t.dim()}-D tensor must have a batch axis before it, got dim={dim}")
    lead, (b, L), rest = t.shape[: dim - 1], t.shape[dim - 1 : dim + 1], t.shape[dim + 1 :]
    if b not in (1, batch):
        raise ValueError(f"batch axis of size {b} does not fit indices for batch {batch}")
    P = 1
    for s in lead:
        P *= s
    W = 1
    for s in rest:
        W *= s
    return t.reshape(P, b, L, W).expand(P, batch, L, W)


def gather_tokens(
    idx: torch.Tensor,
    tensors: Sequence[torch.Tensor | None],
    *,
    dims: Sequence[int] | None = None,
    ok: torch.Tensor | None = None,
    fill: Sequence[float | int | None] | None = None,
) -> list[torch.Tensor | None]:
    """Gather every tensor's tokens at the same ``idx`` ``[B, M]``.

    Args:
        tensors: each ``[..., B or 1, L, ...]`` with its token axis at ``dims[i]`` (default 1), e.g.
            hidden states ``[B, L, D]``, cos/sin ``[B, L, d]``, position ids ``[B, L]`` or ``[3, B, L]``
            (dim -1), a 2-D padding mask ``[B, L]``. None entries pass through.
        ok: ``[B, M]``; where False, tensor i gets ``fill[i]`` (when not None) instead of the gathered value.
    Returns:
        the gathered tensors, ``[..., B, M, ...]``, same dtypes.
    """
    B, M = idx.shape
    dims = [1] * len(tensors) if dims is None else list(dims)
    fill = [None] * len(tensors) if fill is None else list(fill)
    out: list[torch.Tensor | None] = []
    for t, dim, f in zip(tensors, dims, fill):
        if t is None:
            out.append(None)
            continue
        d = dim % t.dim()
        v = token_view(t, d, B)
        g = torch.gather(v, 2, idx[None, :, :, None].expand(v.shape[0], B, M, v.shape[3]))
        if f is not None and ok is not None:
            g = g.masked_fill(~ok[None, :, :, None], f)
        out.append(g.reshape(*t.shape[: d - 1], B, M, *t.shape[d + 1 :]))
    return out


def _scatter_prep(src: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor | None, length: int):
    B, M = idx.shape
    if src.shape[:2] != (B, M):
        raise ValueError(f"src must be [B, M, ...] = {(B, M)}, got {tuple(src.shape)}")
    sv = src.reshape(B, M, -1)
    keep = ok if ok is not None else torch.ones_like(idx, dtype=torch.bool)
    dest = idx.masked_fill(~keep, length)  # dropped slots land in a spare row that is cut off
    return sv, keep, dest[:, :, None].expand(-1, -1, sv.shape[2])


def scatter_tokens(
    src: torch.Tensor, idx: torch.Tensor, length: int, *, ok: torch.Tensor | None = None, base: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of a gather: ``out[b, idx[b, m]] = src[b, m]`` where ``ok``; other tokens from ``base`` (or 0).

    src: ``[B, M, ...]``; idx: ``[B, M]`` unique per row where ``ok``; base: ``[B, length, ...]``.
    Returns ``[B, length, ...]`` in src's dtype.
    """
    sv, _, dest = _scatter_prep(src, idx, ok, length)
    B, M, W = sv.shape
    out = sv.new_zeros((B, length + 1, W))
    if base is not None:
        out[:, :length] = base.reshape(B, length, W)
    out.scatter_(1, dest, sv)
    return out[:, :length].reshape(B, length, *src.shape[2:])


def scatter_add_tokens(
    src: torch.Tensor,
    idx: torch.Tensor,
    length: int,
    *,
    weight: torch.Tensor | None = None,
    ok: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted scatter-add (merging): ``out[b, idx[b, m]] += weight[b, m] * src[b, m]`` where ``ok``.

    src: ``[B, M, ...]``; idx, weight: ``[B, M]`` (indices may repeat); base: ``[B, length, ...]``
    added to (default 0). Accumulates and returns fp32 ``[B, length, ...]`` (divide by the summed
    weights, then cast, to average).
    """
    sv, keep, dest = _scatter_prep(src, idx, ok, length)
    B, M, W = sv.shape
    val = sv.float()
    if weight is not None:
        val = val * weight.float()[:, :, None]
    val = val * keep[:, :, None]
    out = torch.zeros((B, length + 1, W), dtype=torch.float32, device=src.device)
    if base is not None:
        out[:, :length] = base.reshape(B, length, W).float()
    out.scatter_add_(1, dest, val)
    return out[:, :length].reshape(B, length, *src.shape[2:])
