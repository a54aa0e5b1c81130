"""Vision-site VisPruner on Gemma 3 (issue 21): the official code's SigLIP variant (arXiv 2412.01818,
``siglip_encoder.py``: importance = last-layer attention each patch receives, mean over queries then heads) over
whole POOLING WINDOWS (the k x k patches one LLM token averages), == the independent oracle
(tests/reference/gemma3_vision_oracle.py: SigLIP written out, plain loops, windows as tokens, the language model
masked as tests/reference/gemma3_oracle.py defines) in the real batched, left-padded forward and in cached generate;
keep-all bit-identical; unpatch exact; the methods that need CLS (and MCTF) refused by name.

Tiny Gemma 3 from a config: SigLIP 2 layers, 32 px images of 8 x 8 patches pooled 2 x 2 -> 16 LLM tokens per
image; 6 text layers (0-4 slide over 8 positions); row 0 has two images, row 1 one (left padded).
"""
from __future__ import annotations

import functools

import pytest
import torch
from kit import assert_batch_equals_patched_rows_alone, assert_generate_matches_rows_alone, assert_keep_all_exact, assert_patch_refused, assert_unpatch_restores, no_hook_left, row_alone
from reference import gemma3_vision_oracle as oracle

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_gemma3 import build_tiny_gemma3, make_gemma3_batch
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID
from vlm_tokenprune.methods.base import register_criterion
from vlm_tokenprune.registry import CRITERIA
from vlm_tokenprune.vision.base import VisionCriterion

torch.set_num_threads(1)

ROWS = [[3, "img", 2, "img", 6], [2, "img", 5]]  # row 1 shorter: left padded
BACKENDS = ("eager", "sdpa")  # Gemma 3 refuses flash-style backends (tests/test_gemma3.py)
GEN = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]}


@functools.cache
def tiny(attn: str):
    return build_tiny_gemma3(attn)


def batch(model, seed: int = 0) -> dict:
    return make_gemma3_batch(model, ROWS, seed=seed)


def policy(T: int, r: float = 0.5) -> dict:
    return {"stages": [{"criterion": "vispruner", "site": "vision", "tokens": T, "important_ratio": r,
                        "positions": "gaps"}]}


def test_groups_are_the_model_pooling_windows():
    """The adapter's groups (one-hot patches through the model's projector) == the oracle's windows from the
    config's geometry, and the model's pooling of real features is the mean over those windows."""
    model = tiny("sdpa")
    win = oracle.windows(model)
    vs = resolve_adapter(model).vision_seams(model)
    assert vs.groups.tolist() == win and win[0] == [0, 1, 8, 9] and not vs.cls_token
    assert vs.n_patches == 64 and vs.n_tokens == 16 and vs.feature_layer == 1
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        pooled = proj.avg_pool(x.transpose(1, 2).reshape(1, 32, 8, 8)).flatten(2).transpose(1, 2)[0]
    torch.testing.assert_close(pooled, torch.stack([x[0, m].mean(0) for m in win]), atol=1e-6, rtol=0)


def test_oracle_keep_all_is_the_plain_model():
    """The oracle's tower, pooling and projection with every window kept == the model's image features."""
    model = tiny("eager")
    inputs = batch(model)
    with torch.no_grad():
        want = model.model.get_image_features(inputs["pixel_values"][:1], return_dict=True).pooler_output[0]
    kept, tokens = oracle.select(model, inputs["pixel_values"][0], 16, 0.5)
    assert kept == list(range(16))
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", BACKENDS)
def test_kept_image_tokens_are_the_unpatched_ones_bit_for_bit(attn):
    """The projector runs on every pooled window and the kept windows' rows are taken (``project_kept_only=False``):
    each kept LLM token equals the unpatched model's bit for bit; dropped ones are zero (their placeholders leave)."""
    model = tiny(attn)
    pixels = batch(model)["pixel_values"]
    with torch.no_grad():
        ref = model.model.get_image_features(pixels, return_dict=True).pooler_output
        with vtp.patch(model, policy(6)):
            got = model.model.get_image_features(pixels, return_dict=True).pooler_output
    kept = got.abs().sum(-1) > 0
    assert kept.sum(1).tolist() == [6, 6, 6] and torch.equal(got[kept], ref[kept])


@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_is_exactly_unpatched(attn):
    model = tiny(attn)
    assert_keep_all_exact(model, batch(model), ("vispruner:keep=1.0,positions=gaps",
                                                "vispruner:tokens=16,positions=gaps"), {"max_new_tokens": 3, **GEN})


def test_unpatch_restores_exactly():
    model = tiny("sdpa")
    assert_unpatch_restores(model, batch(model), ("vispruner:tokens=5,positions=gaps",))


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("T,r", [(6, 0.5), (5, 0.2), (4, 1.0)])
def test_prefill_matches_oracle(attn, T, r):
    """Every row of the padded batch: the kept windows (positions) and the logits == the oracle on the row alone."""
    model = tiny(attn)
    inputs = batch(model)
    with vtp.patch(model, policy(T, r)) as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    assert st.visual_after == [2 * T, T]
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        pad = inputs["input_ids"].shape[1] - alone["input_ids"].shape[1]
        kept, want = oracle.logits(model, alone, T, r)
        assert [p - pad for p in st.kept_positions[b]] == kept, f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=1e-4, rtol=0, msg=f"row {b}")


def test_batch_equals_rows_run_alone():
    model = tiny("sdpa")
    assert_batch_equals_patched_rows_alone(model, batch(model, seed=1), ROWS, policy(5))


def test_cached_generate_matches_oracle_greedy():
    model = tiny("sdpa")
    assert_generate_matches_rows_alone(
        model, batch(model), ROWS, policy(6), lambda alone: oracle.greedy(model, alone, 6, 0.5, 3, suppress=(IMAGE_TOKEN_ID,)),
        steps=3, suppress_tokens=GEN["suppress_tokens"])


def test_sum_per_window_matters():
    """The test can fail: ranking windows by their best patch (max instead of sum) keeps other windows here."""
    model = tiny("sdpa")
    win = oracle.windows(model)
    _, imp = oracle.siglip(model, batch(model)["pixel_values"][0])
    by_sum = sorted(range(16), key=lambda t: -float(sum(imp[p] for p in win[t])))[:4]
    by_max = sorted(range(16), key=lambda t: -float(max(imp[p] for p in win[t])))[:4]
    assert by_sum != by_max


# ------------------------------------------------------------------------------------------------
# refusals (docs/bad-inputs.md rows 110, 111)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy_,field,match", [
    ("visionzip:keep=0.5,positions=gaps", "stages[0].criterion", "'visionzip' needs the vision tower's CLS token"),
    ("flowcut_vit:keep=0.5,positions=gaps", "stages[0].criterion", "SigLIP tower has no CLS token"),
    ("mctf:keep=0.5,positions=gaps", "stages[0].criterion", "towers with a CLS token only"),
    ("vispruner:keep=0.5", "stages[0].positions", "allowed: gaps"),
    ("vispruner:tokens=17,positions=gaps", "stages[0].tokens", "allowed: 1..16"),
])
def test_refused_by_name_before_any_hook(policy_, field, match):
    model = tiny("sdpa")
    err = assert_patch_refused(model, policy_, field, match)
    if field == "stages[0].criterion":
        assert "allowed here: site vision with vispruner" in str(err)


def test_cls_free_criterion_without_whole_windows_is_refused():
    """A CLS-free criterion that picks single patches: each Gemma 3 LLM token pools 4 patches, so refused by name."""

    @register_criterion
    class _PatchPicker(VisionCriterion):
        name = "g3_patch_picker"
        cls_free = True

    try:
        model = tiny("sdpa")
        with no_hook_left(model), pytest.raises(IncompatiblePolicyError) as e:
            vtp.patch(model, {"stages": [{"criterion": "g3_patch_picker", "site": "vision", "keep": 0.5,
                                          "positions": "gaps"}]})
        assert e.value.field == "stages[0].criterion" and "average pooling" in str(e.value)
        assert "allowed at site vision here: " in str(e.value) and "vispruner" in str(e.value)
    finally:
        CRITERIA.unregister("g3_patch_picker")


def test_explain_flops_equal_the_traced_run():
    """``policy_flops`` (what ``explain`` prints) counts the budget per image in LLM tokens (pooling windows): its
    LLM, tower and projector FLOPs equal ``trace_flops`` of the patched run (2 images, 5 kept tokens each)."""
    from vlm_tokenprune.eval.flops import policy_flops, trace_flops

    model = tiny("sdpa")
    inputs = make_gemma3_batch(model, [[5, "img", 2, "img", 7]])
    pol = "vispruner:tokens=5,positions=gaps"
    with vtp.patch(model, pol) as h, torch.no_grad():
        model(**inputs, logits_to_keep=1)
        traced = trace_flops(model.config, h.last_trace())
    n_text = inputs["input_ids"].shape[1] - 32
    predicted = policy_flops(model.config, pol, n_text, 32)
    assert predicted["tokens_per_layer"] == traced["tokens_per_layer"] == [n_text + 10] * 6
    for key in ("flops", "vision_flops", "projector_flops"):
        assert predicted[key] == traced[key], key
    full = policy_flops(model.config, "vispruner:tokens=16,positions=gaps", n_text, 32)
    assert predicted["projector_flops"] == full["projector_flops"]  # every pooled token is projected (bit-exact)


def test_explain_gemma_3_4b_by_hand():
    """gemma-3-4b (64 x 64 SigLIP patches pooled 4 x 4 -> 256 tokens), two images, 64 kept tokens each: the LLM sees
    64 text + 128 image tokens in every layer; the tower runs whole (the stage acts on its last layer's output) and
    the norm + 1152 -> 2560 projection on all 512 pooled tokens (the kept ones are taken after it, bit-exact)."""
    from vlm_tokenprune.commands.explain import _load_model_config
    from vlm_tokenprune.eval.flops import policy_flops

    cfg, n_visual, _ = _load_model_config("gemma-3-4b")
    out = policy_flops(cfg, "vispruner:tokens=64,positions=gaps", 64, 2 * n_visual)
    whole = policy_flops(cfg, "vispruner:tokens=256,positions=gaps", 64, 2 * n_visual)
    assert out["tokens_per_layer"] == [64 + 128] * 34 and whole["tokens_per_layer"] == [64 + 512] * 34
    assert out["projector_flops"] == whole["projector_flops"] == 2 * 512 * 1152 * 2560
    assert out["vision_flops"] == whole["vision_flops"]


def test_catalogue_row_names_existing_tests():
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert_rows_name_existing_tests((110,))
    row = catalogue_rows()[110]
    assert "Gemma 3" in row and "cls_free" in row and "positions=gaps" in row
