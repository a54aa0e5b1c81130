"""Structural ops on Qwen2-VL (M-RoPE, 2x2-merged patch grids, q/k/v biases) and LLaVA-NeXT (anyres
crops + image_newline tokens; neighbour windows per base / high-res grid) against the independent masked eager oracle: prefill logits and
cached greedy generate(), batch 2 with left padding. The oracle takes layer 0's input and RoPE
tables from the unpatched model (``structural_oracle.capture_rope``) and decodes cache-free."""
from __future__ import annotations

import functools

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune.eval.tiny_models import (
    IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_END_ID, QWEN_VISION_START_ID, make_batch, make_qwen_batch,
)

from kit import FLASH, tiny_llava, tiny_qwen
from reference import structural_oracle as O

STEPS = 3
QWEN_ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]
QWEN_GRIDS = [(3, 4), (2, 3), (4, 2)]  # (h, w) in LLM tokens after the 2x2 merge
NEXT_ROWS = [[4, "img", 3], [2, "img", 5]]
NEXT_SIZES = [[20, 36], [36, 20]]
BANNED = [IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID]  # never generated (new images)


@functools.lru_cache(maxsize=None)
def qwen(impl: str):
    return tiny_qwen(impl)


@functools.lru_cache(maxsize=None)
def llava_next(impl: str):
    return tiny_llava(impl, next=True)


def _qwen_inputs(model):
    inputs = make_qwen_batch(model, QWEN_ROWS, image_grids=QWEN_GRIDS)
    vis = inputs["input_ids"] == IMAGE_TOKEN_ID
    B, L = vis.shape
    row, col, seg = (torch.full((B, L), -1) for _ in range(3))
    grids = iter(QWEN_GRIDS)
    for b, segs in enumerate(QWEN_ROWS):  # each image's tokens in raster order of its own grid
        pos = vis[b].nonzero()[:, 0].tolist()
        i = 0
        for s_i, s in enumerate(x for x in segs if x == "img"):
            h, w = next(grids)
            for k in range(h * w):
                row[b, pos[i]], col[b, pos[i]], seg[b, pos[i]] = k // w, k % w, s_i
                i += 1
    return inputs, vis, (row, col, seg)


def _ops(model, policy: str, vis) -> tuple[dict, dict]:
    cfg = model.config.text_config
    n, m = cfg.num_hidden_layers, cfg.intermediate_size
    table = {
        "skip_layers:layers=2": ({"skip_all": {2}}, {}),
        "skip_layers:layers=1;3,scope=visual": ({"skip_visual": {1, 3}}, {}),
        "prune_heads:heads=1/0;2/2;2/3,scope=all": ({"heads_all": {1: (0,), 2: (2, 3)}}, {}),
        "prune_heads:heads=1/0;2/2;2/3,scope=visual": ({"heads_visual": {1: (0,), 2: (2, 3)}}, {}),
        "ffn_cut:ratio=3": ({"ffn": {j: int(m // 3.0) for j in range(n)}}, {}),
        "neighbor_attention:window=3": ({"neighbor": {j: 3 for j in range(n)}}, {}),
        "visual_drop:layer=2": ({}, {2: vis}),
        "skip_layers:layers=1": ({"skip_all": {1}}, {}),
        "visual_drop:layer=1": ({}, {1: vis}),
        "skip_sublayers:attn=1;3,ffn=1;2": ({"skip_attn": {1, 3}, "skip_ffn": {1, 2}}, {}),
        "skip_sublayers:attn=1;2,ffn=0;1,scope=visual": ({"attn_visual": {1, 2}, "ffn_visual": {0, 1}}, {}),
    }
    return table[policy]


def _check(model, inputs, vis, grid, policy):
    valid = inputs["attention_mask"].bool()
    ops, removed = _ops(model, policy, vis)
    L = inputs["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    banned = BANNED + (list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])  # rows run all steps
    with torch.no_grad(), vtp.patch(model, policy):
        logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, suppress_tokens=banned)[:, L:]
    cap = O.capture_rope(model, inputs)
    with torch.no_grad():
        exp = O.forward(model, cap["h"], None, valid, vis, grid, ops, removed, rope=cap["rope"], deepstack=O.deepstack_of(cap))
        base = O.forward(model, cap["h"], None, valid, vis, grid, rope=cap["rope"], deepstack=O.deepstack_of(cap))
        plain = model(**inputs).logits
    torch.testing.assert_close(base[:, -1], plain[:, -1], atol=2e-5, rtol=1e-4)  # the oracle is the model when no op is set
    assert (exp - base)[:, -1].abs().max() > 1e-3  # and it tells the op from the plain model
    if logits.shape == exp.shape:
        torch.testing.assert_close(logits[valid], exp[valid], atol=2e-5, rtol=1e-4)
    else:  # visual_drop: logits of the kept (text) tokens only
        torch.testing.assert_close(logits[:, -1], exp[:, -1], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, O.greedy_recapture(model, inputs, STEPS, vis, grid, ops, removed, banned))


QWEN_POLICIES = ["skip_layers:layers=2", "skip_layers:layers=1;3,scope=visual", "prune_heads:heads=1/0;2/2;2/3,scope=all",
                 "prune_heads:heads=1/0;2/2;2/3,scope=visual", "ffn_cut:ratio=3", "neighbor_attention:window=3",
                 "visual_drop:layer=2"]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", QWEN_POLICIES)
def test_qwen2_vl_matches_masked_oracle(impl, policy):
    model = qwen(impl)
    inputs, vis, grid = _qwen_inputs(model)
    _check(model, inputs, vis, grid, policy)


def _next_grid(model, inputs, vis):
    """(row, col, segment) of LLaVA-NeXT's packed features, from transformers' own anyres helpers: per image
    the base grid (side x side), then the unpadded high-res grid row by row, each row closed by an
    image_newline token (row -1: unrestricted)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    B, L = vis.shape
    row, col, seg = (torch.full((B, L), -1) for _ in range(3))
    sizes = iter(inputs["image_sizes"])
    for b, segs in enumerate(NEXT_ROWS):
        coords = []
        for i in range(sum(x == "img" for x in segs)):
            size = next(sizes)
            coords += [(k // side, k % side, 2 * i) for k in range(side * side)]
            nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            h, w = unpad_image(torch.zeros(1, nph * side, npw * side), size).shape[1:]
            coords += [(r, c, 2 * i + 1) if c < w else (-1, -1, -1) for r in range(h) for c in range(w + 1)]
        pos = vis[b].nonzero()[:, 0].tolist()
        assert len(pos) == len(coords)  # the packing is understood
        for p, (r, c, s_) in zip(pos, coords):
            row[b, p], col[b, p], seg[b, p] = r, c, s_
    return row, col, seg


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", QWEN_POLICIES)
def test_llava_next_matches_masked_oracle(impl, policy):
    model = llava_next(impl)
    inputs = make_batch(model, NEXT_ROWS, image_sizes=NEXT_SIZES)
    vis = inputs["input_ids"] == IMAGE_TOKEN_ID
    _check(model, inputs, vis, _next_grid(model, inputs, vis), policy)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_visual_heads_on_the_flash_standin(family):
    """YOPO heads on a 2-D-mask backend: the head split with right-aligned text keys, prefill and decode."""
    policy = "prune_heads:heads=1/0;2/2;2/3,scope=visual"
    if family == "qwen2_vl":
        model = qwen(FLASH)
        inputs, vis, grid = _qwen_inputs(model)
    else:
        model = llava_next(FLASH)
        inputs = make_batch(model, NEXT_ROWS, image_sizes=NEXT_SIZES)
        vis, grid = inputs["input_ids"] == IMAGE_TOKEN_ID, None
    _check(model, inputs, vis, grid, policy)
