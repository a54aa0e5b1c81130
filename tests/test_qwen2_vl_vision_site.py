"""FlowCut's vision stage on Qwen2-VL as the official FlowCut_Qwen code runs it (arXiv 2505.19536;
``vision.packed_flowcut``): single patches pruned inside the packed ViT by the image's mean-query attention x value
L1 norm, cumulative, entropy-adaptive every 2 blocks, forced to 4 T patches after the last block; the merger packs
4 consecutive kept patches; the image's T tokens take its first T placeholders. == the independent oracle
(tests/reference/qwen2_vl_flowcut_oracle.py: the blocks written out per image) on rows alone (eager, sdpa), the
padded batch == its rows alone, cached generate == the oracle's greedy, keep-all bit-identical, unpatch exact; the
``flowcut`` preset is the official two-stage pipeline on Qwen2-VL (VisPruner on this tower:
tests/test_qwen2_5_vl_vision_site.py); refusals by name (CLS criteria, videos, FlowCut on
Qwen2.5-VL's windowed tower).

Tiny Qwen2-VL from a config: ViT 6 blocks (prunes after blocks 1, 3, 5) with sharpened q / k so the adaptive
counts drop patches before the last block; images of 3 x 4, 2 x 3, 4 x 2 LLM tokens (row 0 two, row 1 one).
"""
from __future__ import annotations

import functools

import pytest
import torch

import vlm_tokenprune as vtp
from kit import assert_batch_equals_patched_rows_alone, assert_keep_all_exact, assert_patch_refused, assert_unpatch_restores, generate_rows
from reference import qwen2_vl_flowcut_oracle as oracle
from vlm_tokenprune import InputError, Policy
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, build_tiny_qwen2_vl, make_qwen_batch

torch.set_num_threads(1)

ROWS = [[3, "img", 2, "img", 4], [2, "img", 3]]
GRIDS = [(3, 4), (2, 3), (4, 2)]
SUPPRESS = [IMAGE_TOKEN_ID, 4, 2]  # placeholders and EOS: every greedy run is 3 tokens long
GEN = {"do_sample": False, "suppress_tokens": SUPPRESS}


@functools.cache
def tiny(attn: str):
    model = build_tiny_qwen2_vl(attn, version="2", vision_layers=6)
    C = model.config.vision_config.embed_dim
    with torch.no_grad():  # sharper q / k: the image's mean query attends unevenly, so the adaptive counts drop
        for blk in model.model.visual.blocks:
            blk.attn.qkv.weight[:2 * C].mul_(40.0)
            blk.attn.qkv.bias[:2 * C].add_(2.0)
    return model


def batch(model, seed: int = 0) -> dict:
    return make_qwen_batch(model, ROWS, seed=seed, image_grids=GRIDS)


def row_alone(inputs: dict, b: int) -> dict:
    real = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][real][None]
    lo, hi = [(0, 2), (2, 3)][b]
    thw = inputs["image_grid_thw"]
    start, n = int(thw[:lo].prod(-1).sum()), int(thw[lo:hi].prod(-1).sum())
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": thw[lo:hi],
           "pixel_values": inputs["pixel_values"][start:start + n]}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][b][real][None]
    return out


def policy(T: int) -> str:
    return f"flowcut_vit:tokens={T},positions=gaps"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("T", [2, 3, 5])
def test_prefill_matches_oracle(attn, T):
    model = tiny(attn)
    inputs = batch(model)
    for b in range(2):
        alone = row_alone(inputs, b)
        with vtp.patch(model, policy(T)) as h, torch.no_grad():
            got = model(**alone).logits[0]
            st = h.last_trace().stages[0]
        keep_vis, want = oracle.logits(model, alone, T)
        assert st.kept_positions[0] == keep_vis
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_adaptive_counts_drop_before_the_last_block():
    """Patches left after each block (all images): the entropy rule drops after blocks 1 and 3, the last block
    forces 4 T per image (row 0: 12 and 6 LLM tokens, T = 2 each -> 16 patches)."""
    model = tiny("sdpa")
    alone = row_alone(batch(model), 0)
    with vtp.patch(model, policy(2)) as h, torch.no_grad():
        model(**alone)
    n = h.last_trace().stages[0].vision_tokens_per_layer
    assert len(n) == 6 and n[0] == 72 and n[1] < 72 and n[3] < n[2] and n[-1] == 16, n


def test_batch_equals_rows_run_alone():
    model = tiny("sdpa")
    assert_batch_equals_patched_rows_alone(model, batch(model), ROWS, policy(3), atol=1e-4)


def test_cached_generate_matches_oracle_greedy():
    model = tiny("sdpa")
    alone = row_alone(batch(model), 0)
    out = generate_rows(model, alone, policy(3), steps=3, suppress_tokens=SUPPRESS)[0]
    assert out == oracle.greedy(model, alone, 3, 3, suppress=SUPPRESS)


def test_keep_all_is_exactly_unpatched_and_unpatch_restores():
    model = tiny("sdpa")
    inputs = batch(model)
    assert_keep_all_exact(model, inputs, ["flowcut_vit:keep=1.0,positions=gaps"], {"max_new_tokens": 2, **GEN})
    assert_unpatch_restores(model, inputs, [policy(2), "flowcut"])


def test_flowcut_preset_is_the_official_qwen_pipeline():
    """``flowcut`` on Qwen2-VL: 44.4 % of each image's tokens in the ViT, then ``flowcut_llm`` after decoder layer 1
    keeps 22.2 % of the original (the official FlowCut_Qwen: ViT target 2 x target_num); Qwen2.5-VL keeps the LLM
    stage alone (no vision stage maps its windowed ViT)."""
    model = tiny("sdpa")
    inputs = batch(model)
    with vtp.patch(model, "flowcut") as h, torch.no_grad():
        assert h.policy == Policy.parse("flowcut_qwen")
        model(**inputs)
        vision, llm = h.last_trace().stages
    assert (vision.site, llm.site) == ("vision", "llm")
    assert vision.visual_after == [round(4 / 9 * 12) + round(4 / 9 * 6), round(4 / 9 * 8)]  # 5 + 3, 4 (per image)
    assert llm.visual_after == [round(2 / 9 * 18), round(2 / 9 * 8)]  # of the original row counts
    assert Policy.parse("flowcut", family="qwen2_5_vl") == Policy.parse("flowcut_llm")


def test_other_criteria_videos_and_qwen2_5_vl_are_refused_by_name():
    model = tiny("sdpa")
    assert_patch_refused(model, "visionzip:tokens=3,positions=gaps", "stages[0].criterion", "flowcut_vit, vispruner")
    assert_patch_refused(model, "mctf:tokens=3,positions=gaps", "stages[0].criterion", "flowcut_vit, vispruner")
    assert_patch_refused(model, "flowcut_vit:tokens=3", "stages[0].positions", "gaps")  # positions=repack (the LLaVA default) is not defined here
    video = make_qwen_batch(model, [[3, "img", 2, "vid", 4]], image_grids=[(3, 4)], video_grids=[(2, 2, 3)])
    with vtp.patch(model, policy(3)), torch.no_grad(), pytest.raises(InputError) as e:
        model(**video)
    assert e.value.field == "pixel_values_videos"
    q25 = build_tiny_qwen2_vl("sdpa", version="2.5")  # its windowed ViT: VisPruner only (test_qwen2_5_vl_vision_site)
    assert_patch_refused(q25, policy(3), "stages[0].criterion", "allowed here: site vision with vispruner")


def test_catalogue_row_names_existing_tests():
    from kit.catalogue import assert_rows_name_existing_tests

    assert_rows_name_existing_tests((153, 184))
