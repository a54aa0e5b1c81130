"""Vision-site VisPruner on Qwen2.5-VL and Qwen2-VL (the Qwen3-VL extension of arXiv 2412.01818's SigLIP rule;
``vision.packed``): Qwen2.5-VL's ViT runs its patches in WINDOW order, so each merge unit is put back at its
placeholder (raster) index before the selection (``PackedTower.unit_order``); Qwen2-VL's rows are in that order. == the independent oracle (tests/reference/qwen2_5_vl_vision_oracle.py:
the window order written out by hand) on rows alone (eager, sdpa), padded batch == rows alone, cached generate ==
the oracle's greedy, keep-all bit-identical, unpatch exact; FlowCut (its in-tower stage is mapped on Qwen2-VL only),
a windowed last block and videos refused by name.

Tiny Qwen2.5-VL from a config: ViT 4 blocks, the last a full-attention block, windows of 2 x 2 LLM tokens; images of
3 x 4, 2 x 3, 4 x 2 LLM tokens (the 3-row grid has partial windows; row 0 two images, row 1 one).
"""
from __future__ import annotations

import functools

import pytest
import torch

import vlm_tokenprune as vtp
from kit import assert_batch_equals_patched_rows_alone, assert_explain_equals_trace, assert_keep_all_exact, assert_patch_refused, assert_unpatch_restores, generate_rows
from reference import pre_llm_oracle
from reference import qwen2_5_vl_vision_oracle as oracle
from vlm_tokenprune import InputError
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, build_tiny_qwen2_vl, make_qwen_batch

torch.set_num_threads(1)

ROWS = [[3, "img", 2, "img", 4], [2, "img", 3]]
GRIDS = [(3, 4), (2, 3), (4, 2)]
SUPPRESS = [IMAGE_TOKEN_ID, 4, 2]  # placeholders and EOS: every greedy run is 3 tokens long
GEN = {"do_sample": False, "suppress_tokens": SUPPRESS}


@functools.cache
def tiny(attn: str, version: str = "2.5"):
    return build_tiny_qwen2_vl(attn, version=version, vision_layers=4)


def batch(model) -> dict:
    return make_qwen_batch(model, ROWS, image_grids=GRIDS)


def row_alone(inputs: dict, b: int) -> dict:
    from test_qwen2_vl_vision_site import row_alone as alone

    return alone(inputs, b)


def policy(T: int, r: float = 0.5) -> str:
    return f"vispruner:tokens={T},important_ratio={r},positions=gaps"


def test_the_tower_runs_units_in_window_order():
    """The grids here are not in raster order inside the tower (else this file would test nothing new)."""
    model = tiny("sdpa")
    m = model.config.vision_config.window_size // 2 // model.config.vision_config.patch_size
    assert m == 2 and oracle.window_order(3, 4, m) != list(range(12)) and oracle.window_order(2, 3, m) != list(range(6))


@pytest.mark.parametrize("version", ["2.5", "2"])  # Qwen2-VL: no windows, the same rule over merge groups
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("T, r", [(2, 0.5), (3, 0.34), (5, 0.6)])
def test_prefill_matches_oracle(attn, T, r, version):
    model = tiny(attn, version)
    inputs = batch(model)
    for b in range(2):
        alone = row_alone(inputs, b)
        with vtp.patch(model, policy(T, r)) as h, torch.no_grad():
            got = model(**alone).logits[0]
            st = h.last_trace().stages[0]
        keep_vis = oracle.kept_positions(model, alone, T, r)
        x, pos3, _, _, _ = pre_llm_oracle.qwen_reduce(model, alone, 1.0, kept=keep_vis)
        assert st.kept_positions[0] == keep_vis
        torch.testing.assert_close(got, pre_llm_oracle.qwen_logits(model, x, pos3), atol=1e-4, rtol=0)


def test_batch_equals_rows_run_alone():
    model = tiny("sdpa")
    assert_batch_equals_patched_rows_alone(model, batch(model), ROWS, policy(3), atol=1e-4)


def test_cached_generate_matches_oracle_greedy():
    model = tiny("sdpa")
    alone = row_alone(batch(model), 0)
    out = generate_rows(model, alone, policy(3), steps=3, suppress_tokens=SUPPRESS)[0]
    keep_vis = oracle.kept_positions(model, alone, 3, 0.5)
    x, pos3, _, _, nxt = pre_llm_oracle.qwen_reduce(model, alone, 1.0, kept=keep_vis)
    assert out == pre_llm_oracle.qwen_greedy(model, x, pos3, nxt, 3, SUPPRESS)


def test_keep_all_is_exactly_unpatched_and_unpatch_restores():
    model = tiny("sdpa")
    inputs = batch(model)
    assert_keep_all_exact(model, inputs, ["vispruner:keep=1.0,positions=gaps"], {"max_new_tokens": 2, **GEN})
    assert_unpatch_restores(model, inputs, [policy(2)])


def test_flowcut_windowed_last_block_and_videos_are_refused_by_name():
    model = tiny("sdpa")
    assert_patch_refused(model, "flowcut_vit:tokens=3,positions=gaps", "stages[0].criterion", "vispruner", "Qwen2-VL")
    windowed = build_tiny_qwen2_vl("sdpa", version="2.5", vision_layers=4)
    windowed.model.visual.fullatt_block_indexes = [1]
    assert_patch_refused(windowed, policy(3), "stages[0].site", "fullatt_block_indexes")
    video = make_qwen_batch(model, [[3, "img", 2, "vid", 4]], image_grids=[(3, 4)], video_grids=[(2, 2, 3)])
    with vtp.patch(model, policy(3)), torch.no_grad(), pytest.raises(InputError) as e:
        model(**video)
    assert e.value.field == "pixel_values_videos"


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_explain_flops_equal_the_traced_run(version):
    """``policy_flops`` (what ``explain`` prints) for VisPruner on Qwen2-VL / Qwen2.5-VL: the tower and the merger run
    on all patches (the pruning happens at the language model's input), so its LLM, tower and projector FLOPs equal
    ``trace_flops`` of the patched run (one image of 16 LLM tokens, 5 kept); they had counted the merger on the
    kept tokens only."""
    model = tiny("sdpa", version)
    assert_explain_equals_trace(model, make_qwen_batch(model, [[4, "img", 3]], image_grids=[(4, 4)], seed=1), policy(5),
                                16, 5)


def test_catalogue_rows_name_existing_tests():
    from kit.catalogue import assert_rows_name_existing_tests

    assert_rows_name_existing_tests((47, 153, 184))
