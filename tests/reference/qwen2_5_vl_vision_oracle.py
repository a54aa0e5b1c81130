"""Independent reference for vision-site VisPruner on Qwen2.5-VL and Qwen2-VL (the Qwen3-VL extension of arXiv
2412.01818's SigLIP rule, ``qwen3_vl_vision_oracle``), one unpadded row, no KV cache. Imports nothing from
``vlm_tokenprune``. Qwen2-VL has no windows: its rows are already in placeholder order.

Qwen2.5-VL's ViT runs its patches in WINDOW order: each image's LLM-token grid (``h x w`` merge units) is cut into
``m x m`` windows (``m = window_size // merge // patch``; the last row / column of windows may be partial), the
windows in raster order, the units raster order inside each window, each unit's ``merge^2`` patch rows together.
Written out here by hand (``window_order``): the LLM token (raster index) of every unit of the tower's row order.
The last block (a full-attention block) is read as in ``qwen3_vl_vision_oracle`` (attention each patch receives
within its image, its rows' outputs), every unit is put back at its raster index, and VisPruner selects over the
units in raster (placeholder) order; the language model sees the kept placeholders (``pre_llm_oracle``).
"""
from __future__ import annotations

import torch

from .qwen3_vl_vision_oracle import importance, last_block_io, pack, start_positions
from .vispruner_oracle import paper_select


def window_order(h: int, w: int, m: int) -> list[int]:
    """Raster index of each merge unit, in the tower's window order, for an ``h x w`` unit grid and ``m x m``
    windows."""
    out = []
    for wi in range(0, h, m):
        for wj in range(0, w, m):
            for i in range(wi, min(wi + m, h)):
                for j in range(wj, min(wj + m, w)):
                    out.append(i * w + j)
    return out


def select(model, pixel_values, grid_thw, T: int, r: float) -> list[list[int]]:
    """Kept LLM-token indices (raster, ascending) per image."""
    vc = model.config.vision_config
    merge = vc.spatial_merge_size
    g = merge * merge
    ws = getattr(vc, "window_size", None)  # None: Qwen2-VL, whose rows are in placeholder order
    m = None if ws is None else ws // merge // vc.patch_size
    sizes = [int(t * h * w) for t, h, w in grid_thw.tolist()]
    x, pe, y = last_block_io(model, pixel_values, grid_thw)
    imp = importance(model, x, pe, sizes)
    kept, s = [], 0
    for (t, hh, ww), n in zip(grid_thw.tolist(), sizes):
        h, w = int(hh) // merge, int(ww) // merge
        order = list(range(h * w)) if m is None else window_order(h, w, m)
        G = n // g
        score = [0.0] * G
        rows = pack(y[s:s + n].float(), g)
        feats = torch.empty_like(rows)
        for u, rast in enumerate(order):
            score[rast] = sum(imp[s + u * g + q] for q in range(g))
            feats[rast] = rows[u]
        kept.append(list(range(G)) if T >= G else paper_select(score, feats, T, r))
        s += n
    return kept


def kept_positions(model, inputs: dict, T: int, r: float) -> list[int]:
    kept = select(model, inputs["pixel_values"], inputs["image_grid_thw"], T, r)
    return start_positions(model, inputs, kept)[1]
