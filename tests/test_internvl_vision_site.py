"""Vision-site VisionZip (arXiv 2412.04467), VisPruner (arXiv 2412.01818), FlowCut's ViT stage (arXiv
2505.19536) and MCTF (arXiv 2403.10030) on InternVL (issue 21): whole pixel-shuffle groups (the 2 x 2 patches one
LLM token packs) chosen / fused by their summed scores (CLS attention, flow, received attention),
packed by the model's own shuffle, == the independent oracle (tests/reference/internvl_vision_oracle.py:
InternViT written out, plain loops, groups as tokens) in the real batched, left-padded forward and in
cached generate; keep-all bit-identical; unpatch exact; a patch-level vision criterion refused by name.

Tiny InternViT (2 layers) + Qwen2 from configs: 32 px tiles of 8 x 8 patches -> 16 LLM tokens per tile;
images of 3, 1 and 2 tiles (crops + thumbnail).
"""
from __future__ import annotations

import functools

import pytest
import torch
from kit import BACKENDS, assert_keep_all_exact, assert_unpatch_restores, no_hook_left
from reference import internvl_vision_oracle as oracle
from reference import pre_llm_oracle as pl

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_families import build_tiny_internvl, make_internvl_batch
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID
from vlm_tokenprune.methods.base import register_criterion
from vlm_tokenprune.registry import CRITERIA
from vlm_tokenprune.vision.base import VisionCriterion

torch.set_num_threads(1)

ROWS = [[3, "img", 2, "img", 4], [2, "img", 5]]  # row 1 shorter: left padded
TILES = [3, 1, 2]  # row 0: images of 3 and 1 tiles; row 1: one image of 2 tiles
METHODS = {"visionzip": "contextual", "vispruner": "important_ratio"}


@functools.cache
def tiny(attn: str):
    return build_tiny_internvl(attn)


@functools.cache
def tiny4(attn: str):
    """4 InternViT layers: MCTF fuses before layers 1, 2 and 3."""
    return build_tiny_internvl(attn, vision_layers=4)


@functools.cache
def peaked(attn: str):
    """4 InternViT layers (FlowCut scores after layers 0 and 2: adaptive, then forced to the budget), a random CLS
    embedding and scaled-up q / k so the CLS attention is peaked (an adaptive count > 0)."""
    model = build_tiny_internvl(attn, vision_layers=4)
    emb = model.model.vision_tower.embeddings
    with torch.no_grad():
        emb.cls_token.copy_(3 * torch.randn(emb.cls_token.shape, generator=torch.Generator().manual_seed(0)))
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_proj.weight.mul_(30.0)
            layer.attention.k_proj.weight.mul_(30.0)
    return model


def batch(model, seed: int = 0) -> dict:
    return make_internvl_batch(model, ROWS, seed=seed, tiles=TILES)


def policy(method: str, T: int, param: float, positions: str = "repack") -> dict:
    return {"stages": [{"criterion": method, "site": "vision", "tokens": T, METHODS[method]: param,
                        "positions": positions}]}


def test_groups_are_the_model_pixel_shuffle():
    """The adapter's groups == the oracle's (one-channel index coding through the model's shuffle), and the
    oracle's packing (features concatenated in group order) == the model's shuffle of real features."""
    model = tiny("sdpa")
    grp = oracle.groups(model)
    assert resolve_adapter(model).vision_seams(model).groups.tolist() == grp
    assert grp[0] == [0, 1, 8, 9] and sorted(p for m in grp for p in m) == list(range(64))
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    shuffled = model.model.pixel_shuffle(x.reshape(1, 8, 8, 5), scale_factor=0.5).reshape(16, 20)
    assert torch.equal(shuffled, torch.stack([oracle.pack(x, m) for m in grp]))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_all_is_exactly_unpatched(attn):
    model = tiny(attn)
    assert_keep_all_exact(model, batch(model), ("visionzip:keep=1.0", "vispruner:keep=1.0", "vispruner:tokens=16"),
                          {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]})


def test_unpatch_restores_exactly():
    model = tiny("sdpa")
    assert_unpatch_restores(model, batch(model), ("visionzip:tokens=4", "vispruner:keep=0.5"))


def _check(model, inputs, method, T, param, positions):
    with vtp.patch(model, policy(method, T, param, positions)) as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    rows = oracle.reduced_rows(model, inputs, method, T, param)
    for b, (x, pos, vis) in enumerate(rows):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        assert [q - pad for q in st.kept_positions[b]] == vis, f"row {b}"
        want = pl.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - want.shape[0]:], want, atol=1e-4, rtol=0)
    return st, rows


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("method,T,param,positions", [("visionzip", 6, 10 / 64, "repack"), ("visionzip", 5, 0.4, "gaps"),
                                                      ("vispruner", 6, 0.5, "repack"), ("vispruner", 7, 0.25, "gaps")])
def test_prefill_matches_oracle(attn, method, T, param, positions):
    model = tiny(attn)
    st, _ = _check(model, batch(model), method, T, param, positions)
    assert st.visual_after == [4 * T, 2 * T]  # T LLM tokens per tile, 4 and 2 tiles per row


def test_batch_equals_rows_run_alone():
    """Row 0 (two images, 4 tiles) and row 1 (one image, 2 tiles, left padded) alone == in the batch."""
    model = tiny("sdpa")
    inputs = batch(model, seed=1)
    pol = policy("vispruner", 5, 0.5)
    with vtp.patch(model, pol) as h, torch.no_grad():
        full = model(**inputs).logits
        kept = h.last_trace().stages[0].kept_positions
        for b, (first, n) in enumerate([(0, 4), (4, 2)]):
            real = inputs["attention_mask"][b].bool()
            ids = inputs["input_ids"][b][real][None]
            alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "pixel_values": inputs["pixel_values"][first:first + n]}
            out = model(**alone).logits[0]
            pad = int((~real).sum())
            assert [q - pad for q in kept[b]] == h.last_trace().stages[0].kept_positions[0]
            torch.testing.assert_close(full[b, full.shape[1] - out.shape[0]:], out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,param", [("visionzip", 10 / 64), ("vispruner", 0.5)])
def test_cached_generate_matches_oracle_greedy(method, param):
    model = tiny("sdpa")
    inputs = batch(model)
    with vtp.patch(model, policy(method, 6, param)), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    L = inputs["input_ids"].shape[1]
    for b, (x, pos, _) in enumerate(oracle.reduced_rows(model, inputs, method, 6, param)):
        n = int(inputs["attention_mask"][b].sum())
        want = pl.greedy(model, x, pos, "repack", n, 3)
        assert IMAGE_TOKEN_ID not in want
        assert out[b, L:].tolist() == want, f"row {b}"


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("T,positions", [(4, "repack"), (3, "gaps")])
def test_flowcut_vit_matches_oracle(attn, T, positions):
    """FlowCut's ViT stage over whole groups: the tokens each InternViT layer sees (adaptive after layer 0, forced
    to T groups after layer 2), the kept groups and the logits == the oracle's."""
    model = peaked(attn)
    inputs = batch(model)
    with vtp.patch(model, f"flowcut_vit:tokens={T},positions={positions}") as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    encoded, seen = oracle.flowcut_encode(model, inputs["pixel_values"], T)
    assert st.vision_tokens_per_layer == seen
    assert seen[0] == 65 > seen[1] > 1 + 4 * T and seen[3] == 1 + 4 * T  # whole groups of 4 patches + CLS
    assert st.visual_after == [4 * T, 2 * T]
    for b, (x, pos, vis) in enumerate(oracle.reduced_rows(model, inputs, "flowcut_vit", T, 0.0, encoded)):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        assert [q - pad for q in st.kept_positions[b]] == vis, f"row {b}"
        want = pl.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - want.shape[0]:], want, atol=1e-4, rtol=0)


def test_flowcut_vit_keep_all_and_cached_generate():
    model = peaked("sdpa")
    inputs = batch(model)
    assert_keep_all_exact(model, inputs, ("flowcut_vit:keep=1.0",),
                          {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]})
    with vtp.patch(model, "flowcut_vit:tokens=4"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    L = inputs["input_ids"].shape[1]
    for b, (x, pos, _) in enumerate(oracle.reduced_rows(model, inputs, "flowcut_vit", 4, 0.0)):
        want = pl.greedy(model, x, pos, "repack", int(inputs["attention_mask"][b].sum()), 3)
        assert IMAGE_TOKEN_ID not in want and out[b, L:].tolist() == want, f"row {b}"


@pytest.mark.parametrize("method,param", [("visionzip", 10 / 64), ("vispruner", 0.5), ("flowcut_vit", 0.0)])
def test_feature_layer_below_the_last(method, param):
    """``vision_feature_layer=-2`` of 3 InternViT layers: the stage acts at layer 1's output (FlowCut prunes after
    layer 0); the last layer runs on the full grid again (its output is not read) == the oracle."""
    from transformers import InternVLForConditionalGeneration

    from vlm_tokenprune.eval.tiny_families import tiny_internvl_config

    cfg = tiny_internvl_config(vision_layers=3)
    cfg.vision_feature_layer = -2
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    inputs = make_internvl_batch(model, [[3, "img", 2]], tiles=[2])
    key = {"visionzip": {"contextual": param}, "vispruner": {"important_ratio": param}}.get(method, {})
    pol = {"stages": [{"criterion": method, "site": "vision", "tokens": 4, "positions": "repack", **key}]}
    with vtp.patch(model, pol) as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    (x, pos, vis), = oracle.reduced_rows(model, inputs, method, 4, param)
    assert st.kept_positions[0] == vis and st.vision_tokens_per_layer[2] == 65
    want = pl.row_logits(model, x, pos, "repack")
    torch.testing.assert_close(logits[0, logits.shape[1] - want.shape[0]:], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn,T,extra", [("eager", 4, ""), ("sdpa", 4, ""), ("sdpa", 3, ",positions=repack"),
                                          ("eager", 6, ",prop_attn=false"), (BACKENDS[2], 5, ",prop_attn=false")])
def test_mctf_matches_oracle(attn, T, extra):
    """MCTF over whole groups (layers 1..3 of 4): tokens per layer, kept groups, the groups each kept token stands
    for and the logits == the oracle's; proportional attention reaches InternViT's attention (no layer mask)."""
    model = tiny4(attn)
    inputs = batch(model)
    with vtp.patch(model, f"mctf:tokens={T}{extra}") as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
        positions = h.policy.stages[0].params.get("positions", "gaps")
    encoded, seen = oracle.mctf_encode(model, inputs["pixel_values"], T, prop_attn="prop_attn=false" not in extra)
    assert st.vision_tokens_per_layer == seen and seen[-1] == 1 + 4 * T
    sources = oracle.row_sources(model, inputs, encoded)
    for b, (x, pos, vis) in enumerate(oracle.reduced_rows(model, inputs, "mctf", T, 0.0, encoded)):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        assert [q - pad for q in st.kept_positions[b]] == vis, f"row {b}"
        assert [[s - pad for s in ss] for ss in st.sources[b]] == sources[b], f"row {b}"
        want = pl.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - want.shape[0]:], want, atol=1e-4, rtol=0)


def test_mctf_keep_all_and_cached_generate():
    model = tiny4("sdpa")
    inputs = batch(model)
    assert_keep_all_exact(model, inputs, ("mctf:keep=1.0",),
                          {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]})
    with vtp.patch(model, "mctf:tokens=4"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    L = inputs["input_ids"].shape[1]
    encoded, _ = oracle.mctf_encode(model, inputs["pixel_values"], 4)
    for b, (x, pos, _) in enumerate(oracle.reduced_rows(model, inputs, "mctf", 4, 0.0, encoded)):
        want = pl.greedy(model, x, pos, "gaps", int(inputs["attention_mask"][b].sum()), 3)
        assert IMAGE_TOKEN_ID not in want and out[b, L:].tolist() == want, f"row {b}"


def test_mctf_proportional_attention_on_a_mask_only_backend_is_refused():
    model = tiny4(BACKENDS[2])
    with no_hook_left(model), pytest.raises(IncompatiblePolicyError, match=r"stages\[0\]\.prop_attn"):
        vtp.patch(model, "mctf:tokens=4")


def test_presets_count_llm_tokens_per_tile():
    """``visionzip`` (64 of 576 as a fraction): round(16 * 64 / 576) = 2 LLM tokens per tile."""
    model = tiny("sdpa")
    with vtp.patch(model, "visionzip") as h, torch.no_grad():
        model(**batch(model))
        assert h.last_trace().stages[0].visual_after == [8, 4]


class PatchLevel(VisionCriterion):
    """A vision criterion that does not declare ``whole_groups`` (it would pick single patches)."""

    name = "test_patch_level_vision"


@pytest.fixture
def patch_level():
    register_criterion(PatchLevel)
    yield
    CRITERIA.unregister(PatchLevel.name)


def test_patch_level_methods_are_refused_by_name(patch_level):
    """A vision criterion that selects single patches (no ``whole_groups``) is refused, naming the criterion and
    the methods allowed; a budget above the 16 LLM tokens of a tile names ``tokens``."""
    model = tiny("sdpa")
    with no_hook_left(model), pytest.raises(IncompatiblePolicyError, match=r"stages\[0\]\.criterion.*pixel "
                                            r"shuffle.*allowed.*flowcut_vit, mctf, visionzip, vispruner"):
        vtp.patch(model, {"stages": [{"criterion": "test_patch_level_vision", "site": "vision", "keep": 0.5}]})
    with no_hook_left(model), pytest.raises(IncompatiblePolicyError, match=r"stages\[0\]\.tokens.*allowed: 1\.\.16"):
        vtp.patch(model, "vispruner:tokens=17")


def test_catalogue_row_names_these_tests():
    """docs/bad-inputs.md row 110 (vision-site refusals per family) names existing tests, this file's included."""
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert_rows_name_existing_tests((110,))
    assert "test_internvl_vision_site::test_patch_level_methods_are_refused_by_name" in catalogue_rows()[110]


@pytest.mark.parametrize("pol", ["vispruner:tokens=5", "visionzip:keep=0.3"])
def test_explain_flops_equal_the_traced_run(pol):
    """``policy_flops`` (what ``explain`` prints) counts the budget per tile in LLM tokens: its LLM, tower and
    projector FLOPs equal ``trace_flops`` of the patched run (3 tiles, 5 kept tokens each)."""
    from vlm_tokenprune.eval.flops import policy_flops, trace_flops

    model = tiny("sdpa")
    inputs = make_internvl_batch(model, [[5, "img", 7]], tiles=[3])
    with vtp.patch(model, pol) as h, torch.no_grad():
        model(**inputs, logits_to_keep=1)
        traced = trace_flops(model.config, h.last_trace())
    n_text = inputs["input_ids"].shape[1] - 48
    predicted = policy_flops(model.config, pol, n_text, 48)
    assert predicted["tokens_per_layer"] == traced["tokens_per_layer"] == [n_text + 15] * 4
    for key in ("flops", "vision_flops", "projector_flops"):
        assert predicted[key] == traced[key], key
