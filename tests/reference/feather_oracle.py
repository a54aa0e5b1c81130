"""Independent reference implementation of FEATHER (Endo et al., arXiv 2412.13180), batch size 1.

Written from the paper (and its released code's behaviour), sharing no code with
``vlm_tokenprune``: only torch, transformers' LLaVA-NeXT grid-shape helper, the Hugging Face
model's own modules and the FastV oracle's plumbing (prompt embeddings, eager copy, running
layers without a cache) are used.

A FEATHER run is a list of stages; stage ``s`` has a layer K, a kept count, and the
criterion settings of the paper's ablations:
  * run the LLM without a cache up to decoder layer K-1 on the tokens still present, with
    their ORIGINAL position ids;
  * score each present image token by the attention of the LAST token in layer K-1, rebuilt by
    hand from the layer's input_layernorm / q_proj / k_proj: q_last . k_j * scaling per head,
    RoPE on q and k only if ``rope``; softmax over the present image keys only
    (``softmax="keys"``, FEATHER) or over the whole row (``"row"``, FastV); mean over heads;
  * keep the top-k image tokens (ties -> lower position) UNION, if ``stride`` > 0, every
    ``stride``-th row and column of each image's patch grid (LLaVA-NeXT: of the base grid and
    of the unpadded anyres grid separately; newline tokens are not grid cells), the grid
    anchored at the first present row / column of that grid;
  * drop the other image tokens before layer K.

With ``rope=True, softmax="row", stride=0`` a stage is FastV, and a list of such stages is
PyramidDrop's schedule (used by the PDrop tests).
"""
from __future__ import annotations

import torch

from . import eager_runner as base


# ----------------------------------------------------------------------------------------------
# where each image token sits on its patch grid
# ----------------------------------------------------------------------------------------------
def _unpadded_box(n_rows: int, n_cols: int, height: int, width: int) -> tuple[range, range]:
    """Rows / columns of a ``n_rows x n_cols`` feature canvas that hold the image of size
    ``height x width`` (LLaVA-NeXT pads the short side symmetrically; the padding is removed)."""
    if width / height > n_cols / n_rows:  # wider than the canvas: rows were padded
        new_h = int(round(height * (n_cols / width), 7))
        pad = (n_rows - new_h) // 2
        return range(pad, n_rows - pad), range(n_cols)
    new_w = int(round(width * (n_rows / height), 7))
    pad = (n_cols - new_w) // 2
    return range(n_rows), range(pad, n_cols - pad)


def grid_layout(model, inputs: dict) -> list[tuple[int, int, int] | None]:
    """For each image token of the prompt, in order: ``(grid id, row, col)``, or None for an
    ``image_newline`` token. Grid ids: one per LLaVA-1.5 image; base / anyres grid per NeXT image."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n_img_tokens = len(base.image_positions(model, inputs["input_ids"]))
    out: list[tuple[int, int, int] | None] = []
    if cfg.model_type == "llava":
        assert cfg.vision_feature_select_strategy == "default"
        n_images = n_img_tokens // (side * side)
        for i in range(n_images):
            for r in range(side):
                for c in range(side):
                    out.append((i, r, c))
    else:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        for i, (h, w) in enumerate(inputs["image_sizes"].tolist()):
            for r in range(side):
                for c in range(side):
                    out.append((2 * i, r, c))
            nph, npw = get_anyres_image_grid_shape((h, w), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            rows, cols = _unpadded_box(nph * side, npw * side, h, w)
            for r in rows:
                for c in cols:
                    out.append((2 * i + 1, r, c))
                out.append(None)  # image_newline closes every row of the anyres grid
    assert len(out) == n_img_tokens, f"layout has {len(out)} tokens, the prompt {n_img_tokens}"
    return out


def stride_cells(cells: dict[int, tuple[int, int, int] | None], stride: int) -> list[int]:
    """Positions (keys of ``cells``) on the stride grid of their own patch grid, ascending."""
    if stride == 0:
        return []
    first: dict[int, tuple[int, int]] = {}
    for cell in cells.values():
        if cell is not None:
            g, r, c = cell
            r0, c0 = first.get(g, (r, c))
            first[g] = (min(r0, r), min(c0, c))
    out = []
    for p, cell in sorted(cells.items()):
        if cell is None:
            continue
        g, r, c = cell
        if (r - first[g][0]) % stride == 0 and (c - first[g][1]) % stride == 0:
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# the criterion
# ----------------------------------------------------------------------------------------------
def last_token_image_attention(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int], img: list[int],
                               rope: bool, softmax: str) -> list[float]:
    """Head-mean attention of the last token over the image tokens at indices ``img`` of the
    current sequence (``hidden`` [1, T, D] entering layer ``layer_idx``, positions ``pos``)."""
    q, k, _ = base.head_projections(eager, layer_idx, hidden, pos, rope=rope)
    scaling = eager.model.language_model.layers[layer_idx].self_attn.scaling
    H, T = q.shape[0], q.shape[1]
    keys = list(range(T)) if softmax == "row" else img
    per_head = []
    for h in range(H):
        logits = torch.tensor([float(q[h, T - 1].double() @ k[h, j].double()) * scaling for j in keys])
        p = torch.softmax(logits, dim=0)
        row = dict(zip(keys, p.tolist()))
        per_head.append([row[j] for j in img])
    return [sum(per_head[h][n] for h in range(H)) / H for n in range(len(img))]


# ----------------------------------------------------------------------------------------------
# a run of stages
# ----------------------------------------------------------------------------------------------
def run_from_embeds(model, eager, inputs, embeds, stages: list[dict]) -> dict:
    """``stages``: dicts with ``layer``, ``k`` (int, or a function of the number of image tokens
    entering the stage), ``rope``, ``softmax``, ``stride``. Returns, per stage, the image
    positions scored with their scores, the top-k, the grid, the kept set; and the logits."""
    img_all = base.image_positions(model, inputs["input_ids"])
    layout = dict(zip(img_all, grid_layout(model, inputs)))
    T = embeds.shape[1]
    present = list(range(T))  # original positions of the current sequence
    hidden = embeds
    done = 0  # layers already run
    lm = eager.model.language_model
    report = []
    with torch.no_grad():
        for st in stages:
            K = st["layer"]
            assert K > done, "stages must have increasing layers"
            hidden = base.run_layers(eager, hidden, present, range(done, K - 1))
            img_idx = [i for i, p in enumerate(present) if p in layout]
            img_pos = [present[i] for i in img_idx]
            k = st["k"](len(img_pos)) if callable(st["k"]) else st["k"]
            assert 0 < k <= len(img_pos) or k == 0 == len(img_pos), (k, len(img_pos))
            s = last_token_image_attention(eager, K - 1, hidden, present, img_idx, st.get("rope", False),
                                           st.get("softmax", "keys")) if img_idx else []
            scores = dict(zip(img_pos, s))
            top = base.top_k_positions(scores, k)
            grid = stride_cells({p: layout[p] for p in img_pos}, st.get("stride", 0))
            kept = sorted(set(top) | set(grid))
            report.append({"scores": scores, "top": top, "grid": grid, "kept": kept, "k": k})
            hidden = base.run_layers(eager, hidden, present, [K - 1])
            keep_idx = [i for i, p in enumerate(present) if p not in layout or p in set(kept)]
            hidden = hidden[:, keep_idx]
            present = [present[i] for i in keep_idx]
            done = K
        hidden = base.run_layers(eager, hidden, present, range(done, len(lm.layers)))
        logits = eager.lm_head(lm.norm(hidden))
    return {"stages": report, "logits": logits, "positions": present}


def feather_run(model, inputs: dict, stages: list[dict]) -> dict:
    """Kept sets per stage and ``[1, L_kept, V]`` logits (see ``run_from_embeds``)."""
    return run_from_embeds(model, base.eager_copy(model), inputs, base.prompt_embeds(model, inputs), stages)


def feather_generate(model, inputs: dict, stages: list[dict], steps: int, rescore: bool,
                     eos_token_id: int | list[int] | None = None) -> list[int]:
    """Greedy tokens without a KV cache. ``rescore=False``: the kept sets are chosen once from the
    prompt (what a cached generate computes); ``rescore=True``: re-chosen every step from the
    sequence so far (what a cache-free generate computes)."""
    eager = base.eager_copy(model)
    embeds = base.prompt_embeds(model, inputs)
    first = run_from_embeds(model, eager, inputs, embeds, stages)
    fixed = [dict(st, k=len(r["kept"]), forced=r["kept"]) for st, r in zip(stages, first["stages"])]

    def logits_of(seq, step):
        if step == 0:
            return first["logits"]
        if rescore:
            return run_from_embeds(model, eager, inputs, seq, stages)["logits"]
        return _run_fixed(eager, seq, model, inputs, fixed)

    return base.greedy(eager, embeds, steps, eos_token_id, logits_of)


def _run_fixed(eager, embeds, model, inputs, stages) -> torch.Tensor:
    """Logits with the image tokens kept at each stage forced to ``stage["forced"]``."""
    img = set(base.image_positions(model, inputs["input_ids"]))
    T = embeds.shape[1]
    present = list(range(T))
    hidden = embeds
    done = 0
    lm = eager.model.language_model
    with torch.no_grad():
        for st in stages:
            K = st["layer"]
            hidden = base.run_layers(eager, hidden, present, range(done, K))
            keep_idx = [i for i, p in enumerate(present) if p not in img or p in set(st["forced"])]
            hidden = hidden[:, keep_idx]
            present = [present[i] for i in keep_idx]
            done = K
        hidden = base.run_layers(eager, hidden, present, range(done, len(lm.layers)))
        return eager.lm_head(lm.norm(hidden))
