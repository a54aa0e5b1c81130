"""Vision-site stages (FlowCut's tower stage, MCTF, VisionZip, VisPruner) on the original LLaVA code base
(llava-torch 1.2.x, transformers 4.36) == the same policy on HF ``LlavaForConditionalGeneration`` with the same
weights (``hf_twin``: the HF side's results are ``hf_reference.json``, recomputed and checked in the main
environment by ``tests/test_llava_original_twin.py``). Same kept positions, same token count entering every
tower layer, same logits and greedy tokens; the unpatched twins agree too (the weight mapping is right), a
keep-everything vision stage is exact and ``unpatch()`` restores the model.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

pytest.importorskip("llava.model.language_model.llava_llama", reason="needs the original LLaVA code base (llava-torch)")

import hf_twin  # noqa: E402

import vlm_tokenprune as vtp  # noqa: E402
from vlm_tokenprune.errors import IncompatiblePolicyError  # noqa: E402

torch.set_num_threads(1)
ATOL = 1e-4  # two transformers versions: CLIP scales q before q.k in 4.36, after it in 5.x
REF = json.load(open(hf_twin.REFERENCE))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return hf_twin.save_clip(str(tmp_path_factory.mktemp("twin_clip")))


@functools.lru_cache(maxsize=None)
def _model(clip: str, select: str, attn: str):
    return hf_twin.build_original(clip, select, attn)


def run(model, policy: str | None) -> dict:
    ids, img = hf_twin.original_ids(), hf_twin.image()

    def scores(steps):
        with torch.no_grad():
            return model.generate(inputs=ids, images=img, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                  output_scores=True, return_dict_in_generate=True).scores

    if policy is None:
        with torch.no_grad():
            return hf_twin.record(model(input_ids=ids, images=img).logits, *hf_twin.greedy(scores))
    with vtp.patch(model, policy) as h:
        with torch.no_grad():
            logits = model(input_ids=ids, images=img).logits
        trace = h.last_trace()
        return hf_twin.record(logits, *hf_twin.greedy(scores), trace=trace)


def assert_same(got: dict, want: dict) -> None:
    assert got.get("kept_positions") == want.get("kept_positions")
    assert got.get("vision_tokens_per_layer") == want.get("vision_tokens_per_layer")
    torch.testing.assert_close(torch.tensor(got["last_logits"]), torch.tensor(want["last_logits"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(got["position_norms"]), torch.tensor(want["position_norms"]),
                               atol=ATOL, rtol=0)
    assert want["min_margin"] > 10 * ATOL  # no near-tie the two versions' rounding (~1e-6) could flip
    assert got["generated"] == want["generated"]


@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_unpatched_twins_agree(clip_dir, select):
    """The weight mapping: the original code base and the HF twin give the same logits and tokens unpatched."""
    assert_same(run(_model(clip_dir, select, "eager"), None), REF[f"{select}|plain"])


@pytest.mark.parametrize("select,policy", hf_twin.cases(), ids=[f"{s}|{p}" for s, p in hf_twin.cases()])
def test_vision_stage_equals_hf_llava(clip_dir, select, policy):
    want = REF[f"{select}|{policy}"]
    got = run(_model(clip_dir, select, "eager"), policy)
    assert_same(got, want)
    plain = REF[f"{select}|plain"]
    assert got["generated"] != plain["generated"] or got["last_logits"] != plain["last_logits"]  # the stage acted


@pytest.mark.parametrize("policy", ["flowcut_vit:tokens=4", "mctf:layer=1,tokens=6", "visionzip:tokens=8",
                                    "vispruner:tokens=6"])
def test_vision_stage_under_sdpa_language_model(clip_dir, policy):
    """The language model's sdpa attention (the tower is eager either way) gives the same as the HF twin."""
    assert_same(run(_model(clip_dir, "patch", "sdpa"), policy), REF[f"patch|{policy}"])


def test_keep_all_vision_stage_is_exact_and_unpatch_restores(clip_dir):
    m = _model(clip_dir, "patch", "eager")
    ids, img = hf_twin.original_ids(), hf_twin.image()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        plain = m(input_ids=ids, images=img).logits
    for policy in ("visionzip:keep=1.0", "vispruner:keep=1.0", "mctf:layer=1,keep=1.0"):
        h = vtp.patch(m, policy)
        assert "CLIPVisionModel: forward pre-hook" in h.describe() and "Sequential: forward hook" in h.describe()
        with torch.no_grad():
            assert torch.equal(m(input_ids=ids, images=img).logits, plain), policy
        assert h.last_trace().stages[0].vision_tokens_per_layer == [hf_twin.PATCHES + 1] * 4
        h.unpatch()
    with vtp.patch(m, "flowcut_vit:tokens=4"), torch.no_grad():
        assert m(input_ids=ids, images=img).logits.shape[1] == plain.shape[1] - hf_twin.PATCHES + 4
    assert all(not x._forward_pre_hooks and not x._forward_hooks for x in m.modules())
    assert "prepare_inputs_labels_for_multimodal" not in vars(m)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, images=img).logits, plain)


def test_vision_stage_refusals_name_the_field(clip_dir):
    """Checked at patch() against the original tower, before any hook exists."""
    m = _model(clip_dir, "patch", "eager")
    for policy, field in (("flowcut_vit:tokens=17", "stages[0].tokens"), ("mctf:layer=3,tokens=8", "stages[0].layer"),
                          ("mctf:layer=2,tokens=2", "stages[0].tokens")):
        with pytest.raises(IncompatiblePolicyError) as e:
            vtp.patch(m, policy)
        assert e.value.field == field, (policy, e.value)
        assert all(not x._forward_pre_hooks and not x._forward_hooks for x in m.modules())
        assert "prepare_inputs_labels_for_multimodal" not in vars(m)


LLAVA15_VISION_PRESETS = ["flowcut", "flowcut_vit", "flowcut_vit_192", "flowcut_vit_64", "mctf", "visionzip",
                          "visionzip_128", "visionzip_192", "vispruner", "vispruner_192", "vispruner_64"]


@pytest.mark.parametrize("preset", LLAVA15_VISION_PRESETS)
def test_llava15_vision_presets_run_on_the_original_code_base(clip_dir, preset):
    """Every LLaVA-1.5 vision-site preset (``flowcut`` picks its LLaVA-1.5 setting, ``flowcut_vit``) patches the
    original model and shortens the tower's output and the language model's input by its budget."""
    m = _model(clip_dir, "patch", "eager")
    ids, img = hf_twin.original_ids(), hf_twin.image()
    with vtp.patch(m, preset) as h, torch.no_grad():
        logits = m(input_ids=ids, images=img).logits
        stage = h.last_trace().stages[0]
        budget = h.policy.stages[0].budget.count(hf_twin.PATCHES)
    assert stage.site == "vision" and (preset != "flowcut" or stage.criterion == "flowcut_vit")
    kept = stage.vision_kept_patches
    assert kept < hf_twin.PATCHES and logits.shape[1] == ids.shape[1] - 1 + kept
    assert kept == budget or stage.criterion == "mctf" and kept >= budget
