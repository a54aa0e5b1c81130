"""The query-subset attention backend of structural ops (registered per patch by ``hooks.install_attention``).

It calls the model's own attention function on subsets of the queries (and heads): text queries in one
call; visual queries of ``neighbor`` layers in chunks of one patch-grid row with only the keys each
chunk may attend; ``skip_visual`` layers compute no visual query; ``heads_visual`` layers (YOPO,
arXiv 2410.06169) split the heads into kept heads (as above) and pruned heads (text queries over text
keys; visual queries get zeros). 2-D-mask backends (flash-attention) get the head split only.
"""
from __future__ import annotations

import torch
from torch import nn

from .plan import StructuralPlan


def decode_key_visual(st, j: int, B: int, kv: int) -> torch.Tensor:
    """``[B, kv]``: which of layer j's cached keys are visual while decoding (the prompt's kept tokens, then text)."""
    rec = st.prefill.kept_at(j)
    pv = st.prefill.is_visual
    pv = pv if rec is None else torch.gather(pv, 1, rec.kept) & rec.kept_ok
    return torch.cat([pv, torch.zeros(B, kv - pv.shape[1], dtype=torch.bool, device=pv.device)], 1)[:, :kv]


# -- query-subset attention -------------------------------------------------------------------------
class _PerHeadKV:
    """The attention module as the backend sees it for a head subset whose keys / values were
    already gathered one per query head (GQA group size 1); every other attribute is the module's."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def subset_attention(handle, plan: StructuralPlan, bases: dict, fmt: str, module, query, key, value, attention_mask, **kwargs):
    """The original backend on subsets of the queries (and heads) (see ``install_attention``); ``[B, Q, H, d]`` out.

    ``query`` ``[B, H, Q, d]``, ``key`` / ``value`` ``[B, H_kv, K, d]`` (after RoPE and the cache update).
    """
    j = module.layer_idx
    base = bases[j]
    st = handle.state
    if fmt == "2d":
        return _heads_2d(handle, plan, base, module, query, key, value, attention_mask, kwargs)
    info = st.structural if st is not None else None
    if not info or info.get("layer") != j or st.phase != "prefill" \
            or (not plan.no_visual_attention(j) and j not in plan.neighbor and j not in plan.heads_visual):
        return base(module, query, key, value, attention_mask, **kwargs)
    vis = info["vis"]
    B, H, M, d = query.shape
    KV = key.shape[2]
    if vis.shape != (B, M) or not bool(vis.any()):
        return base(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is None:
        allowed = torch.ones(M, KV, dtype=torch.bool, device=query.device).tril(KV - M)[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :KV]
    else:
        allowed = attention_mask[..., :KV] > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed.expand(B, allowed.shape[1], M, KV)

    def as_mask(a):
        if fmt == "float4d":
            return torch.zeros(a.shape, dtype=query.dtype, device=query.device).masked_fill(~a, torch.finfo(query.dtype).min)
        return a

    pruned = plan.heads_visual.get(j, ())
    subsets = plan.no_visual_attention(j) or j in plan.neighbor
    if not pruned:
        return _query_subsets(base, module, query, key, value, attention_mask, allowed, vis, info, plan.no_visual_attention(j),
                              as_mask, kwargs), None
    # YOPO: kept heads attend as usual; pruned heads only text queries over text keys; visual queries get 0 there
    g = H // key.shape[1]
    kept = [h for h in range(H) if h not in pruned]
    sub = _PerHeadKV(module)
    out = query.new_zeros(B, M, H, d)
    if kept:
        kv = torch.tensor([h // g for h in kept], device=query.device)
        qk, kk, vk = query[:, kept], key.index_select(1, kv), value.index_select(1, kv)
        if subsets:
            out[:, :, kept] = _query_subsets(base, sub, qk, kk, vk, attention_mask, allowed, vis, info, plan.no_visual_attention(j),
                                             as_mask, kwargs)
        else:
            out[:, :, kept] = base(sub, qk, kk, vk, attention_mask, **kwargs)[0].to(out.dtype)
    text_q = ~vis
    text_k = torch.cat([torch.ones(B, KV - M, dtype=torch.bool, device=vis.device), text_q], 1)  # cached keys: text
    oq, okq = _first(text_q)
    ok_, okk = _first(text_k)
    P = len(pruned)
    kv = torch.tensor([h // g for h in pruned], device=query.device)
    q_p = torch.gather(query[:, list(pruned)], 2, oq[:, None, :, None].expand(B, P, oq.shape[1], d))
    k_p = torch.gather(key.index_select(1, kv), 2, ok_[:, None, :, None].expand(B, P, ok_.shape[1], d))
    v_p = torch.gather(value.index_select(1, kv), 2, ok_[:, None, :, None].expand(B, P, ok_.shape[1], d))
    h_m = allowed.shape[1]
    m_p = torch.gather(allowed, 2, oq[:, None, :, None].expand(B, h_m, oq.shape[1], KV))
    m_p = torch.gather(m_p, 3, ok_[:, None, None, :].expand(B, h_m, oq.shape[1], ok_.shape[1]))
    m_p = m_p & okk[:, None, None, :]
    m_p = m_p | ~m_p.any(-1, keepdim=True)  # filler / padding rows attend everything (discarded): no empty row
    o_p = base(sub, q_p, k_p, v_p, as_mask(m_p.contiguous()), **kwargs)[0]  # [B, T, P, d]
    bi = torch.arange(B, device=query.device)[:, None].expand_as(oq)[okq]
    part = query.new_zeros(B, M, P, d)
    part[bi, oq[okq]] = o_p[okq].to(out.dtype)
    out[:, :, list(pruned)] = part
    return out, None


def _heads_2d(handle, plan: StructuralPlan, base, module, query, key, value, attention_mask, kwargs):
    """YOPO head split on a 2-D-mask backend (flash-attention: ``attention_mask`` is the ``[B, K]`` padding
    mask or None, causal bottom-right aligned): kept heads in one call over every query and key; pruned
    heads over the text keys only, gathered right-aligned (so the causal alignment still holds), in
    prefill (text queries; visual queries get 0) and while decoding (the prompt's visual keys skipped)."""
    j = module.layer_idx
    st = handle.state
    pruned = plan.heads_visual.get(j, ())
    if st is None or not pruned or st.phase == "passthrough":
        return base(module, query, key, value, attention_mask, **kwargs)
    B, H, M, d = query.shape
    KV = key.shape[2]
    if st.phase == "prefill":
        info = st.structural
        vis = info.get("vis") if info.get("layer") == j else None
        if vis is None or vis.shape != (B, M) or not bool(vis.any()):
            return base(module, query, key, value, attention_mask, **kwargs)
        q_rows = ~vis
        key_vis = torch.cat([torch.zeros(B, KV - M, dtype=torch.bool, device=vis.device), vis], 1)
    else:
        if st.prefill.is_visual is None or not bool(st.prefill.is_visual.any()):
            return base(module, query, key, value, attention_mask, **kwargs)
        q_rows = torch.ones(B, M, dtype=torch.bool, device=query.device)
        key_vis = decode_key_visual(st, j, B, KV)
    g = H // key.shape[1]
    kept = [h for h in range(H) if h not in pruned]
    sub = _PerHeadKV(module)
    out = query.new_zeros(B, M, H, d)
    if kept:
        kv = torch.tensor([h // g for h in kept], device=query.device)
        out[:, :, kept] = base(sub, query[:, kept], key.index_select(1, kv), value.index_select(1, kv), attention_mask,
                               **kwargs)[0].to(out.dtype)
    pad = attention_mask.bool() if attention_mask is not None else torch.ones(B, KV, dtype=torch.bool, device=query.device)
    oq, okq = _last(q_rows)
    ok_, okk = _last(~key_vis)
    P = len(pruned)
    kv = torch.tensor([h // g for h in pruned], device=query.device)
    q_p = torch.gather(query[:, list(pruned)], 2, oq[:, None, :, None].expand(B, P, oq.shape[1], d))
    k_p = torch.gather(key.index_select(1, kv), 2, ok_[:, None, :, None].expand(B, P, ok_.shape[1], d))
    v_p = torch.gather(value.index_select(1, kv), 2, ok_[:, None, :, None].expand(B, P, ok_.shape[1], d))
    m_p = (torch.gather(pad[:, -KV:], 1, ok_) & okk).to(attention_mask.dtype if attention_mask is not None else torch.long)
    o_p = base(sub, q_p, k_p, v_p, m_p, **kwargs)[0]  # [B, T, P, d]
    bi = torch.arange(B, device=query.device)[:, None].expand_as(oq)[okq]
    part = query.new_zeros(B, M, P, d)
    part[bi, oq[okq]] = o_p[okq].to(out.dtype)
    out[:, :, list(pruned)] = part
    return out, None


def _last(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``_first`` but right-aligned: the selected positions last, in order, ``[B, T]``, and which are real."""
    counts = sel.sum(1)
    T = int(counts.max())
    order = torch.sort(sel.to(torch.uint8), dim=1, stable=True).indices[:, sel.shape[1] - T:]
    return order, torch.arange(T, device=sel.device)[None, :] >= (T - counts)[:, None]


def _first(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sel`` ``[B, L]`` -> the selected positions first, in order, ``[B, T]`` (T = most per row), and which are real."""
    counts = sel.sum(1)
    T = int(counts.max())
    order = torch.sort((~sel).to(torch.uint8), dim=1, stable=True).indices[:, :T]
    return order, torch.arange(T, device=sel.device)[None, :] < counts[:, None]


def _query_subsets(base, module, query, key, value, attention_mask, allowed, vis, info, skip: bool, as_mask, kwargs):
    """Text queries in one backend call; visual queries (unless ``skip``) in neighbour chunks; ``[B, M, H, d]``."""
    B, H, M, d = query.shape
    KV = key.shape[2]
    out = query.new_zeros(B, M, H, d)
    order, ok = _first(~vis)  # text rows first, in order
    T = order.shape[1]
    q_t = torch.gather(query, 2, order[:, None, :, None].expand(B, H, T, d))
    m_t = torch.gather(allowed, 2, order[:, None, :, None].expand(B, allowed.shape[1], T, KV))
    m_t = m_t | ~ok[:, None, :, None]  # filler rows attend everything (discarded): no empty row
    o_t = base(module, q_t, key, value, as_mask(m_t), **kwargs)[0]  # [B, T, H, d]
    bi = torch.arange(B, device=query.device)[:, None].expand(B, T)[ok]
    out[bi, order[ok]] = o_t[ok].to(out.dtype)
    if skip:  # visual rows pass the layer through: their attention output is never used
        return out
    # visual queries: one chunk per patch-grid row, each with the keys it may attend; all chunks of
    # the batch padded to the largest and sent in ONE backend call (batch = chunks)
    plans = info["memo_chunks"]
    hit = next((c for m, c in plans if m is attention_mask), None) if attention_mask is not None else None
    if hit is None:
        hit = _chunk_plan(info["chunk"], vis, allowed, as_mask)
        if attention_mask is not None:
            plans.append((attention_mask, hit))
    bidx, qidx, kidx, qok, m_c = hit
    N, Qm = qidx.shape
    q_c = query[bidx, :, qidx].permute(0, 2, 1, 3)  # [N, H, Qm, d]
    k_c = key[bidx, :, kidx].permute(0, 2, 1, 3)  # [N, Hkv, Km, d]
    v_c = value[bidx, :, kidx].permute(0, 2, 1, 3)
    o = base(module, q_c.contiguous(), k_c.contiguous(), v_c.contiguous(), m_c, **kwargs)[0]
    out[bidx.expand(N, Qm)[qok], qidx[qok]] = o[qok].to(out.dtype)
    return out


def _chunk_plan(chunk: torch.Tensor, vis: torch.Tensor, allowed: torch.Tensor, as_mask) -> tuple:
    """Visual query chunks (one grid row each) and their keys: ``(bidx [N, 1], qidx [N, Qm], kidx [N, Km],
    qok [N, Qm], mask [N, h, Qm, Km])`` in the backend's mask format."""
    bs, qs, ks = [], [], []
    B = vis.shape[0]
    for b in range(B):
        rows = vis[b].nonzero()[:, 0]
        ids = chunk[b, rows]
        for c in torch.unique(ids):
            qi = rows[ids == c]
            bs.append(b)
            qs.append(qi)
            ks.append(allowed[b, :, qi].any(1).any(0).nonzero()[:, 0])
    N, Qm, Km = len(qs), max(len(x) for x in qs), max(len(x) for x in ks)
    dev = vis.device
    qidx = torch.zeros(N, Qm, dtype=torch.long, device=dev)
    kidx = torch.zeros(N, Km, dtype=torch.long, device=dev)
    qok = torch.zeros(N, Qm, dtype=torch.bool, device=dev)
    kok = torch.zeros(N, Km, dtype=torch.bool, device=dev)
    for i, (qi, ki) in enumerate(zip(qs, ks)):
        qidx[i, : len(qi)], qok[i, : len(qi)] = qi, True
        kidx[i, : len(ki)], kok[i, : len(ki)] = ki, True
    bidx = torch.tensor(bs, device=dev)[:, None]
    m_c = allowed[bidx[:, :, None], :, qidx[:, :, None], kidx[:, None, :]].permute(0, 3, 1, 2)  # [N, h, Qm, Km]
    m_c = (m_c & kok[:, None, None, :]) | ~qok[:, None, :, None]  # padded keys masked; padded query rows discarded
    return bidx, qidx, kidx, qok, as_mask(m_c.contiguous())
