"""Independent reference for SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417), batch size 1, no padding.

Written from the paper and the official algorithm (``Gumpest/SparseVLMs``) as read, sharing no code with
``vlm_tokenprune``: an eager deep copy run layer by layer without a cache (``eager_runner``), attention
probabilities rebuilt from the layer's own projections, plain Python loops for every choice.

Per stage at layer K (scores from layer K-1, whose output enters K):
  * raters, once, on the hidden states entering layer 0: for every image token v, a softmax over the
    text tokens t (every non-image token after the first image token) of <e_v, e_t>; m_t = the mean over
    v; raters = {t : m_t > mean(m)} (every text token when none is above);
  * R[r, v] = attention probability of rater r on visual token v in layer K-1 (RoPE at the tokens'
    positions, causal softmax over the whole row), averaged over heads; score(v) = mean over raters;
  * count: ``rank`` -> if rank(R) == n nothing happens, else k = min(int(rank * scale + bias), n - 1, cap),
    at least 1; ``topk`` -> k = the budget (nothing happens when it is >= n); the k best by score stay
    (ties: lower position);
  * recycling: the int(recycle * n_pruned) + 1 best pruned tokens (descending score) are clustered by
    DPC-kNN on layer K-1's output (distance / sqrt(D), density = exp(-mean of the squared distances to
    the c nearest) + noise, delta = distance to the nearest denser token, centres = top c of
    delta * density, each token to its nearest centre), c = n_sel // cluster_size + 1; noise = 1e-6 *
    ``torch.rand(n_sel)`` from a generator seeded with ``seed``; each cluster becomes the mean of its
    members, placed at its centre's position (the library's convention);
  * layers >= K run on the new sequence in position order with the tokens' positions (gaps).
"""
from __future__ import annotations

import math

import torch

from . import eager_runner as er


def raters_of(embeds: torch.Tensor, img_pos: list[int]) -> list[int]:
    e = embeds[0].double()
    img = set(img_pos)
    text = [t for t in range(min(img_pos), e.shape[0]) if t not in img]
    m = {t: 0.0 for t in text}
    for v in img_pos:
        logits = [float(e[v] @ e[t]) for t in text]
        top = max(logits)
        ex = [math.exp(x - top) for x in logits]
        s = sum(ex)
        for t, x in zip(text, ex):
            m[t] += x / s / len(img_pos)
    mean = sum(m.values()) / len(m)
    out = [t for t in text if m[t] > mean]
    return out or text


def attention_probs(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """``[H, T, T]`` causal softmax attention of decoder layer ``layer_idx`` on its input (tokens in sequence order)."""
    q, k, _ = er.head_projections(eager, layer_idx, hidden, pos, dtype=torch.float64)
    d = q.shape[-1]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    T = hidden.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def dpc_knn(x: list[torch.Tensor], c: int, noise: list[float]) -> list[tuple[int, list[int]]]:
    """Clusters of the points ``x`` (in order) as ``(centre index, member indices)``, centres in the official order."""
    n = len(x)
    D = x[0].numel()
    dist = [[float((x[i].double() - x[j].double()).norm()) / math.sqrt(D) for j in range(n)] for i in range(n)]
    density = []
    for i in range(n):
        near = sorted(dist[i])[:c]
        density.append(math.exp(-sum(v * v for v in near) / c) + noise[i])
    dmax = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        cand = [dist[i][j] for j in range(n) if density[j] > density[i]]
        delta.append(min(cand) if cand else dmax)
    score = [delta[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    members: dict[int, list[int]] = {ci: [] for ci in range(c)}
    for i in range(n):
        if i in centres:
            members[centres.index(i)].append(i)
            continue
        best = min(range(c), key=lambda ci: (dist[centres[ci]][i], ci))
        members[best].append(i)
    return [(centres[ci], members[ci]) for ci in range(c)]


def apply_stage(eager, stage: dict, h_in: torch.Tensor, h_out: torch.Tensor, seq: list[dict], raters: list[int],
                decision: dict | None):
    """One stage on the current sequence ``seq`` (entries: pos, visual, members); returns (new hidden, new seq, decision).

    ``decision`` (from the prompt run) replays the choice on a longer sequence (tokens appended after the prompt)."""
    pos = [e["pos"] for e in seq]
    if decision is None:
        decision = decide(eager, stage, h_in, h_out, seq, raters)
    if decision["noop"]:
        return h_out, seq, decision
    index = {p: i for i, p in enumerate(pos)}
    kept = set(decision["kept"])
    new_entries = []
    for i, e in enumerate(seq):
        if not e["visual"] or e["pos"] in kept:
            new_entries.append((e["pos"], h_out[0, i], e))
    for centre, group in decision["clusters"]:
        rows = [h_out[0, index[p]] for p in group]
        mean = torch.stack(rows).sum(0) / len(rows)
        members = sorted(m for p in group for m in seq[index[p]]["members"])
        new_entries.append((centre, mean, {"pos": centre, "visual": True, "members": members}))
    new_entries.sort(key=lambda t: t[0])
    hidden = torch.stack([t[1] for t in new_entries])[None]
    return hidden, [t[2] for t in new_entries], decision


def decide(eager, stage: dict, h_in, h_out, seq, raters) -> dict:
    pos = [e["pos"] for e in seq]
    vis = [i for i, e in enumerate(seq) if e["visual"]]
    n = len(vis)
    probs = attention_probs(eager, stage["layer"] - 1, h_in, pos)
    rows = [pos.index(t) for t in raters]
    H = probs.shape[0]
    R = torch.zeros(len(rows), n, dtype=torch.float64)
    for a, r in enumerate(rows):
        for b, v in enumerate(vis):
            R[a, b] = sum(float(probs[h, r, v]) for h in range(H)) / H
    score = {pos[v]: float(R[:, b].mean()) for b, v in enumerate(vis)}
    cap = min(stage["cap"], n)
    if stage["count"] == "rank":
        sv = torch.linalg.svdvals(R.float())
        tol = max(R.shape) * torch.finfo(torch.float32).eps * float(sv.max())
        rank = int((sv > tol).sum())
        if rank == n:
            return {"noop": True}
        k = min(int(rank * stage["scale"] + stage["bias"]), n - 1, cap)
    else:
        if cap >= n:
            return {"noop": True}
        k = cap
    k = max(k, 1)
    order = sorted(score, key=lambda p: (-score[p], p))
    kept = sorted(order[:k])
    pruned = sorted(order[k:])
    clusters: list[tuple[int, list[int]]] = []
    if stage["recycle"] > 0 and pruned:
        n_sel = min(int(len(pruned) * stage["recycle"]) + 1, len(pruned))
        chosen = sorted(pruned, key=lambda p: (-score[p], p))[:n_sel]
        c = n_sel // stage["cluster_size"] + 1
        gen = torch.Generator().manual_seed(stage["seed"])
        noise = (torch.rand(n_sel, generator=gen) * 1e-6).tolist()
        feats = [h_out[0, pos.index(p)] for p in chosen]
        for centre, group in dpc_knn(feats, c, noise):
            clusters.append((chosen[centre], [chosen[g] for g in group]))
    return {"noop": False, "kept": kept, "clusters": clusters, "rank_k": k}


def run(eager, embeds: torch.Tensor, img_pos: list[int], stages: list[dict], decisions: list | None = None):
    """``(logits [1, T', V], per-stage visual positions after it, per-stage sources, decisions)``."""
    lm = eager.model.language_model
    raters = raters_of(embeds, img_pos) if decisions is None else None
    img = set(img_pos)
    seq = [{"pos": p, "visual": p in img, "members": [p]} for p in range(embeds.shape[1])]
    hidden = embeds
    at = {st["layer"]: i for i, st in enumerate(stages)}
    kept_after, sources, made = [], [], []
    with torch.no_grad():
        h_prev = None
        for j in range(len(lm.layers)):
            if j in at:
                i = at[j]
                hidden, seq, dec = apply_stage(eager, stages[i], h_prev, hidden, seq, raters,
                                               None if decisions is None else decisions[i])
                made.append(dec)
                kept_after.append([e["pos"] for e in seq if e["visual"]])
                sources.append([e["members"] for e in seq if e["visual"]])
            h_prev = hidden
            hidden = er.run_layers(eager, hidden, [e["pos"] for e in seq], [j])
        return er.lm_logits(eager, hidden), kept_after, sources, made


def sparsevlm(model, inputs: dict, stages: list[dict]):
    eager = er.eager_copy(model)
    embeds = er.prompt_embeds(model, inputs)
    return run(eager, embeds, er.image_positions(model, inputs["input_ids"]), stages)


def sparsevlm_generate(model, inputs: dict, stages: list[dict], steps: int, rescore: bool, eos_token_id=None) -> list[int]:
    """Greedy tokens, whole sequence recomputed each step; the prompt's decisions replayed (a cache), or taken anew on
    the prompt and the tokens so far (``rescore``: a cache-free generate re-runs the prefill)."""
    eager = er.eager_copy(model)
    embeds = er.prompt_embeds(model, inputs)
    img_pos = er.image_positions(model, inputs["input_ids"])
    decisions = run(eager, embeds, img_pos, stages)[3]

    def logits_of(seq, step):
        return run(eager, seq, img_pos, stages, None if rescore else decisions)[0]

    return er.greedy(eager, embeds, steps, eos_token_id, logits_of)
