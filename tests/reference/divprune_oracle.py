"""Independent references for DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175).

``paper_select``: the Max-Min Diversity greedy as the paper states it, plain Python loops over
tokens (cosine distance d(i, j) = 1 - <v_i, v_j> / (|v_i| |v_j|)): the first token is the one whose
nearest neighbour is farthest; each next token maximises its distance to the closest selected one
(first index on ties); a selected token is never selected again.

``official_select``: the official algorithm (vbdi/divprune ``llava_arch.py: DivPrune``) re-written
from its description, in its tensor form: the full ``1 - cos`` matrix, the first pick from each
column's second-smallest value (``topk(2, largest=False)``), then ``argmax`` of the column minima over
the selected rows. It can re-pick a selected token only when every other token duplicates a
selected one (distance 0): the tests stay away from that case.
"""
from __future__ import annotations

import math

import torch

from . import pre_llm_oracle


def _dist(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return 1.0 - float(u @ v) / (float(u.norm()) * float(v.norm()))


def paper_select(x: torch.Tensor, k: int) -> list[int]:
    """Pick order of ``k`` rows of ``x`` [N, D] (plain loops, float64 distances)."""
    n = x.shape[0]
    d = [[_dist(x[i], x[j]) for j in range(n)] for i in range(n)]
    if k <= 0:
        return []
    if n == 1:
        return [0]
    best, first = -math.inf, 0
    for j in range(n):
        nn = min(d[i][j] for i in range(n) if i != j)
        if nn > best:
            best, first = nn, j
    picked = [first]
    while len(picked) < min(k, n):
        best, nxt = -math.inf, None
        for j in range(n):
            if j in picked:
                continue
            s = min(d[p][j] for p in picked)
            if s > best:
                best, nxt = s, j
        picked.append(nxt)
    return picked


def official_select(x: torch.Tensor, k: int) -> list[int]:
    """The official tensor algorithm (fp32 as given)."""
    f = x / x.norm(dim=1, keepdim=True)
    m = 1.0 - f @ f.T
    s: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(m, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m[torch.tensor(s)], dim=0).values
        s.append(int(torch.argmax(scores)))
    return s


def split(k: int, sizes: list[int]) -> list[int]:
    """A row's budget over its images, in proportion, largest remainder (earlier image first on ties)."""
    total = sum(sizes)
    raw = [k * s / total for s in sizes]
    out = [min(s, math.floor(r)) for r, s in zip(raw, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    left = k - sum(out)
    while left > 0:
        for i in order:
            if left and out[i] < sizes[i]:
                out[i] += 1
                left -= 1
    return out


def kept_row(model, inputs: dict, b: int, keep: float) -> list[int]:
    """Original positions (in the unpadded row) DivPrune keeps before the LLM."""
    emb, ids = pre_llm_oracle.row_embeds(model, inputs, b)
    cfg = model.config
    per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    images = pre_llm_oracle.images_of(ids, cfg.image_token_id, per_image)
    n = sum(len(im) for im in images)
    if not n:
        return []
    quota = split(max(1, math.floor(keep * n + 0.5)), [len(im) for im in images])
    kept = []
    for im, q in zip(images, quota):
        kept += [im[i] for i in paper_select(emb[im], q)]
    return sorted(kept)
