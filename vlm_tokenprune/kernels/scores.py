"""Triton: attention of query rows over a key subset, streamed over the keys (two passes).

Reference: ``vlm_tokenprune.reference_ops.attention_scores`` (same arguments, same result up
to fp32 summation order). Memory: O(B * H * R) row statistics + O(B * split * S) partial sums;
the ``[B, H, R, Nk]`` logits are never materialised.

- pass 1 (``_row_stats_kernel``), one program per (block of G*R query rows of one KV head, b):
  online max / sum-exp over every allowed key of the normaliser (the whole causal row, or the
  subset for ``softmax_over="keys"``), RoPE applied on the fly. ``row_keys`` ``[B, R, Nk]`` (Gemma 3's
  per-row windows and image block) replaces the causal rule in both passes; it is read, never written.
- pass 2 (``_subset_kernel``), one program per (block of S subset keys, b, head split): the
  subset keys' probabilities ``exp(logit - max) / sum``, reduced over heads and rows in
  registers (deterministic: no atomics), or stored per head and row for ``reduce="none"``.

RoPE is applied in the inputs' own dtype exactly as the model does (products and the sum
rounded to bf16 / fp16 with round-to-nearest-even), so post-RoPE q and k equal the reference's
bit for bit; logits and softmax are fp32. Launch with ``enable_fp_fusion=False`` so the GPU
compiler does not fuse those roundings into FMAs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._reduce import tsum, tmax

_MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round(x, MODE: tl.constexpr):
    """fp32 ``x`` rounded (RTNE) to bf16 (MODE 1) / fp16 (MODE 2) and widened back; MODE 0: unchanged."""
    if MODE == 1:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # the interpreter's bf16 cast truncates
        return bits.to(tl.float32, bitcast=True)
    elif MODE == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _load_rotated(x_rows, cs_rows, row_mask, cs_mask, cos_ptr, sin_ptr, offs_d, D, x_sd, cs_sd,
                  ROPE: tl.constexpr, MODE: tl.constexpr):
    """``[rows, BLOCK_D]`` fp32 tile of x (row pointers ``x_rows``), rotated with cos/sin rows at ``cs_rows``."""
    d_mask = offs_d < D
    m2 = row_mask[:, None] & d_mask[None, :]
    x = tl.load(x_rows[:, None] + offs_d[None, :] * x_sd, mask=m2, other=0.0).to(tl.float32)
    if ROPE:
        half = D // 2
        lower = offs_d < half
        partner = tl.where(lower, offs_d + half, offs_d - half)
        xp = tl.load(x_rows[:, None] + partner[None, :] * x_sd, mask=m2, other=0.0).to(tl.float32)
        xp = tl.where(lower[None, :], -xp, xp)  # rotate_half(x)
        c_mask = m2 & cs_mask[:, None]
        c = tl.load(cos_ptr + cs_rows[:, None] + offs_d[None, :] * cs_sd, mask=c_mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + cs_rows[:, None] + offs_d[None, :] * cs_sd, mask=c_mask, other=0.0).to(tl.float32)
        x = _round(_round(x * c, MODE) + _round(xp * s, MODE), MODE)
    return x


@triton.jit
def _logits(q, k, scaling, USE_DOT: tl.constexpr):
    """``[BM, BD] x [BN, BD] -> [BM, BN]`` fp32 (IEEE fp32 products: no TF32)."""
    if USE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tsum(q[:, None, :] * k[None, :, :], 2)
    return s * scaling


@triton.jit
def _keys_at(kk, n_mask, b, kvalid_ptr, kidx_ptr, skv_b, skv_n, ski_b, ski_n, HAS_KIDX: tl.constexpr):
    """Validity and sequence position of keys ``kk`` of row ``b``."""
    kval = tl.load(kvalid_ptr + b * skv_b + kk * skv_n, mask=n_mask, other=0) != 0
    if HAS_KIDX:
        kpos = tl.load(kidx_ptr + b * ski_b + kk * ski_n, mask=n_mask, other=0)
    else:
        kpos = kk.to(tl.int64)
    return n_mask & kval, kpos


@triton.jit
def _rule(kpos, qpos, r, kk, b, m_mask, n_mask, rk_ptr, srk_b, srk_r, srk_n, HAS_ROWKEYS: tl.constexpr):
    """``[rows, keys]``: the causal rule ``k <= q``, or the given per-row key sets (``row_keys``) instead."""
    if HAS_ROWKEYS:
        ptrs = rk_ptr + b * srk_b + r.to(tl.int64)[:, None] * srk_r + kk[None, :] * srk_n
        return tl.load(ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0) != 0
    else:
        return kpos[None, :] <= qpos[:, None]


@triton.jit
def _query_tile(pid_m, b, hkv, q_ptr, qidx_ptr, cos_ptr, sin_ptr, R, G, D, L_CS,
                sq_b, sq_h, sq_r, sq_d, sqi_b, sqi_r, scs_b, scs_l, scs_d,
                ROPE: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``m = g * R + r`` (head ``hkv * G + g``, query row r) of one KV head: rotated q, positions, head, row."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < G * R
    g = offs_m // R
    r = offs_m % R
    h = hkv * G + g
    qpos = tl.load(qidx_ptr + b * sqi_b + r * sqi_r, mask=m_mask, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + b * sq_b + h.to(tl.int64) * sq_h + r.to(tl.int64) * sq_r
    q = _load_rotated(q_rows, b * scs_b + qpos * scs_l, m_mask, (qpos >= 0) & (qpos < L_CS),
                      cos_ptr, sin_ptr, offs_d, D, sq_d, scs_d, ROPE, MODE)
    return q, qpos, m_mask, h, r


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, qidx_ptr, kvalid_ptr, kidx_ptr, cos_ptr, sin_ptr, sub_ptr, subok_ptr, rk_ptr, m_out, l_out,
    H_KV, R, G, NK, S, D, L_CS, scaling,
    sq_b, sq_h, sq_r, sq_d, sk_b, sk_h, sk_n, sk_d, sqi_b, sqi_r, skv_b, skv_n, ski_b, ski_n,
    scs_b, scs_l, scs_d, ssub_b, ssub_s, srk_b, srk_r, srk_n,
    HAS_KIDX: tl.constexpr, ROPE: tl.constexpr, NORM_SUBSET: tl.constexpr, HAS_ROWKEYS: tl.constexpr,
    Q_MODE: tl.constexpr,
    K_MODE: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 1: row max and sum-exp over the normaliser's allowed keys -> ``m_out``/``l_out`` ``[B, H, R]``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = pid_bh % H_KV
    q, qpos, m_mask, h, r = _query_tile(pid_m, b, hkv, q_ptr, qidx_ptr, cos_ptr, sin_ptr, R, G, D, L_CS,
                                        sq_b, sq_h, sq_r, sq_d, sqi_b, sqi_r, scs_b, scs_l, scs_d,
                                        ROPE, Q_MODE, BLOCK_M, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    if NORM_SUBSET:
        n_total = S
    else:
        n_total = NK
    for n0 in range(0, n_total, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_total
        if NORM_SUBSET:
            kk = tl.load(sub_ptr + b * ssub_b + offs_n * ssub_s, mask=n_mask, other=0)
            n_mask = n_mask & (tl.load(subok_ptr + b * ssub_b + offs_n * ssub_s, mask=n_mask, other=0) != 0)
            n_mask = n_mask & (kk >= 0) & (kk < NK)
        else:
            kk = offs_n.to(tl.int64)
        kok, kpos = _keys_at(kk, n_mask, b, kvalid_ptr, kidx_ptr, skv_b, skv_n, ski_b, ski_n, HAS_KIDX)
        k_rows = k_ptr + b * sk_b + hkv * sk_h + kk * sk_n
        k = _load_rotated(k_rows, b * scs_b + kpos * scs_l, n_mask, (kpos >= 0) & (kpos < L_CS),
                          cos_ptr, sin_ptr, offs_d, D, sk_d, scs_d, ROPE, K_MODE)
        s = _logits(q, k, scaling, USE_DOT)
        rule = _rule(kpos, qpos, r, kk, b, m_mask, n_mask, rk_ptr, srk_b, srk_r, srk_n, HAS_ROWKEYS)
        allowed = m_mask[:, None] & kok[None, :] & rule
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tmax(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row so far: exp(-inf) = 0
        l_i = l_i * tl.exp(m_i - m_safe) + tsum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    out = (b * H_KV * G + h) * R + r
    tl.store(m_out + out, m_i, mask=m_mask)
    tl.store(l_out + out, l_i, mask=m_mask)


@triton.jit
def _subset_kernel(
    q_ptr, k_ptr, qidx_ptr, kvalid_ptr, kidx_ptr, cos_ptr, sin_ptr, sub_ptr, subok_ptr, rk_ptr, rowok_ptr,
    m_in, l_in, out_ptr,
    H_KV, R, G, NK, S, D, L_CS, scaling, HEADS_PER_SPLIT, N_SPLIT,
    sq_b, sq_h, sq_r, sq_d, sk_b, sk_h, sk_n, sk_d, sqi_b, sqi_r, skv_b, skv_n, ski_b, ski_n,
    scs_b, scs_l, scs_d, ssub_b, ssub_s, srk_b, srk_r, srk_n, sro_b, sro_r,
    HAS_KIDX: tl.constexpr, ROPE: tl.constexpr, HAS_SUBSET: tl.constexpr, HAS_ROWKEYS: tl.constexpr,
    HAS_ROWOK: tl.constexpr,
    REDUCE: tl.constexpr, Q_MODE: tl.constexpr, K_MODE: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2: probabilities of the subset keys; REDUCE 0 = sum / 1 = max over (heads, rows) of this
    split -> ``out [B, N_SPLIT, S]``; REDUCE 2 = per head and row -> ``out [B, H, R, S]``."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    if HAS_SUBSET:
        kk = tl.load(sub_ptr + b * ssub_b + offs_s * ssub_s, mask=s_mask, other=0)
        s_mask = s_mask & (tl.load(subok_ptr + b * ssub_b + offs_s * ssub_s, mask=s_mask, other=0) != 0)
        s_mask = s_mask & (kk >= 0) & (kk < NK)
    else:
        kk = offs_s.to(tl.int64)
    kok, kpos = _keys_at(kk, s_mask, b, kvalid_ptr, kidx_ptr, skv_b, skv_n, ski_b, ski_n, HAS_KIDX)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.full((BLOCK_S,), 0.0, tl.float32)
    h0 = split * HEADS_PER_SPLIT
    h1 = tl.minimum(h0 + HEADS_PER_SPLIT, H_KV)
    for hkv in range(h0, h1):
        k_rows = k_ptr + b * sk_b + hkv * sk_h + kk * sk_n
        k = _load_rotated(k_rows, b * scs_b + kpos * scs_l, s_mask, (kpos >= 0) & (kpos < L_CS),
                          cos_ptr, sin_ptr, offs_d, D, sk_d, scs_d, ROPE, K_MODE)
        for m0 in range(0, G * R, BLOCK_M):
            q, qpos, m_mask, h, r = _query_tile(m0 // BLOCK_M, b, hkv, q_ptr, qidx_ptr, cos_ptr, sin_ptr, R, G, D,
                                                L_CS, sq_b, sq_h, sq_r, sq_d, sqi_b, sqi_r, scs_b, scs_l, scs_d,
                                                ROPE, Q_MODE, BLOCK_M, BLOCK_D)
            stat = (b * H_KV * G + h) * R + r
            m_i = tl.load(m_in + stat, mask=m_mask, other=0.0)
            l_i = tl.load(l_in + stat, mask=m_mask, other=0.0)
            row = m_mask & (l_i > 0.0)
            s = _logits(q, k, scaling, USE_DOT)
            rule = _rule(kpos, qpos, r, kk, b, m_mask, s_mask, rk_ptr, srk_b, srk_r, srk_n, HAS_ROWKEYS)
            allowed = row[:, None] & kok[None, :] & rule
            l_safe = tl.where(row, l_i, 1.0)
            p = tl.where(allowed, tl.exp(s - m_i[:, None]) / l_safe[:, None], 0.0)
            if REDUCE == 2:
                dst = ((b * H_KV * G + h) * R + r)[:, None] * S + offs_s[None, :]
                tl.store(out_ptr + dst, p, mask=m_mask[:, None] & (offs_s < S)[None, :])
            else:
                if HAS_ROWOK:
                    rok = tl.load(rowok_ptr + b * sro_b + r * sro_r, mask=m_mask, other=0) != 0
                    p = tl.where(rok[:, None], p, 0.0)
                if REDUCE == 0:
                    acc += tsum(p, 0)
                else:
                    acc = tl.maximum(acc, tmax(p, 0))
    if REDUCE != 2:
        tl.store(out_ptr + (b * N_SPLIT + split) * S + offs_s, acc, mask=offs_s < S)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


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
    block_m: int | None = None,
    block_n: int | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """Launcher; arguments and result as ``reference_ops.attention_scores`` (checked by ``ops``).

    ``block_m``/``block_n`` (powers of two) and ``split`` (head groups of pass 2) override the
    tile choice (tests use small tiles to exercise the streaming loops).
    """
    B, H, R, D = q.shape
    H_KV, NK = k.shape[1], k.shape[2]
    G = H // H_KV
    S = NK if subset is None else subset.shape[1]
    assert q.dtype in _MODES and k.dtype in _MODES, f"unsupported dtypes {q.dtype}, {k.dtype}"
    dev = q.device
    rope = cos is not None
    if rope:
        assert D % 2 == 0, "RoPE needs an even head dim"
        q_mode = _MODES[torch.promote_types(q.dtype, cos.dtype)]
        k_mode = _MODES[torch.promote_types(k.dtype, cos.dtype)]
        scs = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
        if sin.stride() != cos.stride():
            sin = sin.contiguous()
            cos = cos.contiguous()
            scs = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
        L_CS = cos.shape[1]
    else:
        q_mode = k_mode = 0
        cos = sin = q  # never read
        scs, L_CS = (0, 0, 0), 0
    q_idx = q_idx.long()
    kv = _u8(k_valid)
    kidx = k_idx.long() if k_idx is not None else q_idx
    sub = subset.long() if subset is not None else q_idx
    subok = _u8(subset_ok) if subset is not None else kv
    rok = _u8(row_ok) if row_ok is not None else kv
    rk = _u8(row_keys) if row_keys is not None else kv  # [B, R, NK] (indexed by key, like k_valid)
    srk = (rk.stride(0), rk.stride(1), rk.stride(2)) if row_keys is not None else (0, 0, 0)
    interp = dev.type != "cuda"
    BLOCK_D = _pow2(D, 1 if interp else 16, 1 << 30)
    BLOCK_M = block_m or _pow2(G * R, 1 if interp else 16, 64)
    BLOCK_N = block_n or _pow2(NK if subset is None or softmax_over == "row" else S, 1 if interp else 16, 64)
    BLOCK_S = block_n or _pow2(S, 1 if interp else 16, 64)
    use_dot = BLOCK_M >= 16 and BLOCK_D >= 16 and BLOCK_N >= 16 and BLOCK_S >= 16
    norm_subset = softmax_over == "keys" and subset is not None
    num_warps = 8 if BLOCK_D * max(BLOCK_M, BLOCK_N, BLOCK_S) >= 8192 else 4  # two fp32 tiles of 64 x 128
    common = (
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        q_idx.stride(0), q_idx.stride(1), kv.stride(0), kv.stride(1), kidx.stride(0), kidx.stride(1) if kidx.dim() > 1 else 0,
        *scs, sub.stride(0), sub.stride(1) if sub.dim() > 1 else 0,
    )
    m_buf = torch.empty((B, H, R), dtype=torch.float32, device=dev)
    l_buf = torch.empty((B, H, R), dtype=torch.float32, device=dev)
    if B * H * R and G * R:
        _row_stats_kernel[(triton.cdiv(G * R, BLOCK_M), B * H_KV)](
            q, k, q_idx, kv, kidx, cos, sin, sub, subok, rk, m_buf, l_buf,
            H_KV, R, G, NK, S, D, L_CS, float(scaling), *common, *srk,
            HAS_KIDX=k_idx is not None, ROPE=rope, NORM_SUBSET=norm_subset, HAS_ROWKEYS=row_keys is not None,
            Q_MODE=q_mode, K_MODE=k_mode,
            USE_DOT=use_dot, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps,
            enable_fp_fusion=False,
        )
    n_s_blocks = triton.cdiv(S, BLOCK_S)
    if split is None:  # enough programs to fill a GPU; one split under the interpreter
        split = 1 if interp else max(1, min(H_KV, triton.cdiv(256, max(1, n_s_blocks * B))))
    split = max(1, min(split, H_KV))
    heads_per_split = triton.cdiv(H_KV, split)
    split = triton.cdiv(H_KV, heads_per_split)
    if reduce == "none":
        out = torch.zeros((B, H, R, S), dtype=torch.float32, device=dev)
    else:
        out = torch.zeros((B, split, S), dtype=torch.float32, device=dev)
    if B * S and R:
        _subset_kernel[(n_s_blocks, B, split)](
            q, k, q_idx, kv, kidx, cos, sin, sub, subok, rk, rok, m_buf, l_buf, out,
            H_KV, R, G, NK, S, D, L_CS, float(scaling), heads_per_split, split, *common, *srk,
            rok.stride(0), rok.stride(1) if rok.dim() > 1 else 0,
            HAS_KIDX=k_idx is not None, ROPE=rope, HAS_SUBSET=subset is not None, HAS_ROWKEYS=row_keys is not None,
            HAS_ROWOK=row_ok is not None,
            REDUCE={"mean": 0, "max": 1, "none": 2}[reduce], Q_MODE=q_mode, K_MODE=k_mode, USE_DOT=use_dot,
            BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, num_warps=num_warps, enable_fp_fusion=False,
        )
    if reduce == "none":
        return out
    if reduce == "max":
        return out.amax(dim=1)
    n_rows = row_ok.sum(1, keepdim=True).clamp(min=1) if row_ok is not None else R
    return out.sum(dim=1) / (H * n_rows)
