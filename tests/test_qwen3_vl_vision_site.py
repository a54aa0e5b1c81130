"""Vision-site VisPruner on Qwen3-VL (issue 21): the official SigLIP rule of arXiv 2412.01818 (CLS-free: attention
each patch RECEIVES in the last block, mean over queries then heads) applied to Qwen's packed ViT — a library
extension — over whole MERGE GROUPS (the 2 x 2 patches one LLM token packs), per image; == the independent oracle
(tests/reference/qwen3_vl_vision_oracle.py: the last block's q / k written out, one softmax per image and head,
groups as units, the language model with DeepStack rows at the kept tokens as tests/reference/qwen3_vl_oracle.py
defines) in the real batched, left-padded forward (eager, sdpa, the flash stand-in; dense and MoE) and in cached generate;
keep-all bit-identical; unpatch exact;
videos and the methods that need CLS refused by name.

Tiny Qwen3-VL from a config: ViT 2 blocks (DeepStack after blocks 0 and 1), 2 x 2 merge; images of 3 x 4, 2 x 3,
4 x 2 LLM tokens (row 0 has two images, row 1 one, left padded).
"""
from __future__ import annotations


import pytest
import torch
from helpers import new_tokens
from kit import BACKENDS, assert_explain_equals_trace, assert_keep_all_exact, assert_patch_refused, assert_unpatch_restores, no_hook_left
from reference import qwen3_vl_oracle as q3
from reference import qwen3_vl_vision_oracle as oracle

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, InputError
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_families import make_qwen3_batch
from vlm_tokenprune.eval.tiny_models import make_qwen_batch
from vlm_tokenprune.methods.base import register_criterion
from vlm_tokenprune.registry import CRITERIA
from vlm_tokenprune.vision.base import VisionCriterion

torch.set_num_threads(1)

ATOL = 1e-4
# the batch, its rows alone and the cached tiny models of tests/test_qwen3_vl.py
from test_qwen3_vl import BANNED, GRIDS, batch, row_alone, tiny  # noqa: E402


def policy(T, r: float = 0.5) -> str:
    return f"vispruner:tokens={T},important_ratio={r},positions=gaps"


def test_groups_are_the_model_merger():
    """The adapter found 4 consecutive rows per LLM token by running the merger; the oracle's packing (concatenated
    consecutive rows through the merger's own norm / MLP) == the model's merger and DeepStack mergers."""
    model = tiny("sdpa")
    vs = resolve_adapter(model).vision_seams(model)
    assert vs.packed.group == 4 and not vs.cls_token and vs.feature_layer == len(model.model.visual.blocks) - 1
    y = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))
    m = model.model.visual.merger
    d = model.model.visual.deepstack_merger_list[0]
    with torch.no_grad():
        mine = m.linear_fc2(m.act_fn(m.linear_fc1(oracle.pack(m.norm(y), 4))))
        torch.testing.assert_close(m(y), mine, atol=1e-6, rtol=0)
        mine = d.linear_fc2(d.act_fn(d.linear_fc1(d.norm(oracle.pack(y, 4)))))
        torch.testing.assert_close(d(y), mine, atol=1e-6, rtol=0)


def test_patches_come_in_merge_window_order():
    """The tower's own 2-D rotary position ids (captured at ``rotary_pos_emb``): rows 4j .. 4j+3 are the 2 x 2
    window of LLM token j, windows in raster order over the merged grid (the placeholders' order)."""
    model = tiny("sdpa")
    inputs = batch(model)
    box = {}
    h = model.model.visual.rotary_pos_emb.register_forward_pre_hook(lambda mod, args: box.update(p=args[1]))
    try:
        with torch.no_grad():
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        h.remove()
    pos, s = box["p"].tolist(), 0
    for hh, ww in GRIDS:
        for j in range(hh * ww):
            r, c = divmod(j, ww)
            assert pos[s + 4 * j:s + 4 * j + 4] == [[2 * r, 2 * c], [2 * r, 2 * c + 1], [2 * r + 1, 2 * c],
                                                    [2 * r + 1, 2 * c + 1]]
        s += 4 * hh * ww


def test_oracle_importance_discriminates():
    """The importance is per image (cu_seqlens): one image alone gives the same kept set as with another image
    before it; sum per group vs. max per group changes the ranking (the test can fail)."""
    model = tiny("eager")
    inputs = batch(model)
    pv, thw = inputs["pixel_values"], inputs["image_grid_thw"]
    n0, n01 = int(thw[0].prod()), int(thw[:2].prod(-1).sum())
    both = oracle.select(model, pv[:n01], thw[:2], 3, 0.5)
    assert oracle.select(model, pv[n0:n01], thw[1:2], 3, 0.5) == both[1:]
    x, pe, _ = oracle.last_block_io(model, pv[:n0], thw[:1])
    imp = oracle.importance(model, x, pe, [n0])
    s = [sum(imp[4 * t:4 * t + 4]) for t in range(n0 // 4)]
    mx = [max(imp[4 * t:4 * t + 4]) for t in range(n0 // 4)]
    assert sorted(range(len(s)), key=lambda i: -s[i])[:4] != sorted(range(len(mx)), key=lambda i: -mx[i])[:4]


@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_is_exactly_unpatched(attn):
    model = tiny(attn)
    assert_keep_all_exact(model, batch(model), ("vispruner:keep=1.0,positions=gaps", policy(12)),
                          {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": BANNED})


def test_unpatch_restores_exactly():
    model = tiny("sdpa")
    assert_unpatch_restores(model, batch(model), (policy(3), "vispruner:keep=0.5,positions=gaps"))


@pytest.mark.parametrize("T,r", [(3, 0.5), (4, 1.0), (2, 0.0)])
@pytest.mark.parametrize("attn", BACKENDS)
def test_prefill_matches_oracle(attn, T, r, moe=False):
    """Left-padded batch of 2 rows (row 0: two images of 12 and 6 tokens; row 1: one of 8): kept positions per
    row == the oracle's, logits atol 1e-4 (DeepStack rows injected at the kept tokens, original positions); the
    tower and the language model on eager, sdpa and the flash stand-in (2-D masks, cu_seqlens in the tower)."""
    model = tiny(attn, moe)
    inputs = batch(model)
    with vtp.patch(model, policy(T, r)) as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, b)
        pad = L - alone["input_ids"].shape[1]
        kept, want = oracle.run(model, alone, T, r)
        assert len(kept) == T * (2 if b == 0 else 1)
        assert trace.stages[0].kept_positions[b] == [p + pad for p in kept], f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0, msg=f"row {b}")


def test_moe_prefill_matches_oracle():
    """Qwen3-VL-MoE: the same tower; routing is per kept token."""
    test_prefill_matches_oracle("sdpa", 3, 0.5, moe=True)


def test_keep_fraction_counts_llm_tokens_per_image():
    """``keep`` rounds per image (12 -> 6, 6 -> 3, 8 -> 4 LLM tokens)."""
    model = tiny("sdpa")
    inputs = batch(model)
    with vtp.patch(model, "vispruner:keep=0.5,positions=gaps") as h, torch.no_grad():
        model(**inputs)
        kept = h.last_trace().stages[0].kept_positions
    assert [len(k) for k in kept] == [9, 4]


def test_batch_equals_rows_run_alone():
    model = tiny("sdpa")
    inputs = batch(model)
    with vtp.patch(model, policy(3)), torch.no_grad():
        logits = model(**inputs).logits
        for b in range(2):
            alone = row_alone(inputs, b)
            one = model(**alone).logits[0]
            torch.testing.assert_close(logits[b, -one.shape[0]:], one, atol=1e-5, rtol=0)


def test_deepstack_follows_the_kept_groups():
    """Without the DeepStack rows the oracle's logits differ: the injected features at the kept tokens matter."""
    model = tiny("eager")
    alone = row_alone(batch(model), 0)
    kept = oracle.select(model, alone["pixel_values"], alone["image_grid_thw"], 3, 0.5)
    start, _ = oracle.start_positions(model, alone, kept)
    eager, prompt = q3.eager_copy(model), q3.Prompt(model, alone)
    with_ds, _ = q3.forward(eager, prompt, start=start)
    without, _ = q3.forward(eager, prompt, start=start, skip_deepstack=True)
    assert (with_ds[-1] - without[-1]).abs().max() > 1e-3


def test_cached_generate_matches_oracle_greedy():
    model = tiny("sdpa")
    inputs = make_qwen_batch(model, [[4, "img", 3]], image_grids=[(4, 4)], seed=1)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    with vtp.patch(model, policy(5)), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=BANNED)
    assert new_tokens(g[0], L, eos, pad) == oracle.greedy(model, inputs, 5, 0.5, 3, eos=eos)


@pytest.mark.parametrize("policy_,field,match", [
    ("visionzip:keep=0.5", "stages[0].criterion", "CLS"),
    ("flowcut_vit:keep=0.5", "stages[0].criterion", "CLS"),
    ("mctf:keep=0.5", "stages[0].criterion", "allowed here: site vision with vispruner"),
    ("vispruner:keep=0.5", "stages[0].positions", "allowed: gaps"),
])
def test_refused_by_name_before_any_hook(policy_, field, match):
    model = tiny("sdpa")
    assert_patch_refused(model, policy_, field, match)


def test_criterion_without_a_packed_rule_is_refused():
    """A CLS-free criterion that defines no selection over the packed tower (no ``select_units``): refused by name."""

    @register_criterion
    class _Picker(VisionCriterion):
        name = "q3_picker"
        cls_free = True
        whole_groups = True

    try:
        model = tiny("sdpa")
        with no_hook_left(model), pytest.raises(IncompatiblePolicyError) as e:
            vtp.patch(model, {"stages": [{"criterion": "q3_picker", "site": "vision", "keep": 0.5,
                                          "positions": "gaps"}]})
        assert e.value.field == "stages[0].criterion" and "packed" in str(e.value)
        assert "allowed at site vision here: vispruner" in str(e.value)
    finally:
        CRITERIA.unregister("q3_picker")


def test_qwen2_5_vl_and_cls_methods_on_qwen2_vl_are_refused_by_name():
    """Qwen2-VL / Qwen2.5-VL's packed ViTs run VisPruner too (tests/test_qwen2_vl_vision_site.py,
    tests/test_qwen2_5_vl_vision_site.py), not the CLS methods; FlowCut's in-tower stage runs on Qwen2-VL only."""
    from vlm_tokenprune.eval.tiny_models import build_tiny_qwen2_vl

    model = build_tiny_qwen2_vl("sdpa", version="2.5")
    assert_patch_refused(model, "flowcut_vit:tokens=3,positions=gaps", "stages[0].criterion", "site vision with vispruner")
    model = build_tiny_qwen2_vl("sdpa", version="2")
    assert_patch_refused(model, "visionzip:tokens=3,positions=gaps", "stages[0].criterion", "flowcut_vit, vispruner")


def test_videos_are_refused_by_name():
    model = tiny("sdpa")
    inputs = make_qwen3_batch(model, [[3, "img", 2, "vid", 4]], image_grids=[(3, 4)], video_grids=[(2, 2, 3)])
    with vtp.patch(model, policy(3)), torch.no_grad(), pytest.raises(InputError) as e:
        model(**inputs)
    assert e.value.field == "pixel_values_videos" and "allowed: images" in str(e.value)


def test_explain_flops_equal_the_traced_run():
    """``policy_flops`` (what ``explain`` prints) counts the budget per image in LLM tokens; the tower and every
    merger (the merger and the DeepStack mergers) run on all patches: its LLM, tower and projector FLOPs equal
    ``trace_flops`` of the patched run (one image of 16 LLM tokens, 5 kept)."""
    model = tiny("sdpa")
    inputs = make_qwen3_batch(model, [[4, "img", 3]], image_grids=[(4, 4)], seed=1)
    assert_explain_equals_trace(model, inputs, policy(5), 16, 5)


def test_catalogue_row_names_existing_tests():
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert_rows_name_existing_tests((110, 153))
    assert "Qwen3-VL" in catalogue_rows()[153] and "pixel_values_videos" in catalogue_rows()[153]
