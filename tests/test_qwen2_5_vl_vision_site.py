"""Vision-site VisPruner on Qwen2.5-VL (the Qwen3-VL extension of arXiv 2412.01818's SigLIP rule; ``vision.packed``
with ``PackedTower.unit_order``): the ViT runs its patches in WINDOW order, so each merge unit is put back at its
placeholder (raster) index before the selection. == the independent oracle (tests/reference/qwen2_5_vl_vision_oracle.py:
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
from kit import assert_batch_equals_patched_rows_alone, assert_keep_all_exact, assert_unpatch_restores, no_hook_left
from reference import pre_llm_oracle
from reference import qwen2_5_vl_vision_oracle as oracle
from vlm_tokenprune import IncompatiblePolicyError, InputError
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, build_tiny_qwen2_vl, make_qwen_batch

torch.set_num_threads(1)

ROWS = [[3, "img", 2, "img", 4], [2, "img", 3]]
GRIDS = [(3, 4), (2, 3), (4, 2)]
GEN = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID, 4]}


@functools.cache
def tiny(attn: str):
    return build_tiny_qwen2_vl(attn, version="2.5", vision_layers=4)


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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("T, r", [(2, 0.5), (3, 0.34), (5, 0.6)])
def test_prefill_matches_oracle(attn, T, r):
    model = tiny(attn)
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
    L = alone["input_ids"].shape[1]
    with vtp.patch(model, policy(3)), torch.no_grad():
        out = model.generate(**alone, max_new_tokens=3, **GEN)[0, L:].tolist()
    keep_vis = oracle.kept_positions(model, alone, 3, 0.5)
    x, pos3, _, _, nxt = pre_llm_oracle.qwen_reduce(model, alone, 1.0, kept=keep_vis)
    assert out == pre_llm_oracle.qwen_greedy(model, x, pos3, nxt, 3, GEN["suppress_tokens"])


def test_keep_all_is_exactly_unpatched_and_unpatch_restores():
    model = tiny("sdpa")
    inputs = batch(model)
    assert_keep_all_exact(model, inputs, ["vispruner:keep=1.0,positions=gaps"], {"max_new_tokens": 2, **GEN})
    assert_unpatch_restores(model, inputs, [policy(2)])


def test_flowcut_windowed_last_block_and_videos_are_refused_by_name():
    model = tiny("sdpa")
    with no_hook_left(model), pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(model, "flowcut_vit:tokens=3,positions=gaps")
    assert e.value.field == "stages[0].criterion" and "vispruner" in str(e.value) and "Qwen2-VL" in str(e.value)
    windowed = build_tiny_qwen2_vl("sdpa", version="2.5", vision_layers=4)
    windowed.model.visual.fullatt_block_indexes = [1]
    with no_hook_left(windowed), pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(windowed, policy(3))
    assert e.value.field == "stages[0].site" and "fullatt_block_indexes" in str(e.value)
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
    from vlm_tokenprune.eval.flops import policy_flops, trace_flops, unpruned_flops

    model = tiny("sdpa") if version == "2.5" else build_tiny_qwen2_vl("sdpa", version="2")
    inputs = make_qwen_batch(model, [[4, "img", 3]], image_grids=[(4, 4)], seed=1)
    with vtp.patch(model, policy(5)) as h, torch.no_grad():
        model(**inputs, logits_to_keep=1)
        traced = trace_flops(model.config, h.last_trace())
    n_text = inputs["input_ids"].shape[1] - 16
    predicted = policy_flops(model.config, policy(5), n_text, 16)
    L = model.config.text_config.num_hidden_layers
    assert predicted["tokens_per_layer"] == traced["tokens_per_layer"] == [n_text + 5] * L
    whole = unpruned_flops(model.config, n_text, 16)
    for key in ("flops", "vision_flops", "projector_flops"):
        assert predicted[key] == traced[key], key
    assert predicted["projector_flops"] == whole["projector_flops"]


def test_catalogue_rows_name_existing_tests():
    from kit.catalogue import assert_rows_name_existing_tests

    assert_rows_name_existing_tests((47, 153, 184))
