"""Independent reference for FlowCut's vision-encoder part (Tong et al., arXiv 2505.19536).

Written from the paper, sharing no code with ``vlm_tokenprune``: the CLIP tower is run layer by
layer with eager attention written out here (the layers' own q/k/v/out projections, norms and
MLPs), scores are plain Python loops over tokens and heads, one crop at a time.

FlowCut, as specified here. At every encoder layer ``idx`` whose crops hold more than K + 1 tokens:
  a_j    = mean over heads of softmax(q_CLS . k / sqrt(d))[j]         (patches j; the softmax covers CLS too)
  sem_j  = mean over heads of softmax(v_CLS . v)[j]                   (no scaling)
  dens_j = sum_e | mean over heads of v_j[e] |
  S_j    = (a_j / sum a + sem_j / sum sem) * dens_j;  S_cum = S at the first scored layer, then 0.5 S_cum + 0.5 S
With F = the feature layer and rpl = F - idx - 1, after layers with rpl >= 0 even:
  P = round((N - K) / sqrt(rpl) * (1 - (H(a / sum a) / log N)^2)), the largest over all crops of the batch
  (rpl = 0: everything above the target); kept = max(T - P, K + 1): CLS and the best kept - 1 patches
  by S_cum (ties: lower index), in their order; S_cum follows the kept patches.
The features are the output of layer F (CLS dropped for the ``default`` strategy), projected by the
model's projector; every placeholder of a dropped patch leaves the prompt. The reduced row then runs
through the language model (``pre_llm_oracle.row_logits``), positions ``gaps`` or ``repack``.
"""
from __future__ import annotations

import math

import torch


def tower_layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def feature_layer(model) -> int:
    n = model.config.vision_config.num_hidden_layers
    v = model.config.vision_feature_layer
    return n + v if v < 0 else v - 1


def clip_layer(layer, x: torch.Tensor, bias: list[float] | None = None):
    """One CLIP encoder layer on one crop ``x`` [T, D], eager; returns (out, probs [H][T][T] tensor, q, k, v [T, H, d]).

    ``bias``: per key token, added to every attention logit (proportional attention; None: none).
    """
    attn = layer.self_attn
    H = attn.num_heads
    T, D = x.shape
    d = D // H
    h = layer.layer_norm1(x)
    q = attn.q_proj(h).view(T, H, d)
    k = attn.k_proj(h).view(T, H, d)
    v = attn.v_proj(h).view(T, H, d)
    heads, probs = [], []
    for hh in range(H):
        logits = (q[:, hh] @ k[:, hh].T) * d ** -0.5
        if bias is not None:
            logits = logits + torch.tensor(bias, dtype=logits.dtype)[None, :]
        p = torch.softmax(logits, dim=-1)
        probs.append(p)
        heads.append(p @ v[:, hh])
    out = x + attn.out_proj(torch.cat(heads, dim=-1))
    out = out + layer.mlp(layer.layer_norm2(out))
    return out, torch.stack(probs), q, k, v


def flow_score(probs, v) -> tuple[list[float], list[float]]:
    """(a, S) over the patches 1..T-1 of one crop, plain loops."""
    H, T = probs.shape[0], probs.shape[1]
    a = [sum(float(probs[h, 0, j]) for h in range(H)) / H for j in range(1, T)]
    sem = []
    for j in range(1, T):
        tot = 0.0
        for h in range(H):
            logits = [float(v[0, h] @ v[t, h]) for t in range(T)]
            m = max(logits)
            z = sum(math.exp(x - m) for x in logits)
            tot += math.exp(logits[j] - m) / z
        sem.append(tot / H)
    dens = [sum(abs(float(e)) for e in v[j].mean(0)) for j in range(1, T)]
    sa, ss = sum(a), sum(sem)
    return a, [(a[i] / sa + sem[i] / ss) * dens[i] for i in range(T - 1)]


def prune_count(a: list[float], rpl: int, K: int) -> float:
    N = len(a)
    s = sum(a)
    ent = -sum(x / s * math.log(x / s) for x in a)
    return (N - K) / math.sqrt(rpl) * (1 - (ent / math.log(N)) ** 2)


def flowcut_encode(model, crops: torch.Tensor, K: int):
    """Run the tower on ``crops`` [n, 3, H, W] with FlowCut to K patches per crop.

    Returns (features [n] of [kept, D] at the feature layer incl. CLS, kept [n] of original token
    indices incl. CLS (0), tokens entering each encoder layer).
    """
    tm = tower_layers(model)
    F = feature_layer(model)
    with torch.no_grad():
        x = tm.pre_layrnorm(tm.embeddings(crops))
        xs = [x[c] for c in range(x.shape[0])]
        kept = [list(range(x.shape[1])) for _ in xs]
        cum: list[list[float] | None] = [None] * len(xs)
        seen = []
        for idx, layer in enumerate(tm.encoder.layers[: F + 1]):
            seen.append(xs[0].shape[0])
            res = [clip_layer(layer, xc) for xc in xs]
            xs = [r[0] for r in res]
            T = xs[0].shape[0]
            if T <= K + 1:
                continue
            scored = [flow_score(r[1], r[4]) for r in res]
            cum = [s if c is None else [0.5 * u + 0.5 * w for u, w in zip(c, s)] for c, (_, s) in zip(cum, scored)]
            rpl = F - idx - 1
            if rpl < 0 or rpl % 2:
                continue
            P = round(max(prune_count(a, rpl, K) for a, _ in scored)) if rpl else T
            n_keep = max(T - P, K + 1)
            for c in range(len(xs)):
                order = sorted(range(T - 1), key=lambda i: (-cum[c][i], i))[: n_keep - 1]
                top = sorted(order)
                xs[c] = torch.cat([xs[c][:1], xs[c][[i + 1 for i in top]]])
                kept[c] = [kept[c][0]] + [kept[c][i + 1] for i in top]
                cum[c] = [cum[c][i] for i in top]
        seen += [xs[0].shape[0]] * (len(tm.encoder.layers) - F - 1)
    return xs, kept, seen


def reduced_rows(model, inputs: dict, crops_features: list, crops_kept: list, crops_sources: list | None = None):
    """Per batch row: (embeds [n', D], original positions [n'], {position: sources}) after the vision reduction.

    ``crops_features[c]`` [kept, D] (tower width, CLS first) with original token indices ``crops_kept[c]``;
    ``crops_sources[c][i]``: the original token indices fused into kept token i (default: itself).
    Every placeholder of a patch that is not kept leaves the prompt; a kept token's placeholder gets its
    projected feature and stands for the placeholders of its sources.
    """
    cfg = model.config
    N = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    off = 1 if cfg.vision_feature_select_strategy == "default" else 0
    width = N + 1 - off
    n = len(crops_kept)
    feats = torch.zeros(n, width, cfg.text_config.hidden_size)
    ids = torch.zeros(n, width, 2)  # (crop, slot) of every slot, packed like the features
    rep_of = {}  # (crop, slot) -> slot of the kept token it lives in
    with torch.no_grad():
        for c in range(n):
            proj = model.model.multi_modal_projector(crops_features[c][off:])
            for i, t in enumerate(crops_kept[c][off:]):
                feats[c, t - off] = proj[i]
                srcs = crops_sources[c][i + off] if crops_sources is not None else [t]
                for s in srcs:
                    if s - off >= 0:
                        rep_of[(c, s - off)] = t - off
            for s in range(width):
                ids[c, s, 0], ids[c, s, 1] = c, s
        if cfg.model_type == "llava_next":
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            counts = [image_size_to_num_patches(sz, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                      for sz in inputs["image_sizes"]]
            f_list = list(torch.split(feats, counts))
            i_list = list(torch.split(ids, counts))
            nl = model.model.image_newline
            f_packed, _ = model.model.pack_image_features(f_list, inputs["image_sizes"], "default", image_newline=nl)
            i_packed, _ = model.model.pack_image_features(i_list, inputs["image_sizes"], "default",
                                                          image_newline=torch.tensor([-1.0, -1.0]))
            flat_f, flat_i = torch.cat(list(f_packed)), torch.cat(list(i_packed)).round().long()
        else:
            flat_f, flat_i = feats.reshape(-1, feats.shape[-1]), ids.reshape(-1, 2).round().long()
        where = {(int(c), int(s)): j for j, (c, s) in enumerate(flat_i.tolist()) if s >= 0}
        rows = []
        j = 0
        ids_all, mask = inputs["input_ids"], inputs["attention_mask"]
        for b in range(ids_all.shape[0]):
            tok = ids_all[b][mask[b].bool()]
            emb = model.get_input_embeddings()(tok)
            keep_x, keep_pos, sources = [], [], {}
            feat_pos = {}  # flat feature index -> position in this row
            for p in range(len(tok)):
                if int(tok[p]) == cfg.image_token_id:
                    feat_pos[j] = p
                    c, s = flat_i[j].tolist()
                    if s < 0 or rep_of.get((c, s)) == s:  # image_newline, or a kept token's own slot
                        keep_x.append(flat_f[j])
                        keep_pos.append(p)
                    j += 1
                else:
                    keep_x.append(emb[p])
                    keep_pos.append(p)
            for jj, p in feat_pos.items():
                c, s = flat_i[jj].tolist()
                if s < 0:
                    sources.setdefault(p, []).append(p)
                    continue
                r = rep_of.get((c, s))
                if r is None or (c, r) not in where or where[(c, r)] not in feat_pos:
                    continue
                sources.setdefault(feat_pos[where[(c, r)]], []).append(p)
            rows.append((torch.stack(keep_x), keep_pos, {p: sorted(v) for p, v in sources.items() if p in keep_pos}))
    return rows


def all_crops(model, inputs: dict) -> torch.Tensor:
    """The tower's input: every image (LLaVA-1.5) or every crop of every image (LLaVA-NeXT), in order."""
    pv = inputs["pixel_values"]
    if model.config.model_type != "llava_next":
        return pv
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    counts = [image_size_to_num_patches(sz, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
              for sz in inputs["image_sizes"]]
    return torch.cat([pv[i, :c] for i, c in enumerate(counts)])
