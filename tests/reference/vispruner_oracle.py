"""Independent references for VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818).

``paper_select``: plain Python loops, one crop. Important tokens = the ``int(T * r)`` patches with the
largest CLS attention (mean over heads; ties to the lower index). The rest, in that descending order,
form R; while ``T_div = T - T_imp > 0`` and ``s = min(8, |R| - T_div) > 0``: a = R at even positions,
b = R at odd positions, each a scored by its best cosine to any b, the s best-scored a dropped,
R = [kept a in descending score order (ties: earlier first)] + b. Kept = important + R (only the
important ones when T_div = 0).

``official_mask``: the official ``encode_images`` logic re-written from its description, tensor form
(``argsort`` of the head-mean attention, parity split with fancy indexing); it needs even residual
counts, as the official code does.

``encode``: the CLIP tower run layer by layer (``flowcut_vit_oracle.clip_layer``, eager, written out)
up to the feature layer F; VisPruner on F's output and F's attention; returns per crop the kept
features (CLS first) and their original token indices, for ``flowcut_vit_oracle.reduced_rows``.
"""
from __future__ import annotations

import torch

from . import flowcut_vit_oracle as fc


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u.double() @ v.double()) / (float(u.double().norm()) * float(v.double().norm()))


def paper_select(attn: list[float], feats: torch.Tensor, T: int, r: float) -> list[int]:
    N = len(attn)
    n_imp = int(T * r)
    n_div = T - n_imp
    order = sorted(range(N), key=lambda i: (-attn[i], i))
    important, R = order[:n_imp], order[n_imp:]
    while n_div > 0:
        s = min(8, len(R) - n_div)
        if s <= 0:
            break
        a, b = R[0::2], R[1::2]
        score = [max(_cos(feats[i], feats[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda i: (-score[i], i))
        R = [a[i] for i in ranked[s:]] + b
    return sorted(important + (R if n_div > 0 else []))


def official_mask(attn: torch.Tensor, feats: torch.Tensor, T: int, r: float) -> torch.Tensor:
    """attn [H, N] (CLS row over the patches), feats [N, C] -> bool mask [N]."""
    n_imp = int(T * r)
    n_div = T - n_imp
    idx = attn.mean(0).argsort(descending=True, stable=True)
    imp, res = idx[:n_imp], idx[n_imp:]
    f = feats / feats.norm(dim=-1, keepdim=True)
    while n_div > 0:
        R = res.shape[0]
        s = min(8, R - n_div)
        if s <= 0:
            break
        x = f[res]
        score = (x[::2] @ x[1::2].T).max(dim=-1).values
        keep_a = score.argsort(descending=True, stable=True)[s:]
        res = torch.cat([res[::2][keep_a], res[1::2]])
    sel = torch.cat([imp, res]) if n_div > 0 else imp
    mask = torch.zeros(feats.shape[0], dtype=torch.bool)
    mask[sel] = True
    return mask


def run_tower(model, crop: torch.Tensor):
    """(output of the feature layer [T, D], its attention probabilities [H, T, T], its keys [T, H, d]) for one crop."""
    tm = fc.tower_layers(model)
    F = fc.feature_layer(model)
    with torch.no_grad():
        x = tm.pre_layrnorm(tm.embeddings(crop[None]))[0]
        for layer in tm.encoder.layers[: F + 1]:
            x, probs, _, k, _ = fc.clip_layer(layer, x)
    return x, probs, k


def encode(model, crops: torch.Tensor, T: int, r: float):
    feats, kept = [], []
    for c in range(crops.shape[0]):
        x, probs, _ = run_tower(model, crops[c])
        H, N = probs.shape[0], x.shape[0] - 1
        attn = [sum(float(probs[h, 0, j + 1]) for h in range(H)) / H for j in range(N)]
        idx = [0] + [i + 1 for i in paper_select(attn, x[1:], T, r)]
        feats.append(x[idx])
        kept.append(idx)
    return feats, kept
