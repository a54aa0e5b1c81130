"""DivPrune, DART, VisPruner, VisionZip in the tools: ``viz`` pictures their kept tokens (VisionZip's merged
groups coloured), and the predicted prefill FLOPs equal the traced ones where the count is the budget."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune.eval import visualize as V
from vlm_tokenprune.eval.flops import policy_flops, trace_flops
from vlm_tokenprune.eval.synthetic import make_example
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch
from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm


@pytest.fixture(scope="module")
def tiny_vlm():
    torch.set_num_threads(1)
    return load_tiny_vlm()


@pytest.mark.parametrize("policy,merged", [("divprune:keep=0.25", False), ("dart:keep=0.25,count=exact", False),
                                           ("vispruner:keep=0.25", False), ("visionzip:keep=0.25", True)])
def test_viz_panels(tiny_vlm, policy, merged):
    model, processor = tiny_vlm
    ex = make_example(2_000_000_001, "location")
    _, panels = V.kept_tokens(model, processor, ex["image"], ex["question"], policy)
    (panel,) = panels
    assert panel.visual_after == len(panel.kept_cells) == 64  # 25 % of 16 x 16
    assert bool(panel.groups) == merged


@pytest.mark.parametrize("policy", ["divprune:keep=0.25", "dart:keep=0.25,count=exact"])
def test_predicted_flops_equal_traced(policy):
    model = build_tiny_llava()
    batch = make_batch(model, [[5, "img", 7]])
    n_visual = int((batch["input_ids"] == model.config.image_token_id).sum())
    with vtp.patch(model, policy) as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        trace = h.last_trace()
    measured = trace_flops(model.config, trace, policy=policy)
    predicted = policy_flops(model.config, policy, batch["input_ids"].shape[1] - n_visual, n_visual)
    assert measured["flops"] == predicted["flops"] and measured["scoring_flops"] > 0


@pytest.mark.parametrize("text,field", [
    ("dart:count=half", "stages[0].count"), ("dart:pivot_image=-1", "stages[0].pivot_image"),
    ("dart:site=pre_llm", "stages[0].site"), ("divprune:site=vision", "stages[0].site"),
    ("vispruner:important_ratio=1.5", "stages[0].important_ratio"), ("visionzip:contextual=1.0", "stages[0].contextual"),
    ("visionzip:layer=2", "stages[0].layer"), ("vispruner:site=pre_llm", "stages[0].site"),
])
def test_bad_params_name_the_field(text, field):
    with pytest.raises(vtp.errors.PolicyError) as e:
        vtp.Policy.parse(text)
    assert e.value.field == field, str(e.value)


def test_dart_without_pivots_is_refused_before_touching_the_model():
    model = build_tiny_llava()
    with pytest.raises(vtp.errors.IncompatiblePolicyError) as e:
        vtp.patch(model, "dart:pivot_image=0,pivot_text=0")
    assert e.value.field == "stages[0].pivot_image"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
