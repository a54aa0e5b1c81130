"""Structural ops (YOPO arXiv 2410.06169 head / FFN / neighbour ops, layer skips, visual_drop) on LLaVA-OneVision
(anyres crops + image_newline tokens) and InternVL (tiles + thumbnail after the pixel shuffle, each tile its own
grid) against the independent masked eager oracle (tests/reference/structural_oracle.py): prefill logits and
cached greedy generate(), batch 2 with left padding. The grids the neighbour op needs are written out here from
transformers' own anyres helpers / the tile size, not from the adapters."""
from __future__ import annotations

import functools

import pytest
import torch
from test_structural_models import QWEN_POLICIES, _check

from vlm_tokenprune.eval.tiny_families import (
    build_tiny_internvl,
    build_tiny_onevision,
    make_internvl_batch,
    make_onevision_batch,
)
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID

OV_ROWS = [[4, "img", 3], [2, "img", 5]]
OV_SIZES = [[20, 36], [36, 20]]
IVL_ROWS = [[4, "img", 3], [2, "img", 5]]
IVL_TILES = [3, 1]


@functools.cache
def onevision(impl: str):
    return build_tiny_onevision(impl)


@functools.cache
def internvl(impl: str):
    return build_tiny_internvl(impl)


def _onevision_grid(model, inputs, vis):
    """(row, col, segment): base side x side grid, then the unpadded anyres grid row by row, each row closed by
    an image_newline (row -1); 1 x 2 / 2 x 1 crops of 16 px need no anyres_max resize here."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    B, L = vis.shape
    row, col, seg = (torch.full((B, L), -1) for _ in range(3))
    for b, size in enumerate(inputs["image_sizes"]):
        coords = [(k // side, k % side, 0) for k in range(side * side)]
        nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        h, w = unpad_image(torch.zeros(1, nph * side, npw * side), size).shape[1:]
        coords += [(r, c, 1) if c < w else (-1, -1, -1) for r in range(h) for c in range(w + 1)]
        pos = vis[b].nonzero()[:, 0].tolist()
        assert len(pos) == len(coords)
        for p, (r, c, s_) in zip(pos, coords):
            row[b, p], col[b, p], seg[b, p] = r, c, s_
    return row, col, seg


def _internvl_grid(inputs, vis, per_side: int = 4):
    B, L = vis.shape
    row, col, seg = (torch.full((B, L), -1) for _ in range(3))
    for b in range(B):
        for i, p in enumerate(vis[b].nonzero()[:, 0].tolist()):
            t = i % (per_side * per_side)
            row[b, p], col[b, p], seg[b, p] = t // per_side, t % per_side, i // (per_side * per_side)
    return row, col, seg


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", QWEN_POLICIES)
def test_onevision_matches_masked_oracle(impl, policy):
    model = onevision(impl)
    inputs = make_onevision_batch(model, OV_ROWS, image_sizes=OV_SIZES)
    vis = inputs["input_ids"] == IMAGE_TOKEN_ID
    _check(model, inputs, vis, _onevision_grid(model, inputs, vis), policy)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", QWEN_POLICIES)
def test_internvl_matches_masked_oracle(impl, policy):
    model = internvl(impl)
    inputs = make_internvl_batch(model, IVL_ROWS, tiles=IVL_TILES)
    vis = inputs["input_ids"] == IMAGE_TOKEN_ID
    _check(model, inputs, vis, _internvl_grid(inputs, vis), policy)
