"""InternVL 3 / 3.5 adapter (arXiv 2504.10479): tile layout after the pixel shuffle, keep-all exactness,
FastV == the independent oracle (tests/reference/fastv_oracle.py), left-padded batches, cached generate,
uniform pre-LLM == a plain-loop oracle (tests/reference/uniform_oracle.py), unpatch, refusals.

Tiny InternViT + Qwen2 (and Qwen3 for 3.5) models from configs (every backend in ``conftest.BACKENDS``):
32 px tiles of 8 x 8 patches -> 4 x 4 = 16 LLM tokens per tile after the 0.5 pixel shuffle; an image
of 3 tiles stands for 2 crops + the thumbnail.
"""
from __future__ import annotations

import functools

import pytest
import torch
from kit import (BACKENDS, assert_keep_all_exact, assert_pre_llm_merge_matches_oracle, assert_unpatch_restores, k_of,
                 no_hook_left, positions_of)
from helpers import new_tokens
from reference import fastv_oracle as oracle
from reference import uniform_oracle

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, InputError
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_families import build_tiny_internvl, make_internvl_batch
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID

torch.set_num_threads(1)

ATOL = 1e-5
ROWS = [[3, "img", 2, "img", 4], [2, "img", 5]]  # row 1 shorter: left padded
TILES = [3, 1, 2]  # tiles per image (crops + thumbnail)
T = 16  # tokens per tile


@functools.cache
def tiny(attn: str, text: str = "qwen2"):
    return build_tiny_internvl(attn, text_model_type=text)


def batch(model, seed: int = 0) -> dict:
    return make_internvl_batch(model, ROWS, seed=seed, tiles=TILES)


def row_alone(inputs: dict, b: int) -> dict:
    real = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][real][None]
    first = [0, 4][b]  # tiles before row b's images
    n = [4, 2][b]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": inputs["pixel_values"][first:first + n]}


def image_positions(inputs, b: int = 0) -> list[int]:
    return positions_of(inputs, (IMAGE_TOKEN_ID,), b)


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------
def test_tile_grid_is_the_pixel_shuffle_raster():
    """Feed patch coordinates through the model's own ``pixel_shuffle``: merged token i of a tile holds the
    2 x 2 patch block at (row, col) = (i // 4, i % 4) of the adapter's grid."""
    model = tiny("sdpa")
    side = 8
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([r, c], -1).float()[None]  # [1, rows, cols, 2] as get_image_features reshapes patches
    merged = model.model.pixel_shuffle(coords, scale_factor=0.5).reshape(1, -1, 8)[0]  # [16, 4 patches x 2]
    patches = merged.view(16, 4, 2)
    inputs = make_internvl_batch(model, [[2, "img", 3]], tiles=[1])
    lay = resolve_adapter(model).visual_layout(model, inputs["input_ids"], inputs)
    v = lay.is_visual[0]
    assert torch.equal(patches.min(1).values[:, 0].long() // 2, lay.row[0][v])
    assert torch.equal(patches.min(1).values[:, 1].long() // 2, lay.col[0][v])
    assert set(map(tuple, patches.view(-1, 2).long().tolist())) == {(i, j) for i in range(side) for j in range(side)}


def test_every_tile_is_its_own_grid():
    model = tiny("sdpa")
    inputs = batch(model)
    lay = resolve_adapter(model).visual_layout(model, inputs["input_ids"], inputs)
    v0, v1 = lay.is_visual[0], lay.is_visual[1]
    assert lay.segment[0][v0].tolist() == [s for s in range(4) for _ in range(T)]
    assert lay.image[0][v0].tolist() == [0] * 3 * T + [1] * T
    assert lay.segment[1][v1].tolist() == [0] * T + [1] * T
    assert lay.row[0][v0][:T].tolist() == [i // 4 for i in range(T)] and lay.col[0][v0][:T].tolist() == [i % 4 for i in range(T)]
    assert not bool(lay.is_newline.any())


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_is_exactly_unpatched(attn):
    model = tiny(attn)
    assert_keep_all_exact(model, batch(model), ("fastv:keep=1+uniform:layer=3,keep=1", "uniform:site=pre_llm,keep=1"),
                          {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]})


def test_unpatch_restores_exactly():
    model = tiny("sdpa")
    assert_unpatch_restores(model, batch(model), ("fastv:layer=2,keep=0.25",
                                                  "uniform:site=pre_llm,keep=0.5+fastv:layer=2,keep=0.3"))


# ------------------------------------------------------------------------------------------------
# FastV == oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("layer,keep", [(1, 0.25), (3, 0.5)])
def test_fastv_prefill_matches_oracle_row_by_row(attn, layer, keep):
    model = tiny(attn)
    inputs = batch(model)
    with vtp.patch(model, f"fastv:layer={layer},keep={keep}") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, b)
        pad = L - alone["input_ids"].shape[1]
        k = k_of(keep, len(image_positions(alone)))
        s = sorted(oracle.fastv_scores(model, alone, layer).values(), reverse=True)
        assert s[k - 1] - s[k] > 1e-7, "ill-conditioned case"
        want_keep = oracle.fastv_keep(model, alone, layer, k)
        want = oracle.fastv_logits(model, alone, layer, want_keep)[0]
        assert trace.stages[0].kept_positions[b] == [p + pad for p in want_keep], f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("text", ["qwen2", "qwen3"])
def test_fastv_cached_generate_matches_oracle(text):
    """InternVL 3 (Qwen2) and 3.5 (Qwen3: q/k norms) text models."""
    model = tiny("sdpa", text)
    inputs = make_internvl_batch(model, [[4, "img", 3]], tiles=[3], seed=1)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    k = k_of(0.25, len(image_positions(inputs)))
    with vtp.patch(model, "fastv:layer=2,keep=0.25"), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    want = oracle.fastv_generate(model, inputs, 2, k, 6, rescore=False, eos_token_id=eos)
    assert new_tokens(g[0], L, eos, pad) == want


# ------------------------------------------------------------------------------------------------
# uniform pre-LLM == plain-loop oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_uniform_pre_llm_matches_oracle(attn):
    model = tiny(attn)
    inputs = batch(model)
    keep = 0.3
    with vtp.patch(model, f"uniform:site=pre_llm,keep={keep}") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, b)
        pad = L - alone["input_ids"].shape[1]
        vis = image_positions(alone)
        # every tile (crops and thumbnail) a 4 x 4 grid of consecutive placeholders, in prompt order
        grids = [{"cells": {(i // 4, i % 4): vis[t * T + i] for i in range(T)}, "other": []} for t in range(len(vis) // T)]
        want_keep = uniform_oracle.kept(grids, k_of(keep, len(vis)))
        assert [p - pad for p in trace.stages[0].kept_positions[b]] == want_keep, f"row {b}"
        n = alone["input_ids"].shape[1]
        kept = [p for p in range(n) if p not in set(vis) or p in set(want_keep)]
        embeds = oracle.prompt_embeds(model, alone)[0, kept]
        with torch.no_grad():
            hs = model.model.language_model(inputs_embeds=embeds[None], position_ids=torch.tensor([kept])).last_hidden_state
            want = model.lm_head(hs)[0]
        torch.testing.assert_close(logits[b, -len(kept):], want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def test_vision_site_is_refused_by_name():
    """Vision-site stages run on whole pixel-shuffle groups (tests/test_internvl_vision_site.py); what cannot run
    is refused by name: a budget above a tile's 16 LLM tokens, an MCTF budget its halving layers cannot reach
    (one merging layer: 16 -> 8 groups at best); a patch-level criterion: see test_internvl_vision_site."""
    model = tiny("sdpa")
    for policy, pattern in (("vispruner:tokens=17", r"stages\[0\]\.tokens.*LLM tokens \(pixel-shuffle groups\)"),
                            ("mctf:tokens=4", r"stages\[0\]\.tokens.*8 of 16 LLM tokens")):
        with no_hook_left(model), pytest.raises(IncompatiblePolicyError, match=pattern):
            vtp.patch(model, policy)


def test_partial_tile_names_input_ids():
    model = tiny("sdpa")
    inputs = batch(model)
    ids = inputs["input_ids"].clone()
    ids[1, -1] = IMAGE_TOKEN_ID  # a run of one placeholder: not a whole tile
    with vtp.patch(model, "fastv:layer=2,keep=0.5"), pytest.raises(InputError, match=r"input_ids.*whole number of tiles"):
        model(**{**inputs, "input_ids": ids})


def test_mixture_of_experts_text_model_is_refused_before_any_hook():
    """InternVL3.5-30B-A3B's Qwen3-MoE text model: refused by name (dense backbones only)."""
    from transformers import InternVLForConditionalGeneration

    from vlm_tokenprune import UnsupportedModelError
    from vlm_tokenprune.eval.tiny_families import tiny_internvl_config

    cfg = tiny_internvl_config(text_model_type="qwen3_moe")
    cfg.text_config.num_experts, cfg.text_config.moe_intermediate_size = 2, 16
    model = InternVLForConditionalGeneration._from_config(cfg).eval()
    with no_hook_left(model), pytest.raises(UnsupportedModelError) as e:
        vtp.patch(model, "fastv:layer=2,keep=0.5")
    assert e.value.field == "config.text_config.model_type" and "qwen3_moe" in str(e.value)


@pytest.mark.parametrize("attn", BACKENDS)
def test_pre_llm_merge_matches_oracle_given_the_assignment(attn):
    model = tiny(attn)
    assert_pre_llm_merge_matches_oracle(model, batch(model), row_alone=row_alone, prompt_embeds=oracle.prompt_embeds,
                                        visual_positions=image_positions, atol=ATOL)
