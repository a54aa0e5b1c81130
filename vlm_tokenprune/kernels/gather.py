"""Triton: token gathers with shared indices in ONE launch, and the inverse scatter / weighted scatter-add.

References: ``vlm_tokenprune.reference_ops.gather_tokens`` / ``scatter_tokens`` /
``scatter_add_tokens``. Gathers and scatters copy bits (identical results); the weighted
scatter-add accumulates in fp32 with atomics (order of repeated indices is not fixed).

Every tensor is seen as ``[P, B or 1, L, W]`` through its strides (``reference_ops.token_view``
gives the shape): hidden states ``[B, L, D]`` are ``P = 1, W = D``, position ids ``[3, B, L]``
are ``P = 3, W = 1``. ``gather_tokens`` handles up to ``SLOTS`` tensors per launch (hidden
states, cos, sin, position ids, a 2-D mask), more in further launches.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

SLOTS = 5


@triton.jit
def _gather_slot(src, dst, idx, ok, offs_m, m_mask, b, B, M, L, P, W, sp, sb, sl, sw,
                 HAS: tl.constexpr, ZERO: tl.constexpr, BLOCK_W: tl.constexpr):
    if HAS:
        rows = m_mask & (idx >= 0) & (idx < L)
        for p in range(0, P):
            for w0 in range(0, W, BLOCK_W):
                offs_w = w0 + tl.arange(0, BLOCK_W)
                w_mask = offs_w < W
                v = tl.load(src + p * sp + b * sb + idx[:, None] * sl + offs_w[None, :] * sw,
                            mask=rows[:, None] & w_mask[None, :], other=0)
                if ZERO:
                    v = tl.where(ok[:, None], v, tl.full(v.shape, 0, v.dtype))
                out = ((p * B + b) * M + offs_m)[:, None] * W + offs_w[None, :]
                tl.store(dst + out, v, mask=m_mask[:, None] & w_mask[None, :])


@triton.jit
def _gather_kernel(
    idx_ptr, ok_ptr, B, M, si_b, si_m,
    s0, d0, L0, P0, W0, sp0, sb0, sl0, sw0,
    s1, d1, L1, P1, W1, sp1, sb1, sl1, sw1,
    s2, d2, L2, P2, W2, sp2, sb2, sl2, sw2,
    s3, d3, L3, P3, W3, sp3, sb3, sl3, sw3,
    s4, d4, L4, P4, W4, sp4, sb4, sl4, sw4,
    HAS0: tl.constexpr, HAS1: tl.constexpr, HAS2: tl.constexpr, HAS3: tl.constexpr, HAS4: tl.constexpr,
    Z0: tl.constexpr, Z1: tl.constexpr, Z2: tl.constexpr, Z3: tl.constexpr, Z4: tl.constexpr,
    HAS_OK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    idx = tl.load(idx_ptr + b * si_b + offs_m * si_m, mask=m_mask, other=0)
    if HAS_OK:
        ok = tl.load(ok_ptr + b * si_b + offs_m * si_m, mask=m_mask, other=0) != 0
    else:
        ok = m_mask
    _gather_slot(s0, d0, idx, ok, offs_m, m_mask, b, B, M, L0, P0, W0, sp0, sb0, sl0, sw0, HAS0, Z0, BLOCK_W)
    _gather_slot(s1, d1, idx, ok, offs_m, m_mask, b, B, M, L1, P1, W1, sp1, sb1, sl1, sw1, HAS1, Z1, BLOCK_W)
    _gather_slot(s2, d2, idx, ok, offs_m, m_mask, b, B, M, L2, P2, W2, sp2, sb2, sl2, sw2, HAS2, Z2, BLOCK_W)
    _gather_slot(s3, d3, idx, ok, offs_m, m_mask, b, B, M, L3, P3, W3, sp3, sb3, sl3, sw3, HAS3, Z3, BLOCK_W)
    _gather_slot(s4, d4, idx, ok, offs_m, m_mask, b, B, M, L4, P4, W4, sp4, sb4, sl4, sw4, HAS4, Z4, BLOCK_W)


def _as_view(t: torch.Tensor, dim: int, batch: int):
    """(``t`` with bool as uint8, P, b, L, W, strides (p, b, l, w)) for token axis ``dim``; W axes flattened."""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
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
    v = t.reshape(P, b, L, W)  # a view for the tensors we get (contiguous trailing / leading axes); else a copy
    return v, P, b, L, W, (v.stride(0), v.stride(1) if b > 1 else 0, v.stride(2), v.stride(3))


def gather_tokens(
    idx: torch.Tensor,
    tensors: Sequence[torch.Tensor | None],
    *,
    dims: Sequence[int],
    ok: torch.Tensor | None = None,
    zero_invalid: Sequence[bool],
    block_m: int | None = None,
    block_w: int | None = None,
) -> list[torch.Tensor | None]:
    """Launcher; as ``reference_ops.gather_tokens`` with ``fill`` 0 where ``zero_invalid[i]`` (checked by ``ops``)."""
    B, M = idx.shape
    idx = idx.long()
    out: list[torch.Tensor | None] = [None] * len(tensors)
    live = [i for i, t in enumerate(tensors) if t is not None]
    BLOCK_M = block_m or max(16, min(64, triton.next_power_of_2(max(1, M))))
    okv = ok.view(torch.uint8) if ok is not None and ok.dtype == torch.bool else ok
    if okv is not None and okv.stride() != idx.stride():
        okv, idx = okv.contiguous(), idx.contiguous()
    for start in range(0, len(live), SLOTS):
        group = live[start : start + SLOTS]
        args, has, zero, widths = [], [], [], []
        for i in group:
            t = tensors[i]
            d = dims[i] % t.dim()
            v, P, _, L, W, st = _as_view(t, d, B)
            res = torch.empty((P, B, M, W), dtype=v.dtype, device=v.device)
            o = res.view(torch.bool) if t.dtype == torch.bool else res
            out[i] = o.view(*t.shape[: d - 1], B, M, *t.shape[d + 1 :])
            args += [v, res, L, P, W, *st]
            has.append(True)
            zero.append(bool(zero_invalid[i]) and ok is not None)
            widths.append(W)
        for _ in range(SLOTS - len(group)):  # unused slots: never read (HAS False)
            args += [idx, idx, 0, 0, 0, 0, 0, 0, 0]
            has.append(False)
            zero.append(False)
        if B * M == 0:
            continue
        BLOCK_W = block_w or max(1, min(128, triton.next_power_of_2(max(widths))))
        _gather_kernel[(triton.cdiv(M, BLOCK_M), B)](
            idx, okv if okv is not None else idx, B, M, idx.stride(0), idx.stride(1), *args,
            HAS0=has[0], HAS1=has[1], HAS2=has[2], HAS3=has[3], HAS4=has[4],
            Z0=zero[0], Z1=zero[1], Z2=zero[2], Z3=zero[3], Z4=zero[4],
            HAS_OK=ok is not None, BLOCK_M=BLOCK_M, BLOCK_W=BLOCK_W,
        )
    return out


@triton.jit
def _scatter_kernel(src, out, idx_ptr, ok_ptr, w_ptr, M, L, W, ss_b, ss_m, ss_w, si_b, si_m,
                    HAS_OK: tl.constexpr, HAS_W: tl.constexpr, ADD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    """``out [B, L, W]`` (contiguous): store (ADD False) or fp32 atomic add (ADD True) of src rows at idx."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    idx = tl.load(idx_ptr + b * si_b + offs_m * si_m, mask=m_mask, other=0)
    rows = m_mask & (idx >= 0) & (idx < L)
    if HAS_OK:
        rows = rows & (tl.load(ok_ptr + b * si_b + offs_m * si_m, mask=m_mask, other=0) != 0)
    if HAS_W:
        wt = tl.load(w_ptr + b * si_b + offs_m * si_m, mask=m_mask, other=0.0).to(tl.float32)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        m2 = rows[:, None] & (offs_w < W)[None, :]
        v = tl.load(src + b * ss_b + offs_m[:, None] * ss_m + offs_w[None, :] * ss_w, mask=m2, other=0)
        dst = out + (b * L + idx)[:, None] * W + offs_w[None, :]
        if ADD:
            v = v.to(tl.float32)
            if HAS_W:
                v = v * wt[:, None]
            tl.atomic_add(dst, v, mask=m2)
        else:
            tl.store(dst, v, mask=m2)


def _scatter(src, idx, length, ok, weight, base, add: bool, block_m=None, block_w=None) -> torch.Tensor:
    B, M = idx.shape
    if src.dtype == torch.bool:
        src = src.view(torch.uint8)
    sv = src.reshape(B, M, -1)
    W = sv.shape[2]
    dtype = torch.float32 if add else sv.dtype
    if base is not None:
        b = base.view(torch.uint8) if base.dtype == torch.bool else base
        out = b.reshape(B, length, W).to(dtype).clone().contiguous()  # .to() may alias: clone before writing
    else:
        out = torch.zeros((B, length, W), dtype=dtype, device=src.device)
    idx = idx.long()
    extra = [t for t in (ok, weight) if t is not None]
    if any(t.stride() != idx.stride() for t in extra):
        idx = idx.contiguous()
        ok = ok.contiguous() if ok is not None else None
        weight = weight.contiguous() if weight is not None else None
    okv = ok.view(torch.uint8) if ok is not None and ok.dtype == torch.bool else ok
    if B * M * W:
        BLOCK_M = block_m or max(16, min(64, triton.next_power_of_2(M)))
        BLOCK_W = block_w or max(1, min(128, triton.next_power_of_2(W)))
        _scatter_kernel[(triton.cdiv(M, BLOCK_M), B)](
            sv, out, idx, okv if okv is not None else idx, weight if weight is not None else idx,
            M, length, W, sv.stride(0), sv.stride(1), sv.stride(2), idx.stride(0), idx.stride(1),
            HAS_OK=ok is not None, HAS_W=weight is not None, ADD=add, BLOCK_M=BLOCK_M, BLOCK_W=BLOCK_W,
        )
    return out


def scatter_tokens(src, idx, length, *, ok=None, base=None, block_m=None, block_w=None) -> torch.Tensor:
    """Launcher; as ``reference_ops.scatter_tokens``."""
    out = _scatter(src, idx, length, ok, None, base, add=False, block_m=block_m, block_w=block_w)
    if src.dtype == torch.bool:
        out = out.view(torch.bool)
    return out.reshape(src.shape[0], length, *src.shape[2:])


def scatter_add_tokens(src, idx, length, *, weight=None, ok=None, base=None, block_m=None, block_w=None) -> torch.Tensor:
    """Launcher; as ``reference_ops.scatter_add_tokens`` (fp32 result)."""
    out = _scatter(src, idx, length, ok, weight, base, add=True, block_m=block_m, block_w=block_w)
    return out.reshape(src.shape[0], length, *src.shape[2:])
