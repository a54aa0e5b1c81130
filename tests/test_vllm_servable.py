"""The vLLM plugin's engine-free part (``integrations.vllm.servable`` / ``policy_source``), in the main suite:
what is refused by name, and that reducing one image's projected features with ``ServePlan.reduce`` gives
exactly what ``patch()`` feeds the language model for a one-image prompt (kept positions and embeddings),
for LLaVA-1.5 and LLaVA-NeXT (several image sizes), and that ``kept_count`` is the count it keeps.
The vLLM engine itself is exercised in tests/vllm (its own CI job)."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit.models import fresh_llava, tiny_llava
from vlm_tokenprune.eval.tiny_models import make_batch
from vlm_tokenprune.integrations.vllm import policy_source
from vlm_tokenprune.integrations.vllm.servable import (
    check_servable, llava_layout, llava_next_layout, servable_criteria,
)
from vlm_tokenprune.integrations.vllm.vision_site import FeatureLayerSeams, reduce_feature_layer

POLICIES = ["uniform:site=pre_llm,keep=0.3,positions=repack", "random:site=pre_llm,keep=0.4,positions=repack",
            "aim_merge", "aim_merge:keep=0.25,mode=size,order=paper", "divprune:keep=0.2"]


@pytest.mark.parametrize("policy, field, words", [
    ("fastv", "stages[0].layer", "in-LLM stage"),
    ("uniform:site=pre_llm,keep=0.5,positions=repack+fastv:layer=2,keep=0.25", "stages[1].layer", "in-LLM"),
    ("ffn_cut", "stages[0].op", "structural"),
    ("flowcut_vit", "stages[0].site", "vision tower"),
    ("mctf", "stages[0].site", "between the vision tower's encoder layers"),
    ("covipal", "stages[0].criterion", "image_only_fixed_count"),
    ("uniform:site=pre_llm,keep=0.5", "stages[0].positions", "allowed: repack"),
])
def test_refused_by_name(policy, field, words):
    with pytest.raises(vtp.IncompatiblePolicyError) as e:
        check_servable(policy, "llava")
    assert e.value.field == field and words in str(e.value)


def test_family_and_positions_rules():
    with pytest.raises(vtp.IncompatiblePolicyError, match="allowed: gaps"):
        check_servable("aim_merge", "qwen2_vl")  # the preset is repack; M-RoPE keeps (t, h, w) positions
    assert check_servable("aim_merge:positions=gaps", "qwen2_vl").active
    with pytest.raises(vtp.IncompatiblePolicyError, match="model_type"):
        check_servable("aim_merge", "internvl")
    assert check_servable("aim_merge", None).active  # plugin.register: the model is not known yet
    assert not check_servable("uniform:site=pre_llm,keep=1.0,positions=repack", "llava").active
    assert servable_criteria() == ["aim_merge", "divprune", "random", "uniform"]


def test_policy_source(monkeypatch):
    class Cfg:
        vtp_policy = "aim_merge"

    monkeypatch.delenv(policy_source.ENV_VAR, raising=False)
    assert policy_source.policy_spec(None) == (None, "")
    assert policy_source.policy_spec(Cfg())[0] == "aim_merge"
    monkeypatch.setenv(policy_source.ENV_VAR, "divprune")
    assert policy_source.policy_spec(None) == ("divprune", "$VTP_POLICY")
    with pytest.raises(vtp.PolicyError, match="differs"):
        policy_source.policy_spec(Cfg())
    assert policy_source.parse_spec('{"stages": [{"preset": "aim_merge"}]}') == {"stages": [{"preset": "aim_merge"}]}
    with pytest.raises(vtp.PolicyError, match="mm_processor_kwargs.vtp_policy"):
        policy_source.refuse_request_policy({"vtp_policy": "aim_merge"})


def _hf_reduced(model, inputs, policy):
    """What the patched model's language model receives (inputs_embeds) and the kept visual positions."""
    seen = {}
    h = vtp.patch(model, policy)
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
        trace = h.last_trace("prefill")
    finally:
        hook.remove()
        h.unpatch()
    return seen["inputs_embeds"][0], trace


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family, size", [("llava", None), ("llava_next", (48, 48)), ("llava_next", (40, 90)),
                                          ("llava_next", (96, 30))])
def test_reduce_equals_patch(policy, family, size):
    model = tiny_llava(next=family == "llava_next")
    inputs = make_batch(model, [[3, "img", 5]], image_sizes=[list(size)] if size else None)
    with torch.no_grad():
        kw = {"image_sizes": inputs["image_sizes"]} if size else {}
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], **kw)
    feats = (out.pooler_output if hasattr(out, "pooler_output") else out)[0]
    if feats.dim() == 3:  # per-crop features: pack base grid + unpadded anyres grid + image_newline as the model does
        feats = model.model.pack_image_features([feats], inputs["image_sizes"], "default",
                                                image_newline=model.model.image_newline)[0][0]
    n = feats.shape[0]
    assert n == int((inputs["input_ids"] == model.config.image_token_id).sum())
    layout = llava_layout(model.config, n) if size is None else llava_next_layout(model.config, size, n)
    plan = check_servable(policy, family)
    got = plan.reduce(feats, layout)
    want_embeds, trace = _hf_reduced(model, inputs, policy)
    start = 1 + 3  # BOS + 3 text tokens before the image
    st = trace.stages[0]
    assert [p - start for p in st.kept_positions[0]] == got.kept.tolist()
    k = got.kept.numel()
    assert k == plan.kept_count(layout) == st.visual_after[0] < n
    torch.testing.assert_close(got.features, want_embeds[start:start + k], rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["visionzip:keep=0.25", "vispruner:keep=0.25", "visionzip_192",
                                    "vispruner_64:important_ratio=0.5", "visionzip:keep=0.25,contextual=0.0"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_feature_layer_reduction_equals_patch(policy, strategy):
    """The vLLM plugin's vision-site path (``vision_site.reduce_feature_layer`` on the feature layer's output and
    q / k, then the select strategy and the projector) gives what ``patch()`` feeds the language model on LLaVA-1.5,
    and ``kept_count`` is its count. q / k come from transformers' ``q_proj`` / ``k_proj`` here (vLLM: the chunks
    of its fused ``qkv_proj``, tests/vllm)."""
    model = tiny_llava() if strategy == "default" else fresh_llava()
    model.config.vision_feature_select_strategy = strategy
    inputs = make_batch(model, [[3, "img", 5]])
    layers = model.model.vision_tower.encoder.layers
    fl = model.config.vision_feature_layer % (len(layers) + 1) - 1  # hidden_states[i] = output of layer i - 1
    seen = {}
    hooks = [layers[fl].register_forward_hook(lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out))]
    for w in ("q", "k"):
        hooks.append(getattr(layers[fl].self_attn, f"{w}_proj").register_forward_hook(
            lambda m, a, out, w=w: seen.update({w: out})))
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
    finally:
        for h in hooks:
            h.remove()
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    plan = check_servable(policy, "llava")
    assert plan.vision
    seams = FeatureLayerSeams(fl, layers, strategy)
    cut = reduce_feature_layer(plan, seen["h"], seen["q"], seen["k"], seams)
    with torch.no_grad():
        got = model.model.multi_modal_projector(cut[:, 1:] if strategy == "default" else cut)[0]
    want_embeds, trace = _hf_reduced(model, inputs, policy)
    k = trace.stages[0].visual_after[0]
    assert got.shape[0] == k == plan.kept_count(llava_layout(model.config, n)) < n
    start = 1 + 3
    torch.testing.assert_close(got, want_embeds[start:start + k], rtol=1e-6, atol=1e-6)


def test_vision_site_serving_rules():
    assert sorted(n for n in ("visionzip", "vispruner", "flowcut_vit", "mctf")
                  if check_servable_ok(n, "llava")) == ["visionzip", "vispruner"]
    for fam in ("llava_next", "qwen2_vl"):
        with pytest.raises(vtp.IncompatiblePolicyError) as e:
            check_servable("visionzip:positions=gaps" if fam == "qwen2_vl" else "visionzip", fam)
        assert e.value.field == "stages[0].site" and "not served on" in str(e.value)
    assert check_servable("vispruner", None).vision  # plugin.register: the model is not known yet


def check_servable_ok(policy, family) -> bool:
    try:
        check_servable(policy, family)
    except vtp.IncompatiblePolicyError:
        return False
    return True


def test_catalogue_rows_name_existing_tests():
    """docs/bad-inputs.md rows 170-171 (the vLLM plugin) name tests that exist (in tests/ or tests/vllm/)."""
    from kit.catalogue import assert_rows_name_existing_tests

    assert_rows_name_existing_tests((170, 171))
