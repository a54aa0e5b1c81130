"""Vision-site VisPruner on LLaVA-OneVision (issue 21): the official code's SigLIP variant (arXiv 2412.01818,
``siglip_encoder.py``: importance = last-layer attention each patch receives, mean over queries then heads), per
crop (the base image and each anyres crop), the kept patches mapped to placeholders by the model's own
``pack_image_features`` == the independent oracle (tests/reference/onevision_vision_oracle.py: SigLIP written out,
selection per crop, packing by transformers' ``get_anyres_image_grid_shape`` / ``unpad_image``, the LLM on the
reduced row) in the real batched, left-padded forward and in cached generate; keep-all bit-identical; unpatch
exact. An image that ``anyres_max_N`` bilinearly resizes keeps all its tokens (the row is relaxed, the trace says
why; ``strict=True``: InputError naming the stage); videos and the CLS methods (and MCTF) refused by name.

Tiny OneVision from a config: SigLIP 2 layers, 16 px crops of 4 x 4 patches, crops up to 2 x 2, Qwen2 4 layers.
"""
from __future__ import annotations

import functools

import pytest
import torch
from kit import assert_batch_equals_patched_rows_alone, assert_generate_matches_rows_alone, assert_keep_all_exact, assert_patch_refused, assert_unpatch_restores, row_alone
from reference import onevision_vision_oracle as oracle

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_families import VIDEO_TOKEN_ID, build_tiny_onevision, make_onevision_batch
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID

torch.set_num_threads(1)

ROWS = [[3, "img", 6], [2, "img", 4]]  # row 1 shorter: left padded
SIZES = [[20, 36], [36, 20]]  # 1 x 2 and 2 x 1 crops of 16 px (+ the base image): unpadded, never resized
BACKENDS = ("eager", "sdpa")
GEN = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]}


@functools.cache
def tiny(attn: str, aspect: str = "anyres_max_9"):
    return build_tiny_onevision(attn, vision_aspect_ratio=aspect)


def batch(model, seed: int = 0, sizes=SIZES) -> dict:
    return make_onevision_batch(model, ROWS, seed=seed, image_sizes=sizes)


def policy(T: int, r: float = 0.5, positions: str = "gaps") -> dict:
    return {"stages": [{"criterion": "vispruner", "site": "vision", "tokens": T, "important_ratio": r,
                        "positions": positions}]}


def test_seams_are_the_siglip_tower_without_cls():
    model = tiny("sdpa")
    vs = resolve_adapter(model).vision_seams(model)
    assert not vs.cls_token and vs.mask_only and vs.groups is None and vs.n_patches == 16 and vs.feature_layer == 1
    assert vs.pack_owner is model.model and model.config.vision_feature_select_strategy == "full"


def test_oracle_keep_all_is_the_plain_model():
    """The oracle's tower, projection and packing with every patch kept == the model's image features."""
    model = tiny("eager")
    inputs = batch(model)
    alone = row_alone(inputs, ROWS, 0)
    _, x, pos, n = oracle.reduced_row(model, alone, 16, 0.5)
    ids = alone["input_ids"][0]
    img = (ids == IMAGE_TOKEN_ID).nonzero()[:, 0]
    with torch.no_grad():
        want = model.model.get_image_features(pixel_values=alone["pixel_values"], image_sizes=alone["image_sizes"],
                                              return_dict=True).pooler_output[0]
    assert pos == list(range(n))
    torch.testing.assert_close(x[img], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_is_exactly_unpatched(attn):
    model = tiny(attn)
    assert_keep_all_exact(model, batch(model), ("vispruner:keep=1.0,positions=gaps",
                                                "vispruner:tokens=16,positions=gaps"), {"max_new_tokens": 3, **GEN})


def test_unpatch_restores_exactly():
    model = tiny("sdpa")
    assert_unpatch_restores(model, batch(model), ("vispruner:tokens=5,positions=gaps", "vispruner:keep=0.25"))


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("T,r,positions", [(6, 0.5, "gaps"), (5, 0.2, "gaps"), (4, 1.0, "gaps"), (5, 0.5, "repack")])
def test_prefill_matches_oracle(attn, T, r, positions):
    """Every row of the padded batch: the kept placeholders (positions) and the logits == the oracle on the row alone."""
    model = tiny(attn)
    inputs = batch(model)
    with vtp.patch(model, policy(T, r, positions)) as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    assert st.kept_all == {} and st.vision_kept_patches == T
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        pad = inputs["input_ids"].shape[1] - alone["input_ids"].shape[1]
        kept, want = oracle.logits(model, alone, T, r, positions)
        assert [p - pad for p in st.kept_positions[b]] == kept, f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=1e-4, rtol=0, msg=f"row {b}")


def test_several_images_per_sample_each_keep_their_budget():
    """``batch_num_images``: a sample with two images is not tiled (each its base grid + one newline); each image
    keeps T patches and its newline, and keep-all is the unpatched model."""
    model = tiny("sdpa")
    inputs = make_onevision_batch(model, [[2, "img", 1, "img", 3]], image_sizes=SIZES, batch_num_images=[2])
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, policy(5)) as h:
            out = model(**inputs).logits
            st = h.last_trace().stages[0]
        with vtp.patch(model, policy(16)):
            assert torch.equal(model(**inputs).logits, ref)
    assert st.visual_before == [2 * 17] and st.visual_after == [2 * 6] and out.shape[1] == ref.shape[1] - 22


def test_batch_equals_rows_run_alone():
    model = tiny("sdpa")
    assert_batch_equals_patched_rows_alone(model, batch(model, seed=1), ROWS, policy(5))


def test_cached_generate_matches_oracle_greedy():
    model = tiny("sdpa")
    assert_generate_matches_rows_alone(
        model, batch(model), ROWS, policy(6), lambda alone: oracle.greedy(model, alone, 6, 0.5, 3, suppress=(IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)),
        steps=3, suppress_tokens=GEN["suppress_tokens"])


# ------------------------------------------------------------------------------------------------
# anyres_max: a resized image keeps all its tokens (docs/bad-inputs.md row 156)
# ------------------------------------------------------------------------------------------------
RESIZE = "anyres_max_2"  # at most 2 crops' patches (32) unresized
RESIZE_SIZES = [[32, 32], [20, 36]]  # row 0: 2 x 2 crops, 8 x 8 = 64 patches (resized); row 1: 1 x 2, 4 x 8 = 32


def test_anyres_max_resized_image_keeps_all_its_tokens():
    """``anyres_max_2``: image 0's 8 x 8 unpadded grid is bilinearly shrunk (sqrt(64 / 32) > 1.1: its tokens mix
    patches), so row 0 keeps every token (== the unpatched row bit for bit) and the trace says why (row 1 not)."""
    model = tiny("sdpa", RESIZE)
    inputs = batch(model, sizes=RESIZE_SIZES)
    assert oracle.resized(model, RESIZE_SIZES[0])
    with torch.no_grad():
        ref0 = model(**row_alone(inputs, ROWS, 0)).logits[0]
    with vtp.patch(model, policy(6)) as h, torch.no_grad():
        model(**inputs)
        st = h.last_trace().stages[0]
        assert 0 in st.kept_all and "image 0" in st.kept_all[0] and RESIZE in st.kept_all[0] and 1 not in st.kept_all
        got0 = model(**row_alone(inputs, ROWS, 0)).logits[0]
    assert torch.equal(got0, ref0)


def test_anyres_max_rows_follow_the_oracle():
    model = tiny("eager", RESIZE)
    inputs = batch(model, sizes=RESIZE_SIZES)
    with vtp.patch(model, policy(6)) as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    assert [oracle.resized(model, s) for s in RESIZE_SIZES] == [True, False] and list(st.kept_all) == [0]
    assert st.visual_after[0] == st.visual_before[0] and st.visual_after[1] < st.visual_before[1]
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        pad = inputs["input_ids"].shape[1] - alone["input_ids"].shape[1]
        kept, want = oracle.logits(model, alone, 6, 0.5)
        assert [p - pad for p in st.kept_positions[b]] == kept, f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=1e-4, rtol=0, msg=f"row {b}")


def test_anyres_max_resize_with_strict_is_refused_naming_the_stage():
    model = tiny("sdpa", RESIZE)
    inputs = batch(model, sizes=RESIZE_SIZES)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, policy(6), strict=True):
            with pytest.raises(InputError) as e:
                model(**inputs)
            assert e.value.field == "stages[0]" and RESIZE in str(e.value) and "image 0" in str(e.value)
            ok = make_onevision_batch(model, ROWS, image_sizes=SIZES)  # no resize: strict is fine
            assert model(**ok).logits.shape[1] < ok["input_ids"].shape[1]
        assert torch.equal(model(**inputs).logits, ref)


# ------------------------------------------------------------------------------------------------
# refusals (docs/bad-inputs.md rows 110, 156)
# ------------------------------------------------------------------------------------------------
def test_videos_are_refused_by_name():
    """In a forward (pixels or precomputed video features: the first hook, before any layer), in ``generate()`` (it
    encodes through ``get_video_features``) and in a direct ``get_video_features()`` call; unpatched, videos run."""
    model = tiny("sdpa")
    inputs = make_onevision_batch(model, [[3, "img", 2, "vid", 4]], image_sizes=SIZES[:1], video_frames=2)
    with torch.no_grad():
        enc = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)  # (5.17 names it pixel_values)
        ref = model(**inputs).logits
        pre = {**{k: v for k, v in inputs.items() if k not in ("pixel_values_videos",)}, "mm_encoder_outputs": {"video": enc}}
        with vtp.patch(model, policy(6)):
            calls = (lambda: model(**inputs), lambda: model(**pre),
                     lambda: model.generate(**inputs, max_new_tokens=2, **GEN),
                     lambda: model.model.get_video_features(inputs["pixel_values_videos"]))
            for call in calls:
                with pytest.raises(InputError) as e:
                    call()
                assert e.value.field == "pixel_values_videos" and "pooled" in str(e.value), str(e.value)
            assert "get_video_features" in str(e.value)
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("policy_,match", [
    ("visionzip:keep=0.5", "'visionzip' needs the vision tower's CLS token"),
    ("flowcut_vit:keep=0.5", "SigLIP tower has no CLS token"),
    ("mctf:keep=0.5", "towers with a CLS token only"),
])
def test_cls_methods_refused_by_name_before_any_hook(policy_, match):
    model = tiny("sdpa")
    assert_patch_refused(model, policy_, "stages[0].criterion", match, "allowed here: site vision with vispruner")


def test_tokens_above_a_crop_refused():
    model = tiny("sdpa")
    assert_patch_refused(model, "vispruner:tokens=17,positions=gaps", "stages[0].tokens", "allowed: 1..16")


def test_catalogue_row_names_existing_tests():
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert_rows_name_existing_tests((110, 156))
    assert "OneVision" in catalogue_rows()[156] and "anyres_max" in catalogue_rows()[156]
    assert "OneVision's SigLIP" in catalogue_rows()[110]
