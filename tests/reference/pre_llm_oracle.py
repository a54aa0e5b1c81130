"""Independent reference for pre-LLM reduction and AIM stage A (Zhong et al., arXiv 2412.03248), one row at a time.

Written from the paper, sharing no code with ``vlm_tokenprune``: plain Python loops over tokens,
torch only for vector arithmetic, and the Hugging Face model's own modules.

AIM stage A, as specified here, on the projected visual features of each image:
  * per iteration, split the image's current tokens alternately into A (even) and B (odd);
    each A token picks the B token of highest cosine similarity (first on ties);
  * the r most similar A tokens (r = min(n // 2, n - k), stable rank) are fused into their B
    token: plain mean of the B token and its A tokens (``mean``), or the average weighted by
    how many original tokens each stands for (``size``); sizes add;
  * order: ``spatial`` keeps survivors in their original order; ``paper`` emits
    [unmerged A in rank order, B in order];
  * iterate until the image holds k tokens; a row's budget max(1, floor(keep * n + 0.5)) is
    split over its images in proportion (largest remainder, earlier image first), >= 1 each.
A pre-LLM prune keeps a given set. The row then runs through the language model with
position ids = the surviving tokens' original ones (``gaps``) or 0..n-1 (``repack``);
decoding continues at the original length (gaps) or the kept length (repack), no KV cache.

Qwen2-VL / Qwen2.5-VL (``qwen_*``): every image and every video frame is a patch grid; kept tokens
keep their 3-D M-RoPE positions (temporal, height, width) as the unpatched model assigns them, and
decoding continues on every axis at the unreduced prompt's largest position + 1.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch


def row_embeds(model, inputs: dict, b: int):
    """(embeds [n, D], ids [n]) of row ``b``'s real tokens: text embeddings, image features in the slots."""
    cfg = model.config
    ids_all, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        feats = getattr(feats, "pooler_output", feats)
        per_image = [f for f in feats]
        n_before = sum(int((ids_all[r] == cfg.image_token_id).sum()) for r in range(b))
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in per_image])
        ids = ids_all[b][mask[b].bool()]
        emb = model.get_input_embeddings()(ids).clone()
        j = n_before
        for i in range(len(ids)):
            if int(ids[i]) == cfg.image_token_id:
                emb[i] = flat[j]
                j += 1
    return emb, ids


def images_of(ids, image_token_id: int, per_image: int) -> list[list[int]]:
    """Positions of each image's tokens (consecutive runs cut into blocks of ``per_image``)."""
    pos = [i for i in range(len(ids)) if int(ids[i]) == image_token_id]
    return [pos[i:i + per_image] for i in range(0, len(pos), per_image)]


def split(k: int, sizes: list[int]) -> list[int]:
    """A row's budget ``k`` over its images of ``sizes`` tokens, as documented: in proportion to size by
    the largest-remainder (Hamilton) apportionment, in exact fractions: each image gets the whole part of
    its share k * size / total, the seats left over go one each to the largest remainders (the earlier
    image first on equal remainders); every image keeps at least one token."""
    total = sum(sizes)
    assert 0 <= k <= total, (k, sizes)
    shares = [Fraction(k * n, total) for n in sizes]
    seats = [int(share) for share in shares]  # whole parts (shares are >= 0)
    leftover = k - sum(seats)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (shares[i] - seats[i], -i), reverse=True)
    for i in by_remainder[:leftover]:
        seats[i] += 1
    return [max(1, n) for n in seats]


def _cos(u, v) -> float:
    return float((u / u.norm()) @ (v / v.norm()))


def aim_merge_image(tokens: list[dict], k: int, mode: str, order: str) -> list[dict]:
    """tokens: dicts {x, size, pos (representative original position), src (original positions)}."""
    while len(tokens) > k:
        n = len(tokens)
        r = min(n // 2, n - k)
        if r <= 0:
            break
        A, Bt = tokens[0::2], tokens[1::2]
        best = []
        for a in A:
            bj, bs = 0, -float("inf")
            for j, bt in enumerate(Bt):
                s = _cos(a["x"].float(), bt["x"].float())
                if s > bs:
                    bj, bs = j, s
            best.append((bs, bj))
        rank = sorted(range(len(A)), key=lambda i: -best[i][0])  # stable: ties to the lower index
        merged_into = {i: best[i][1] for i in rank[:r]}
        unmerged = rank[r:]
        newB = []
        for j, bt in enumerate(Bt):
            group = [bt] + [A[i] for i in sorted(merged_into) if merged_into[i] == j]
            if mode == "mean":
                x = sum(t["x"] for t in group) / len(group)
            else:
                x = sum(t["x"] * t["size"] for t in group) / sum(t["size"] for t in group)
            newB.append({"x": x, "size": sum(t["size"] for t in group), "pos": bt["pos"],
                         "src": sorted(s for t in group for s in t["src"])})
        keepA = [A[i] for i in unmerged]
        tokens = keepA + newB if order == "paper" else sorted(keepA + newB, key=lambda t: t["pos"])
    return tokens


def reduce_row(model, inputs: dict, b: int, keep: float, *, merge: dict | None = None, kept: list[int] | None = None):
    """Row ``b`` reduced: ``merge={'mode':..., 'order':...}`` (AIM) or ``kept`` (original positions, prune).

    Returns (embeds [n', D], original positions [n'], sources {original position: [sources]} of visual tokens).
    Positions are indices into the row's real (unpadded) tokens.
    """
    emb, ids = row_embeds(model, inputs, b)
    cfg = model.config
    per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    images = images_of(ids, cfg.image_token_id, per_image)
    vis = {p for im in images for p in im}
    out = []  # (x, pos, src)
    if kept is not None:
        for i in range(len(ids)):
            if i not in vis or i in kept:
                out.append({"x": emb[i], "pos": i, "src": [i]})
    else:
        n = len(vis)
        k_row = max(1, math.floor(keep * n + 0.5))
        quota = split(k_row, [len(im) for im in images]) if images else []
        merged = {}
        for im, q in zip(images, quota):
            toks = [{"x": emb[p], "size": 1.0, "pos": p, "src": [p]} for p in im]
            merged[im[0]] = aim_merge_image(toks, q, merge["mode"], merge["order"])
        for i in range(len(ids)):
            if i in merged:
                out += merged[i]
            elif i not in vis:
                out.append({"x": emb[i], "pos": i, "src": [i]})
    x = torch.stack([t["x"] for t in out])
    pos = [t["pos"] for t in out]
    sources = {t["pos"]: t["src"] for t in out if t["pos"] in vis}
    return x, pos, sources


def _logits(model, x, pos):
    with torch.no_grad():
        h = model.model.language_model(inputs_embeds=x[None], position_ids=torch.tensor(pos)[None]).last_hidden_state
        return model.lm_head(h)[0]


def row_logits(model, x, pos, positions: str):
    """Logits [n', V] of the reduced row."""
    p = pos if positions == "gaps" else list(range(len(pos)))
    return _logits(model, x, p)


def greedy(model, x, pos, positions: str, n_orig: int, steps: int) -> list[int]:
    """Greedy tokens after the reduced row, each step a fresh forward (no cache)."""
    p = list(pos) if positions == "gaps" else list(range(len(pos)))
    nxt = n_orig if positions == "gaps" else len(pos)
    out = []
    for _ in range(steps):
        tok = int(_logits(model, x, p)[-1].argmax())
        out.append(tok)
        with torch.no_grad():
            e = model.get_input_embeddings()(torch.tensor([tok]))
        x = torch.cat([x, e])
        p.append(nxt)
        nxt += 1
    return out


# ----------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL: 3-D M-RoPE positions (temporal, height, width)
# ----------------------------------------------------------------------------------------------
def qwen_groups(model, inputs: dict) -> list[list[int]]:
    """Positions of each patch grid of a single unpadded row: every image is one grid, every video frame one.

    Runs of image / video placeholders are the items in prompt order; the k-th image run takes the k-th
    ``image_grid_thw`` row, the k-th video run the k-th ``video_grid_thw`` row, each ``[t, H, W]`` in vision
    patches (``h = H / merge`` x ``w = W / merge`` LLM tokens per frame).
    """
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    ids = inputs["input_ids"][0].tolist()
    grids = {cfg.image_token_id: list(inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist()),
             cfg.video_token_id: list(inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist())}
    groups, i = [], 0
    while i < len(ids):
        if ids[i] not in grids:
            i += 1
            continue
        t, H, W = grids[ids[i]].pop(0)
        frame = (H // merge) * (W // merge)
        for f in range(int(t)):
            groups.append(list(range(i + f * frame, i + (f + 1) * frame)))
        i += int(t) * frame
    return groups


def qwen_reduce(model, inputs: dict, keep: float, *, merge: dict | None = None, kept: list[int] | None = None):
    """A single unpadded Qwen row reduced (AIM merge per patch grid, or a given ``kept`` set).

    Returns (embeds [n', D], 3-D positions [3, n'] (each token's representative's own: gaps), original
    positions [n'], sources {original position: [sources]}, next position after the unreduced prompt).
    """
    from .fastv_qwen_oracle import prompt_inputs

    emb, pos3 = prompt_inputs(model, inputs)
    emb = emb[0]
    groups = qwen_groups(model, inputs)
    vis = {p for g in groups for p in g}
    out = []
    if kept is not None:
        out = [{"x": emb[i], "pos": i, "src": [i]} for i in range(emb.shape[0]) if i not in vis or i in kept]
    else:
        k_row = max(1, math.floor(keep * len(vis) + 0.5))
        quota = split(k_row, [len(g) for g in groups])
        merged = {}
        for g, q in zip(groups, quota):
            toks = [{"x": emb[p], "size": 1.0, "pos": p, "src": [p]} for p in g]
            merged[g[0]] = aim_merge_image(toks, q, merge["mode"], merge["order"])
        for i in range(emb.shape[0]):
            if i in merged:
                out += merged[i]
            elif i not in vis:
                out.append({"x": emb[i], "pos": i, "src": [i]})
    x = torch.stack([t["x"] for t in out])
    pos = [t["pos"] for t in out]
    sources = {t["pos"]: t["src"] for t in out if t["pos"] in vis}
    return x, pos3[:, pos], pos, sources, int(pos3.max()) + 1


def qwen_logits(model, x: torch.Tensor, pos3: torch.Tensor) -> torch.Tensor:
    """Logits [n', V] of the reduced row on an eager copy; M-RoPE rebuilt from ``pos3`` by the FastV-Qwen oracle."""
    from .fastv_qwen_oracle import eager_copy, run_layers

    eager = eager_copy(model)
    lm = eager.model.language_model
    with torch.no_grad():
        h = run_layers(model, eager, x[None], pos3, range(len(lm.layers)))
        return eager.lm_head(lm.norm(h))[0]


def qwen_greedy(model, x: torch.Tensor, pos3: torch.Tensor, nxt: int, steps: int, suppress=()) -> list[int]:
    """Greedy tokens after the reduced row; the first sits at ``nxt`` on every axis (the unreduced prompt's
    next position), each later one + 1; no cache. ``suppress``: ids never generated."""
    out = []
    for _ in range(steps):
        last = qwen_logits(model, x, pos3)[-1].clone()
        last[list(suppress)] = float("-inf")
        tok = int(last.argmax())
        out.append(tok)
        with torch.no_grad():
            e = model.get_input_embeddings()(torch.tensor([tok]))
        x = torch.cat([x, e])
        pos3 = torch.cat([pos3, torch.full((3, 1), nxt, dtype=pos3.dtype)], dim=1)
        nxt += 1
    return out
