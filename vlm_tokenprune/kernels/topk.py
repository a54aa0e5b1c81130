"""Triton: per-row top-k with a per-row budget, kept indices ascending, ties to the lower index.

Reference: ``vlm_tokenprune.reference_ops.topk`` (a stable descending sort, then an ascending
sort of the first k). Identical indices, not just equal up to tolerance: the selection is an
exact function of the fp32 scores.

One program per row, streaming the row in blocks (no sort, O(N) memory per row):

1. each score becomes an order-preserving 32-bit key (invalid entries = -inf, -0 = +0, every
   NaN the largest, as ``torch.sort`` orders them);
2. a bitwise search over the 32 key bits finds ``t``, the k-th largest key
   (``count(key >= t) >= k``): 32 counts, over the row held in registers when it fits one
   block (``N <= 4096``), else 32 streaming passes;
3. one pass keeps every key ``> t`` and the first ``k - count(key > t)`` keys ``== t`` in index
   order (ties to the lower index), writing each kept index to slot
   ``#kept before it`` (an exclusive prefix count), so the output is ascending.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._reduce import tsum, tcumsum


@triton.jit
def _keys(s_ptr, v_ptr, b, offs, N, ss_b, ss_n, sv_b, sv_n):
    """Order-preserving int64 keys in [0, 2**32) of the fp32 scores; -1 beyond the row."""
    n_mask = offs < N
    x = tl.load(s_ptr + b * ss_b + offs * ss_n, mask=n_mask, other=0.0).to(tl.float32)
    ok = tl.load(v_ptr + b * sv_b + offs * sv_n, mask=n_mask, other=0) != 0
    x = tl.where(ok, x, float("-inf"))
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in torch.sort
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x != x, 0x7FC00000, bits)  # every NaN is the largest value
    key = tl.where(bits >= 0, bits.to(tl.int64) + 2147483648, (~bits).to(tl.int64))
    return tl.where(n_mask, key, -1)


@triton.jit
def _count(s_ptr, v_ptr, b, N, ss_b, ss_n, sv_b, sv_n, row_key, t, STRICT: tl.constexpr,
           SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    """How many keys of row b are ``>= t`` (``> t`` if STRICT); ``row_key`` is the whole row when SINGLE."""
    if SINGLE:
        if STRICT:
            cnt = tsum((row_key > t).to(tl.int64), 0)
        else:
            cnt = tsum((row_key >= t).to(tl.int64), 0)
    else:
        cnt = t * 0
        for n0 in range(0, N, BLOCK):
            key = _keys(s_ptr, v_ptr, b, n0 + tl.arange(0, BLOCK), N, ss_b, ss_n, sv_b, sv_n)
            if STRICT:
                cnt += tsum((key > t).to(tl.int64), 0)
            else:
                cnt += tsum((key >= t).to(tl.int64), 0)
    return cnt


@triton.jit
def _topk_kernel(s_ptr, v_ptr, k_ptr, out_ptr, N, K_OUT, ss_b, ss_n, sv_b, sv_n,
                 SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kb = tl.load(k_ptr + b).to(tl.int64)
    zero = kb * 0
    row_key = _keys(s_ptr, v_ptr, b, tl.arange(0, BLOCK), N, ss_b, ss_n, sv_b, sv_n)  # used when SINGLE
    t = zero
    for i in range(32):  # greedy from the top bit: the largest t with count(key >= t) >= k
        cand = t | ((zero + 1) << (31 - i))
        cnt = _count(s_ptr, v_ptr, b, N, ss_b, ss_n, sv_b, sv_n, row_key, cand, False, SINGLE, BLOCK)
        t = tl.where(cnt >= kb, cand, t)
    need = kb - _count(s_ptr, v_ptr, b, N, ss_b, ss_n, sv_b, sv_n, row_key, t, True, SINGLE, BLOCK)
    eq_seen = zero  # keys equal to t already passed; the first `need` of them are kept (lower indices)
    slot = zero
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        if SINGLE:
            key = row_key
        else:
            key = _keys(s_ptr, v_ptr, b, offs, N, ss_b, ss_n, sv_b, sv_n)
        eq = (key == t).to(tl.int64)
        eq_rank = eq_seen + tcumsum(eq, 0) - eq
        keep = ((key > t) | ((eq != 0) & (eq_rank < need))) & (offs < N)
        kept = keep.to(tl.int64)
        pos = slot + tcumsum(kept, 0) - kept
        tl.store(out_ptr + b * K_OUT + pos, offs.to(tl.int64), mask=keep & (pos < K_OUT))
        eq_seen += tsum(eq, 0)
        slot += tsum(kept, 0)


def topk(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, *, block: int | None = None):
    """Launcher; arguments and result as ``reference_ops.topk`` (checked by ``ops``).

    ``block`` (a power of two) overrides the streaming block (tests use small ones).
    """
    B, N = scores.shape
    K = int(k.max()) if B else 0
    ok = torch.arange(K, device=scores.device)[None, :] < k[:, None]
    out = torch.zeros((B, K), dtype=torch.long, device=scores.device)
    if K == 0:
        return out, ok
    if K > N:
        raise ValueError(f"topk: k = {K} is more than the {N} entries of a row")
    v = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    BLOCK = block or max(16, min(4096, triton.next_power_of_2(N)))
    _topk_kernel[(B,)](scores, v, k.long().contiguous(), out, N, K, scores.stride(0), scores.stride(1),
                       v.stride(0), v.stride(1), SINGLE=N <= BLOCK, BLOCK=BLOCK,
                       num_warps=8 if BLOCK >= 2048 else 4)
    return out, ok
