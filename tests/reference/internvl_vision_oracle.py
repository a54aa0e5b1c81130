"""Independent reference for VisionZip (arXiv 2412.04467), VisPruner (arXiv 2412.01818), FlowCut's ViT stage
(arXiv 2505.19536, ``flowcut_encode``) and MCTF (arXiv 2403.10030, ``mctf_encode``) on InternVL's InternViT, at the granularity of pixel-shuffle groups;
imports nothing from ``vlm_tokenprune``.

* ``groups``: which patches form which LLM token, found by feeding patch indices (one channel) through the
  model's own ``pixel_shuffle``; ``pack`` concatenates a group's patch features in that order (checked
  against the model's shuffle of real features by the test).
* ``run_tower``: InternViT written out layer by layer (eager softmax attention, the layer's own linear /
  norm / MLP modules): ``x + lambda_1 * attn(layernorm_before(x))``, then ``+ lambda_2 * mlp(layernorm_after)``;
  returns the feature layer's output, its attention probabilities and its keys (after ``k_norm``).
* Scores per the papers at the feature layer, per patch: CLS attention summed over heads (VisionZip) or
  averaged over heads (VisPruner); a group's score is the SUM over its patches; a group's feature (key) is
  the concatenation of its patches' features (head-mean keys). The papers' selections then run on groups as
  tokens (``vispruner_oracle.paper_select``, ``visionzip_oracle.paper_zip``): a budget ``T`` counts groups
  (LLM tokens) per tile; a contextual group is its target plus the mean of its members, patch by patch.
* ``reduced_rows``: the kept groups of every tile packed, projected, spliced into each row in place of their
  placeholders (a merged group at its target's), other placeholders removed; the row then runs through the
  language model (``pre_llm_oracle.row_logits`` / ``greedy``).
"""
from __future__ import annotations

import math

import torch

from . import visionzip_oracle as vz
from . import vispruner_oracle as vp


def side_of(model) -> int:
    vc = model.config.vision_config
    return vc.image_size[0] // vc.patch_size[0]


def groups(model) -> list[list[int]]:
    """Patch indices (raster, 0-based) packed into each LLM token, in channel order."""
    s = side_of(model)
    coded = torch.arange(s * s, dtype=torch.float64).reshape(1, s, s, 1)
    with torch.no_grad():
        out = model.model.pixel_shuffle(coded, scale_factor=model.config.downsample_ratio)
    out = out.reshape(-1, out.shape[-1])
    return [[int(round(float(v))) for v in row] for row in out]


def pack(x: torch.Tensor, members: list[int]) -> torch.Tensor:
    """One LLM token's input from patch features ``x`` [N, D]: its patches' features one after the other."""
    return torch.cat([x[p] for p in members])


def internvit_layer(layer, x: torch.Tensor, bias: list[float] | None = None):
    """One InternViT layer on [T, D]: (output, probs [H, T, T], keys [T, H, d], values [T, H, d]); ``bias``: per key
    token, added to every attention logit (MCTF's proportional attention)."""
    at = layer.attention
    T, D = x.shape
    H = at.num_heads
    d = D // H
    h = layer.layernorm_before(x)
    q = at.q_norm(at.q_proj(h)).view(T, H, d)
    k = at.k_norm(at.k_proj(h)).view(T, H, d)
    v = at.v_proj(h).view(T, H, d)
    probs = torch.zeros(H, T, T)
    out = torch.zeros(T, H, d)
    for head in range(H):
        s = (q[:, head] @ k[:, head].T) * at.scale
        if bias is not None:
            s = s + torch.tensor(bias, dtype=s.dtype)[None, :]
        p = torch.softmax(s, dim=-1)
        probs[head] = p
        out[:, head] = p @ v[:, head]
    x = x + layer.lambda_1 * at.projection_layer(out.reshape(T, D))
    x = x + layer.lambda_2 * layer.mlp(layer.layernorm_after(x))
    return x, probs, k, v


def feature_layer(model) -> int:
    n = model.config.vision_config.num_hidden_layers
    f = model.config.vision_feature_layer
    return n + f if f < 0 else f - 1


def run_tower(model, crop: torch.Tensor):
    tower = model.model.vision_tower
    with torch.no_grad():
        x = tower.embeddings(crop[None])[0]
        for layer in tower.encoder.layer[: feature_layer(model) + 1]:
            x, probs, k, _ = internvit_layer(layer, x)
    return x, probs, k


def select_tile(model, crop: torch.Tensor, method: str, T: int, param: float):
    """One tile: ({kept group: its packed token input [g * D]}, {kept group: the groups it stands for})."""
    x, probs, k = run_tower(model, crop)
    grp = groups(model)
    G, H = len(grp), probs.shape[0]
    patches = x[1:]
    per_patch = [sum(float(probs[h, 0, 1 + p]) for h in range(H)) for p in range(patches.shape[0])]
    if method == "vispruner":
        per_patch = [a / H for a in per_patch]
    score = [sum(per_patch[p] for p in m) for m in grp]
    feats = torch.stack([pack(patches, m) for m in grp])  # [G, g * D]
    if T >= G:
        return {q: feats[q] for q in range(G)}, {q: [q] for q in range(G)}
    if method == "vispruner":
        kept = vp.paper_select(score, feats, T, param)
        return {q: feats[q] for q in kept}, {q: [q] for q in kept}
    n_ctx = min(T - 1, max(0, round(T * param))) if T > 1 else 0
    n_dom = T - n_ctx
    # VisionZip's selection with groups as tokens: token 0 a dummy CLS whose attention row holds the group scores
    xs = torch.cat([torch.zeros(1, feats.shape[1]), feats])
    pr = torch.zeros(1, G + 1, G + 1)
    pr[0, 0, 1:] = torch.tensor(score)
    keys = k[1:].mean(1)  # [N, d] head-mean keys
    ks = torch.cat([torch.zeros(1, keys.shape[1] * len(grp[0])), torch.stack([pack(keys, m) for m in grp])])[:, None]
    toks, idx, src = vz.paper_zip(xs, pr, ks, n_dom, n_ctx)
    return ({i - 1: toks[j] for j, i in enumerate(idx) if i},
            {i - 1: [s - 1 for s in src[j]] for j, i in enumerate(idx) if i})


def flowcut_encode(model, tiles: torch.Tensor, K: int):
    """FlowCut's ViT stage (``flowcut_vit_oracle``'s rules) over whole groups, every tile of the batch together:
    after layer ``idx`` (while a tile holds more than K groups) each patch's flow score ``S`` and CLS attention
    ``a`` (plain loops, ``flowcut_vit_oracle.flow_score``), ``S_cum`` per patch; at the pruning layers a group's
    ``a`` and ``S_cum`` are the sums over its patches, ``P`` (``prune_count`` on the group attentions, N = the
    current groups) is the largest over the tiles (forced to K at the last), the ``max(U - P, K)`` groups of
    largest summed ``S_cum`` (ties: lower group) keep all their patches. Returns (per tile (tokens, stands) as
    ``select_tile``, tokens entering each encoder layer)."""
    from . import flowcut_vit_oracle as fc

    tower = model.model.vision_tower
    F = feature_layer(model)
    grp = groups(model)
    group_of = {p: q for q, m in enumerate(grp) for p in m}
    n = tiles.shape[0]
    with torch.no_grad():
        xs = [tower.embeddings(tiles[c:c + 1])[0] for c in range(n)]
        kept = [list(range(xs[0].shape[0])) for _ in range(n)]  # original token index (0 = CLS, 1 + patch)
        cum: list = [None] * n
        seen = []
        for idx, layer in enumerate(tower.encoder.layer[: F + 1]):
            seen.append(len(kept[0]))
            res = [internvit_layer(layer, x) for x in xs]
            xs = [r[0] for r in res]
            cur = [sorted({group_of[t - 1] for t in kc[1:]}) for kc in kept]
            if len(cur[0]) <= K:
                continue
            scored = [fc.flow_score(r[1], r[3]) for r in res]
            cum = [sc if cm is None else [0.5 * u + 0.5 * w for u, w in zip(cm, sc)] for cm, (_, sc) in zip(cum, scored)]
            rpl = F - idx - 1
            if rpl < 0 or rpl % 2:
                continue
            ga = [{q: 0.0 for q in cur[c]} for c in range(n)]
            gc = [{q: 0.0 for q in cur[c]} for c in range(n)]
            for c in range(n):
                for i, t in enumerate(kept[c][1:]):
                    ga[c][group_of[t - 1]] += scored[c][0][i]
                    gc[c][group_of[t - 1]] += cum[c][i]
            U = len(cur[0])
            P = round(max(fc.prune_count([ga[c][q] for q in cur[c]], rpl, K) for c in range(n))) if rpl else U
            n_keep = max(U - P, K)
            for c in range(n):
                top = set(sorted(cur[c], key=lambda q: (-gc[c][q], q))[:n_keep])
                stay = [i for i, t in enumerate(kept[c][1:]) if group_of[t - 1] in top]
                xs[c] = torch.cat([xs[c][:1], xs[c][[i + 1 for i in stay]]])
                kept[c] = [0] + [kept[c][i + 1] for i in stay]
                cum[c] = [cum[c][i] for i in stay]
        seen += [len(kept[0])] * (len(tower.encoder.layer) - F - 1)
    out = []
    for c in range(n):
        at = {t - 1: xs[c][i] for i, t in enumerate(kept[c]) if t}
        qs = sorted({group_of[p] for p in at})
        out.append(({q: torch.cat([at[p] for p in grp[q]]) for q in qs}, {q: [q] for q in qs}))
    return out, seen


def mctf_encode(model, tiles: torch.Tensor, keep: int, *, start: int = 1, r: int = 0, taus=(1.0, 20.0, 40.0),
                bidirection: bool = True, prop_attn: bool = True):
    """MCTF (``mctf_oracle``'s rules) with CLS and whole groups as its units, one tile at a time: a group unit's
    feature is its patches' features concatenated (cosine on that), its informativeness the SUM of the attention
    its patches receive (heads and queries averaged over the tile's current tokens), its size the original groups
    it holds; the schedule counts groups (``mctf_oracle.fusion_schedule`` on G groups); fusion averages the member
    groups' concatenated features (so patch by patch); every patch token of a unit carries its size in the
    proportional attention (``+ log size``). Unit order and A / B split as ``mctf_oracle._fuse_crop`` (CLS first,
    then the groups in raster order). Returns (per tile (tokens, stands) as ``select_tile``, tokens per layer)."""
    from . import mctf_oracle as mo

    tower = model.model.vision_tower
    F = feature_layer(model)
    grp = groups(model)
    g = len(grp[0])
    sched = mo.fusion_schedule(len(grp), keep, list(range(start, F + 1)), r)

    def flat(units):
        X = torch.cat([u["x"].view(-1, units[0]["x"].shape[0]) for u in units])
        bias = [math.log(units[0]["size"])] + [math.log(u["size"]) for u in units[1:] for _ in range(g)]
        return X, bias

    out, seen = [], []
    with torch.no_grad():
        for c in range(tiles.shape[0]):
            x0 = tower.embeddings(tiles[c:c + 1])[0]
            units = [{"x": x0[0], "size": 1.0, "ident": -1, "src": [-1]}] + [
                {"x": pack(x0[1:], m), "size": 1.0, "ident": q, "src": [q]} for q, m in enumerate(grp)]
            merged, tile_seen = False, []
            for j, layer in enumerate(tower.encoder.layer[: F + 1]):
                if sched.get(j, 0):
                    X, bias = flat(units)
                    _, probs, _, _ = internvit_layer(layer, X, bias if prop_attn else None)
                    H, T = probs.shape[0], probs.shape[1]
                    a_tok = [sum(float(probs[h, q, i]) for h in range(H) for q in range(T)) / (H * T) for i in range(T)]
                    a_unit = [a_tok[0]] + [sum(a_tok[1 + u * g + m] for m in range(g)) for u in range(len(units) - 1)]
                    U = len(a_unit)  # mctf_oracle reads a_i as the mean over one head's U query rows: rows of a_unit
                    units = mo._fuse_crop(units, torch.tensor([a_unit] * U, dtype=torch.float64)[None], sched[j], taus,
                                          bidirection)
                    merged = True
                X, bias = flat(units)
                y = internvit_layer(layer, X, bias if prop_attn and merged else None)[0]
                units[0]["x"] = y[0]
                for u, unit in enumerate(units[1:]):
                    unit["x"] = y[1 + u * g: 1 + (u + 1) * g].reshape(-1)
                tile_seen.append(X.shape[0])
            seen = tile_seen + [tile_seen[-1]] * (len(tower.encoder.layer) - F - 1)
            out.append(({u["ident"]: u["x"] for u in units[1:]}, {u["ident"]: u["src"] for u in units[1:]}))
    return out, seen


def encode(model, tiles: torch.Tensor, method: str, T: int, param: float) -> list:
    """Per tile: (tokens, stands) as ``select_tile``; FlowCut runs all tiles together."""
    if method == "flowcut_vit":
        return flowcut_encode(model, tiles, T)[0]
    if method == "mctf":
        return mctf_encode(model, tiles, T)[0]
    return [select_tile(model, tiles[c], method, T, param) for c in range(tiles.shape[0])]


def reduced_rows(model, inputs: dict, method: str, T: int, param: float, encoded: list | None = None):
    """Per row: (embeds [n', D], original positions [n'], kept visual positions); ``encoded``: ``encode``'s result
    when already computed."""
    cfg = model.config
    tiles = inputs["pixel_values"]
    G = len(groups(model))
    kept_tok, rep = [], []
    with torch.no_grad():
        for toks, stands in (encoded if encoded is not None else encode(model, tiles, method, T, param)):
            kept_tok.append({q: model.model.multi_modal_projector(t[None, None])[0, 0] for q, t in toks.items()})
            rep.append({s: q for q, ss in stands.items() for s in ss})
        rows, j = [], 0
        for b in range(inputs["input_ids"].shape[0]):
            ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
            emb = model.get_input_embeddings()(ids)
            xs, pos, vis = [], [], []
            for p in range(len(ids)):
                if int(ids[p]) == cfg.image_token_id:
                    c, q = divmod(j, G)
                    j += 1
                    if q in kept_tok[c]:
                        xs.append(kept_tok[c][q])
                        pos.append(p)
                        vis.append(p)
                else:
                    xs.append(emb[p])
                    pos.append(p)
            rows.append((torch.stack(xs), pos, vis))
    return rows


def row_sources(model, inputs: dict, encoded: list) -> list[list[list[int]]]:
    """Per row, per kept visual token (in order): the positions of the placeholders whose groups it stands for."""
    cfg = model.config
    G = len(groups(model))
    rep = [{s: q for q, ss in stands.items() for s in ss} for _, stands in encoded]
    out, j = [], 0
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        where, srcs = {}, {}
        for p in range(len(ids)):
            if int(ids[p]) == cfg.image_token_id:
                c, q = divmod(j, G)
                j += 1
                where[(c, q)] = p
                srcs.setdefault((c, rep[c][q]), []).append(p)
        out.append([sorted(srcs[key]) for key in sorted(srcs, key=lambda k: where[k])])
    return out
