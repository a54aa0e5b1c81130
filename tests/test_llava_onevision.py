"""LLaVA-OneVision adapter (arXiv 2408.03326): layout, keep-all exactness, FastV == the independent
oracle (tests/reference/fastv_oracle.py) on images and videos, left-padded batches, cached generate,
uniform pre-LLM == a plain-loop oracle, unpatch, refusals.

Tiny SigLIP + Qwen2 models from configs (every backend in ``conftest.BACKENDS``); anyres crops up to
2 x 2 of a 4 x 4 SigLIP grid, ``anyres_max_1`` for the bilinear resize, videos pooled to 2 x 2 per frame.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import vlm_tokenprune as vtp
from kit import (BACKENDS, assert_keep_all_exact, assert_pre_llm_merge_matches_oracle, assert_unpatch_restores, k_of,
                 no_hook_left, positions_of)
from helpers import new_tokens
from reference import fastv_oracle as oracle
from reference import uniform_oracle
from vlm_tokenprune import IncompatiblePolicyError, InputError
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_families import VIDEO_TOKEN_ID, build_tiny_onevision, make_onevision_batch
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID

torch.set_num_threads(1)

ATOL = 1e-5
ROWS = [[3, "img", 2, "vid", 4], [2, "img", 5]]  # row 1 shorter: left padded
SIZES = [[20, 36], [36, 20]]  # 1 x 2 and 2 x 1 crops of 16 px
BANNED = [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]  # a generated placeholder would be a new (pixel-less) image


@functools.lru_cache(maxsize=None)
def tiny(attn: str, aspect: str = "anyres_max_9"):
    return build_tiny_onevision(attn, vision_aspect_ratio=aspect)


def batch(model, seed: int = 0) -> dict:
    return make_onevision_batch(model, ROWS, seed=seed, image_sizes=SIZES, video_frames=2)


def visual_positions(inputs, b: int = 0) -> list[int]:
    return positions_of(inputs, (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID), b)


def row_alone(inputs: dict, b: int) -> dict:
    """Row b of ``batch()`` as its own unpadded batch of one (its image, and the video of row 0)."""
    real = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][real][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "pixel_values": inputs["pixel_values"][b:b + 1], "image_sizes": inputs["image_sizes"][b:b + 1]}
    if b == 0:
        out["pixel_values_videos"] = inputs["pixel_values_videos"]
    return out


def fastv_oracle(model, inputs, layer: int, k: int):
    """(kept visual positions, logits) of the FastV oracle over image AND video placeholders."""
    embeds = oracle.prompt_embeds(model, inputs)
    eager = oracle.eager_copy(model)
    vis = visual_positions(inputs)
    scores = oracle.scores_from_embeds(eager, embeds, vis, layer)
    s = sorted(scores.values(), reverse=True)
    assert s[k - 1] - s[k] > 1e-7, "ill-conditioned case"
    keep = oracle.top_k_positions(scores, k)
    return keep, oracle.logits_from_embeds(eager, embeds, vis, layer, keep)


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_layout_matches_the_models_own_features(aspect):
    """Newline tokens are exactly the feature rows equal to ``image_newline``; grids per base / anyres /
    video frame; ``anyres_max_1`` resizes the 4 x 8 anyres grid to 2 x 5 (the model's bilinear resize)."""
    model = tiny("sdpa", aspect)
    inputs = batch(model)
    lay = resolve_adapter(model).visual_layout(model, inputs["input_ids"], inputs)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        vfeats = model.model.get_video_features(inputs["pixel_values_videos"])
    img = torch.cat(list(feats.pooler_output))
    nl = model.model.image_newline
    vid = vfeats.pooler_output
    if vid.shape[1] == 2 * 4:  # transformers < 5.2x: the forward appends each video's newline, not get_video_features
        vid = torch.cat([vid, nl.expand(vid.shape[0], 1, -1)], dim=1)
    vid = vid.flatten(0, 1)
    ids = inputs["input_ids"]
    assert torch.equal(lay.is_newline[ids == IMAGE_TOKEN_ID], (img == nl).all(-1))
    assert torch.equal(lay.is_newline[ids == VIDEO_TOKEN_ID], (vid == nl).all(-1))
    v = lay.is_visual[0]
    grid = {}
    for s, r, c, n in zip(lay.segment[0][v].tolist(), lay.row[0][v].tolist(), lay.col[0][v].tolist(),
                          lay.is_newline[0][v].tolist()):
        if not n:
            grid.setdefault(s, set()).add((r, c))
    shapes = {s: (max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1, len(cells)) for s, cells in grid.items()}
    anyres = (4, 8, 32) if aspect == "anyres_max_9" else (2, 5, 10)  # ratio sqrt(32 / 16): 4 // 1.41, 8 // 1.41
    assert shapes == {0: (4, 4, 16), 1: anyres, 2: (2, 2, 4), 3: (2, 2, 4)}  # base, anyres, 2 video frames
    assert lay.image[0][v].unique().tolist() == [0, 1] and lay.image[1][lay.is_visual[1]].unique().tolist() == [0]


def test_several_images_per_sample_are_not_tiled():
    """``batch_num_images`` > 1: each image is its base grid + one newline (the model's own rule)."""
    model = tiny("sdpa")
    inputs = make_onevision_batch(model, [[2, "img", 1, "img", 3]], image_sizes=SIZES, batch_num_images=[2])
    lay = resolve_adapter(model).visual_layout(model, inputs["input_ids"], inputs)
    v = lay.is_visual[0]
    assert int(v.sum()) == 2 * 17
    assert lay.segment[0][v].tolist() == [0] * 17 + [1] * 17
    assert lay.is_newline[0][v].nonzero().flatten().tolist() == [16, 33]


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_is_exactly_unpatched(attn):
    model = tiny(attn)
    assert_keep_all_exact(model, batch(model), ("fastv:keep=1+uniform:layer=3,keep=1", "uniform:site=pre_llm,keep=1"),
                          dict(max_new_tokens=4, do_sample=False, suppress_tokens=BANNED))


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
    """Left-padded batch of an image + video row and an image row == each row alone in the oracle."""
    model = tiny(attn)
    inputs = batch(model)
    with vtp.patch(model, f"fastv:layer={layer},keep={keep}") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, b)
        pad = L - alone["input_ids"].shape[1]
        want_keep, want = fastv_oracle(model, alone, layer, k_of(keep, len(visual_positions(alone))))
        assert trace.stages[0].kept_positions[b] == [p + pad for p in want_keep], f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[1]:], want[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fastv_cached_generate_matches_oracle(attn):
    """Images only (the oracle's generate reads image placeholders): an anyres image, cached decode."""
    model = tiny(attn)
    inputs = make_onevision_batch(model, [[4, "img", 3]], image_sizes=[[20, 36]], seed=1)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    k = k_of(0.25, len(visual_positions(inputs)))
    with vtp.patch(model, "fastv:layer=2,keep=0.25"), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    want = oracle.fastv_generate(model, inputs, 2, k, 6, rescore=False, eos_token_id=eos)
    assert new_tokens(g[0], L, eos, pad) == want


# ------------------------------------------------------------------------------------------------
# uniform pre-LLM == plain-loop oracle
# ------------------------------------------------------------------------------------------------
def onevision_grids(first: int, n_base: int, anyres_rows: list[int], video_start: int | None, frames: int,
                    fg: int) -> list[dict]:
    """The row 0 grids of ``batch()`` written out by hand: base 4 x 4 at ``first``, then anyres rows of
    ``anyres_rows[i]`` tokens + a newline each, then (at ``video_start``) ``frames`` frames of fg x fg + 1 newline."""
    side = int(math.isqrt(n_base))
    grids = [{"cells": {(i // side, i % side): first + i for i in range(n_base)}, "other": []}]
    p, cells, other = first + n_base, {}, []
    for r, w in enumerate(anyres_rows):
        cells.update({(r, c): p + c for c in range(w)})
        other.append(p + w)
        p += w + 1
    grids.append({"cells": cells, "other": other})
    if video_start is not None:
        for f in range(frames):
            base = video_start + f * fg * fg
            grids.append({"cells": {(i // fg, i % fg): base + i for i in range(fg * fg)}, "other": []})
        grids[-1]["other"] = [video_start + frames * fg * fg]
    return grids


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
        ids = alone["input_ids"][0].tolist()
        first = ids.index(IMAGE_TOKEN_ID)
        # image b: 20 x 36 -> 1 x 2 crops -> 4 x 8 grid; 36 x 20 -> 2 x 1 crops -> 8 x 4 grid
        rows = [8] * 4 if b == 0 else [4] * 8
        vstart = ids.index(VIDEO_TOKEN_ID) if VIDEO_TOKEN_ID in ids else None
        grids = onevision_grids(first, 16, rows, vstart, 2, 2)
        vis = visual_positions(alone)
        assert sorted(p for g in grids for p in [*g["cells"].values(), *g["other"]]) == vis
        want_keep = uniform_oracle.kept(grids, k_of(keep, len(vis)))
        assert [p - pad for p in trace.stages[0].kept_positions[b]] == want_keep, f"row {b}"
        kept = [p for p in range(len(ids)) if p not in set(vis) or p in set(want_keep)]
        embeds = oracle.prompt_embeds(model, alone)[0, kept]
        with torch.no_grad():
            hs = model.model.language_model(inputs_embeds=embeds[None], position_ids=torch.tensor([kept])).last_hidden_state
            want = model.lm_head(hs)[0]
        torch.testing.assert_close(logits[b, -len(kept):], want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def test_vision_site_is_refused_by_name():
    model = tiny("sdpa")
    for policy, field in (("flowcut_vit:keep=0.5", r"stages\[0\]\.criterion.*'flowcut_vit'.*no CLS token"),
                          ("visionzip:keep=0.5", r"stages\[0\]\.criterion.*'visionzip'.*no CLS token"),
                          ("mctf:keep=0.5", r"stages\[0\]\.criterion.*'mctf'.*CLS token only")):  # vispruner runs
        with no_hook_left(model), pytest.raises(IncompatiblePolicyError, match=field):
            vtp.patch(model, policy)


def test_placeholder_count_mismatch_names_input_ids():
    model = tiny("sdpa")
    inputs = batch(model)
    ids = inputs["input_ids"].clone()
    ids[1, -1] = IMAGE_TOKEN_ID  # one placeholder too many
    with vtp.patch(model, "fastv:layer=2,keep=0.5"), pytest.raises(InputError, match="input_ids"):
        model(**{**inputs, "input_ids": ids})


def test_an_image_split_across_rows_names_input_ids():
    model = tiny("sdpa")
    inputs = make_onevision_batch(model, [[3, "img", 2], [2, "img", 3]], image_sizes=SIZES)
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    ids[0, first] = 9  # row 0 loses a placeholder, row 1 gains one: same total, image 0 would spill into row 1
    ids[1, 1] = IMAGE_TOKEN_ID
    with vtp.patch(model, "fastv:layer=2,keep=0.5"), pytest.raises(InputError, match="within one row"):
        model(**{**inputs, "input_ids": ids})


@pytest.mark.parametrize("attn", BACKENDS)
def test_pre_llm_merge_matches_oracle_given_the_assignment(attn):
    model = tiny(attn)
    assert_pre_llm_merge_matches_oracle(model, batch(model), row_alone=row_alone, prompt_embeds=oracle.prompt_embeds,
                                        visual_positions=visual_positions, atol=ATOL)
