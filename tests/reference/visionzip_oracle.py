"""Independent references for VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467).

``paper_zip``: plain Python loops, one crop, from the feature layer's output ``x`` [T, D] (CLS first),
its attention ``probs`` [H, T, T] and keys ``k`` [T, H, d]:
  * dominant = the ``n_dom`` patches with the largest CLS attention summed over heads (ties: lower index);
  * the other patches in order; keys averaged over heads, L2-normalised; targets at positions
    0, step, 2 step, ... (``step = max(1, N_r // C)``, the first C); every non-target joins the target of
    highest cosine (first on ties); contextual token = target + mean(members) (the target alone if none).
Returns the kept tokens [CLS, dominant..., contextual...] with their original indices and sources.

``official_zip``: the authors' tensor algorithm (visionzip 0.1.3 ``CLIPVisionTower_VisionZip.forward``)
re-written from its description: ``topk`` of the head-summed CLS row, boolean masks, ``isin`` for the
targets, a one-hot assignment and ``bmm``; CLS is one of its ``dominant + 1`` tokens.
"""
from __future__ import annotations

import torch

from . import flowcut_vit_oracle as fc
from .vispruner_oracle import run_tower


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u.double() @ v.double()) / (float(u.double().norm()) * float(v.double().norm()))


def paper_zip(x: torch.Tensor, probs: torch.Tensor, k: torch.Tensor, n_dom: int, n_ctx: int):
    T = x.shape[0]
    H = probs.shape[0]
    attn = {j: sum(float(probs[h, 0, j]) for h in range(H)) for j in range(1, T)}
    dom = sorted(sorted(attn, key=lambda j: (-attn[j], j))[:n_dom])
    rest = [j for j in range(1, T) if j not in dom]
    key = {j: k[j].mean(0) for j in rest}
    step = max(1, len(rest) // n_ctx) if n_ctx else 1
    targets = [rest[i] for i in range(0, len(rest), step)][:n_ctx]
    members = {t: [] for t in targets}
    for j in rest:
        if j in members:
            continue
        best, bt = -float("inf"), None
        for t in targets:
            s = _cos(key[j], key[t])
            if s > best:
                best, bt = s, t
        members[bt].append(j)
    toks = [x[0]] + [x[j] for j in dom]
    idx = [0] + dom
    sources = [[0]] + [[j] for j in dom]
    for t in targets:
        m = members[t]
        toks.append(x[t] + (sum(x[j] for j in m) / len(m) if m else 0.0))
        idx.append(t)
        sources.append(sorted([t] + m))
    return torch.stack(toks), idx, sources


def official_zip(x: torch.Tensor, attn: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int):
    """x [1, T, D], attn [1, H, T, T], metric [1, T, d] (keys averaged over heads); ``dominant`` patches
    besides CLS. Returns the [1, 1 + dominant + contextual, D] tokens."""
    cls_sum = attn[:, :, 0, 1:].sum(dim=1)
    top = cls_sum.topk(dominant, dim=1).indices + 1
    all_idx = torch.cat([torch.zeros(1, 1, dtype=top.dtype), top], dim=1)
    mask = torch.ones_like(x[:, :, 0], dtype=torch.bool).scatter_(1, all_idx, False)
    dom = x.masked_select(~mask.unsqueeze(-1)).view(1, dominant + 1, x.shape[2])
    m = metric[mask].view(1, x.shape[1] - dominant - 1, metric.shape[2])
    h = x.masked_select(mask.unsqueeze(-1)).view(1, x.shape[1] - dominant - 1, x.shape[2])
    m = m / m.norm(dim=-1, keepdim=True)
    step = max(1, m.shape[1] // contextual)
    tgt = torch.arange(0, m.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(m.shape[1]), tgt)
    sim = torch.bmm(m[:, others], m[:, tgt].transpose(1, 2))
    one_hot = torch.zeros(1, int(others.sum()), contextual, dtype=h.dtype)
    one_hot.scatter_(2, sim.argmax(dim=2).unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    agg = torch.bmm(one_hot.transpose(1, 2), h[:, others]) / counts
    return torch.cat([dom, h[:, tgt] + agg], dim=1)


def encode(model, crops: torch.Tensor, n_dom: int, n_ctx: int):
    """Per crop: (kept features [CLS, dominant, contextual], original indices, sources)."""
    feats, kept, sources = [], [], []
    for c in range(crops.shape[0]):
        x, probs, k = run_tower(model, crops[c])
        f, idx, src = paper_zip(x, probs, k, n_dom, n_ctx)
        feats.append(f)
        kept.append(idx)
        sources.append(src)
    return feats, kept, sources


__all__ = ["paper_zip", "official_zip", "encode", "fc"]
