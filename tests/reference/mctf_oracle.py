"""Independent reference for MCTF (Lee et al., arXiv 2403.10030) in a CLIP tower, one crop at a time.

Written from the paper, sharing no code with ``vlm_tokenprune``: plain Python loops over tokens for
the attention statistics, the similarities, the matching and the fusion; each encoder layer runs with
eager attention written out (``flowcut_vit_oracle.clip_layer``, the layers' own modules).

MCTF, as specified here, before each merging layer j that fuses r tokens (CLS = token 0 protected):
  * a_i = attention token i receives in layer j (its own map on the current tokens, logits + log size),
    averaged over heads and query tokens;
  * A = tokens 0, 2, 4, ...; B = tokens 1, 3, 5, ...; for a in A, b in B:
        W(a, b) = ((cos(x_a, x_b) + 1) / 2)^(1/t_sim) * (ia_a ia_b)^(1/t_info) * (is_a is_b)^(1/t_size)
    with ia = (1/a) / max(1/a), is = (1/size) / max(1/size) over the crop's tokens; W(CLS, .) = -inf;
  * r1 = r // 2 (bidirectional; else r): each A token's best B (first maximum); the r1 A tokens with the
    largest best values (ties: lower index) fuse into their B; the other A tokens stay, ascending;
  * r2 = r - r1: each B token's best remaining A (first maximum, by the same W); the r2 B tokens with the
    largest values (ties: lower index) fuse (with whatever fused into them) into that A token; the other
    B tokens stay, ordered by that value (largest first, ties: lower index);
  * a group's token = sum(w x) / sum(w) over its members (the current tokens that end there), w = a * size /
    max size; sizes add; the sequence is [staying A tokens, staying B tokens]; the layer then runs on it with
    log(size) added to every attention logit (proportional attention), as every later layer does.
"""
from __future__ import annotations

import math

import torch

from . import flowcut_vit_oracle as fc


def _halving_reaches(patches: int, keep: int, layers: int) -> bool:
    """Can ``layers`` merging layers, each fusing at most half of the patches it receives, bring
    ``patches`` down to ``keep``?"""
    for _ in range(layers):
        patches -= patches // 2
    return patches <= keep


def _schedule(model, keep: int, start: int, r: int) -> dict[int, int]:
    """Patch tokens fused in each merging layer ``start`` .. the feature layer of ``model``'s tower."""
    vc = model.config.vision_config
    return fusion_schedule((vc.image_size // vc.patch_size) ** 2, keep, list(range(start, fc.feature_layer(model) + 1)), r)


def fusion_schedule(patches: int, keep: int, layers: list[int], r: int) -> dict[int, int]:
    """Patch tokens fused in each merging layer of ``layers`` (CLS never fuses), from ``patches`` to ``keep``.

    The rule as documented (``mctf`` method docstring, README): a layer fuses at most half of the patch
    tokens it receives and never goes below ``keep``. ``r > 0`` (the paper's constant r per layer): r in
    every layer within those limits. ``r = 0``: the budget is reached exactly at the feature layer with the
    removals spread evenly and front-loaded: of all schedules that reach ``keep``, the lexicographically
    smallest in which every layer fuses at least its even share (rounded up) of what is still to remove.
    Found here by depth-first search in lexicographic order (the first complete schedule wins).
    """
    if r > 0:
        plan = {}
        for j in layers:
            plan[j] = min(r, patches // 2, max(patches - keep, 0))
            patches -= plan[j]
        return plan

    def search(i: int, have: int) -> list[int] | None:
        if i == len(layers):
            return [] if have == keep else None
        to_remove = have - keep
        share = -(-to_remove // (len(layers) - i))  # ceil
        for fuse in range(share, have // 2 + 1):
            if not _halving_reaches(have - fuse, keep, len(layers) - i - 1):
                continue  # the later layers could not reach keep from here
            rest = search(i + 1, have - fuse)
            if rest is not None:
                return [fuse] + rest
        return None

    if keep >= patches:
        return {j: 0 for j in layers}
    found = search(0, patches)
    if found is None:
        raise ValueError(f"keep={keep} of {patches} patches is out of reach of {len(layers)} halving layers")
    return dict(zip(layers, found))


def _fuse_crop(tokens: list[dict], probs: torch.Tensor, r: int, taus, bidirection: bool) -> list[dict]:
    H, T = probs.shape[0], probs.shape[1]
    a = [sum(float(probs[h, q, i]) for h in range(H) for q in range(T)) / (H * T) for i in range(T)]
    inv_a = [1 / v for v in a]
    inv_a = [v / max(inv_a) for v in inv_a]
    inv_s = [1 / t["size"] for t in tokens]
    inv_s = [v / max(inv_s) for v in inv_s]
    t_sim, t_info, t_size = taus
    A = list(range(0, T, 2))
    B = list(range(1, T, 2))

    def cos(i, j):
        u, v = tokens[i]["x"].double(), tokens[j]["x"].double()
        return float(u @ v) / (float(u.norm()) * float(v.norm()))

    def W(i, j):
        if i == 0:
            return -math.inf
        w = 1.0
        if t_sim:
            w *= ((cos(i, j) + 1) / 2) ** (1 / t_sim)
        if t_info:
            w *= (inv_a[i] * inv_a[j]) ** (1 / t_info)
        if t_size:
            w *= (inv_s[i] * inv_s[j]) ** (1 / t_size)
        return w

    Wm = {(i, j): W(i, j) for i in A for j in B}
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    best = {}
    for i in A:
        bj = B[0]
        for j in B:
            if Wm[(i, j)] > Wm[(i, bj)]:
                bj = j
        best[i] = (Wm[(i, bj)], bj)
    ranked = sorted(A, key=lambda i: (-best[i][0], i))
    fused_a = {i: best[i][1] for i in ranked[:r1]}
    stay_a = sorted(ranked[r1:])
    into = {i: j for i, j in fused_a.items()}  # member -> token it fuses into (one step)
    stay_b = B
    if bidirection:
        best2 = {}
        for j in B:
            bi = stay_a[0]
            for i in stay_a:
                if Wm[(i, j)] > Wm[(bi, j)]:
                    bi = i
            best2[j] = (Wm[(bi, j)], bi)
        ranked2 = sorted(B, key=lambda j: (-best2[j][0], j))
        for j in ranked2[:r2]:
            into[j] = best2[j][1]
        stay_b = ranked2[r2:]
    final = {}
    for t in range(T):
        d = t
        while d in into:
            d = into[d]
        final[t] = d
    size_max = max(t["size"] for t in tokens)
    out = []
    for s in stay_a + stay_b:
        members = [t for t in range(T) if final[t] == s]
        w = [a[t] * tokens[t]["size"] / size_max for t in members]
        x = sum(wi * tokens[t]["x"].double() for wi, t in zip(w, members)) / sum(w)
        out.append({"x": x.float(), "size": sum(tokens[t]["size"] for t in members), "ident": tokens[s]["ident"],
                    "src": sorted(u for t in members for u in tokens[t]["src"])})
    return out


def mctf_encode(model, crops: torch.Tensor, keep: int, *, start: int = 1, r: int = 0, taus=(1.0, 20.0, 40.0),
                bidirection: bool = True, prop_attn: bool = True):
    """Run the tower on ``crops`` with MCTF. Returns (features [n] of [T_F, D] at the feature layer,
    kept [n] of original token indices, sources [n] of per-token fused original indices, tokens per layer)."""
    tm = fc.tower_layers(model)
    F = fc.feature_layer(model)
    sched = _schedule(model, keep, start, r)
    with torch.no_grad():
        x0 = tm.pre_layrnorm(tm.embeddings(crops))
        crops_tok = [[{"x": x0[c, t], "size": 1.0, "ident": t, "src": [t]} for t in range(x0.shape[1])]
                     for c in range(x0.shape[0])]
        seen, merged = [], False
        for j, layer in enumerate(tm.encoder.layers[: F + 1]):
            for c, toks in enumerate(crops_tok):
                bias = [math.log(t["size"]) for t in toks] if prop_attn and merged else None
                if sched.get(j, 0):
                    X = torch.stack([t["x"] for t in toks])
                    _, probs, _, _, _ = fc.clip_layer(layer, X, [math.log(t["size"]) for t in toks] if prop_attn else None)
                    toks = _fuse_crop(toks, probs, sched[j], taus, bidirection)
                    bias = [math.log(t["size"]) for t in toks] if prop_attn else None
                X = torch.stack([t["x"] for t in toks])
                out = fc.clip_layer(layer, X, bias)[0]
                for t, row in zip(toks, out):
                    t["x"] = row
                crops_tok[c] = toks
            merged = merged or bool(sched.get(j, 0))
            seen.append(len(crops_tok[0]))
        seen += [seen[-1]] * (len(tm.encoder.layers) - F - 1)
    feats = [torch.stack([t["x"] for t in toks]) for toks in crops_tok]
    kept = [[t["ident"] for t in toks] for toks in crops_tok]
    sources = [[t["src"] for t in toks] for toks in crops_tok]
    return feats, kept, sources, seen
