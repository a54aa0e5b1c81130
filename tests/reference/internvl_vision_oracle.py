"""Independent reference for VisionZip (arXiv 2412.04467) and VisPruner (arXiv 2412.01818) on InternVL's
InternViT, at the granularity of pixel-shuffle groups; imports nothing from ``vlm_tokenprune``.

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


def internvit_layer(layer, x: torch.Tensor):
    """One InternViT layer on [T, D]: (output, probs [H, T, T], keys [T, H, d])."""
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
        p = torch.softmax(s, dim=-1)
        probs[head] = p
        out[:, head] = p @ v[:, head]
    x = x + layer.lambda_1 * at.projection_layer(out.reshape(T, D))
    x = x + layer.lambda_2 * layer.mlp(layer.layernorm_after(x))
    return x, probs, k


def feature_layer(model) -> int:
    n = model.config.vision_config.num_hidden_layers
    f = model.config.vision_feature_layer
    return n + f if f < 0 else f - 1


def run_tower(model, crop: torch.Tensor):
    tower = model.model.vision_tower
    with torch.no_grad():
        x = tower.embeddings(crop[None])[0]
        for layer in tower.encoder.layer[: feature_layer(model) + 1]:
            x, probs, k = internvit_layer(layer, x)
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


def reduced_rows(model, inputs: dict, method: str, T: int, param: float):
    """Per row: (embeds [n', D], original positions [n'], kept visual positions)."""
    cfg = model.config
    tiles = inputs["pixel_values"]
    G = len(groups(model))
    kept_tok, rep = [], []
    with torch.no_grad():
        for c in range(tiles.shape[0]):
            toks, stands = select_tile(model, tiles[c], method, T, param)
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
