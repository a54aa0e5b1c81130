"""FinerCut's structural op (arXiv 2405.18218): ``skip_sublayers`` removes attention / MLP sublayers
for every token. Checked against an eager loop that omits those sublayers (prefill logits and cached
greedy generate(), batch 2 with left padding), with real savings (the removed modules never run),
FLOPs, refusals before any hook, and exact unpatch."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, PolicyError
from vlm_tokenprune.eval.flops import structural_flops
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, build_tiny_llava, make_batch

from reference import sublayer_oracle as O

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]
STEPS = 4
CASES = {
    "skip_sublayers:attn=2": ((2,), ()),
    "skip_sublayers:ffn=0;3": ((), (0, 3)),
    "skip_sublayers:attn=1;3,ffn=1;2": ((1, 3), (1, 2)),
}


@pytest.fixture(scope="module")
def models():
    return {impl: build_tiny_llava(impl) for impl in ("eager", "sdpa")}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", list(CASES))
def test_matches_sublayer_oracle(models, impl, policy):
    model = models[impl]
    inputs = make_batch(model, ROWS)
    attn, ffn = CASES[policy]
    L = inputs["input_ids"].shape[1]
    valid = inputs["attention_mask"].bool()
    with torch.no_grad(), vtp.patch(model, policy):
        got = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, bad_words_ids=[[IMAGE_TOKEN_ID]])[:, L:]
    want = O.logits(model, inputs, attn, ffn)
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got[valid], O.logits(model, inputs)[valid], atol=1e-3)  # the op changed something
    torch.testing.assert_close(gen, O.greedy(model, inputs, STEPS, attn, ffn, banned=IMAGE_TOKEN_ID))


def test_removed_modules_do_not_run_and_unpatch_is_exact(models):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS)
    layers = model.model.language_model.layers
    calls = []
    hooks = [layers[2].self_attn.q_proj.register_forward_hook(lambda *a: calls.append("q2")),
             layers[1].mlp.gate_proj.register_forward_hook(lambda *a: calls.append("gate1")),
             layers[3].self_attn.q_proj.register_forward_hook(lambda *a: calls.append("q3"))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(**inputs).logits
        calls.clear()
        with vtp.patch(model, "skip_sublayers:attn=2,ffn=1"):
            model(**inputs)
        assert calls == ["q3"]  # layer 2's attention and layer 1's MLP never ran
        after = model(**inputs).logits
    for h in hooks:
        h.remove()
    assert torch.equal(base, after)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for layer in layers:
        assert "forward" not in vars(layer.self_attn) and "forward" not in vars(layer.mlp)


def test_flops_count_the_removed_sublayers(models):
    cfg = models["sdpa"].config
    base = structural_flops(cfg, "skip_sublayers:ffn=3", 10, 72)
    both = structural_flops(cfg, "skip_sublayers:attn=3,ffn=3", 10, 72)
    layer = structural_flops(cfg, "skip_layers:layers=3", 10, 72)
    assert base["ratio"] < 1 and both["ratio"] < base["ratio"]
    assert both["flops"] == pytest.approx(layer["flops"])  # both sublayers gone == the whole layer skipped


@pytest.mark.parametrize("policy,exc,field", [
    ("skip_sublayers:attn=0", IncompatiblePolicyError, "stages[0].attn"),
    ("skip_sublayers:ffn=4", IncompatiblePolicyError, "stages[0].ffn"),
    ("fastv:layer=3,keep=0.5+skip_sublayers:attn=2", IncompatiblePolicyError, "stages[1].attn"),
    ("skip_sublayers", PolicyError, "stages[0].attn"),
    ("skip_sublayers:attn=2,scope=visual", PolicyError, "stages[0].scope"),
    ("skip_sublayers:attn=2,removed=3", PolicyError, "stages[0].removed"),
])
def test_refused_before_touching_the_model(models, policy, exc, field):
    model = models["sdpa"]
    with pytest.raises(exc) as e:
        vtp.patch(model, policy)
    assert e.value.field == field
    assert not vtp.is_patched(model) if hasattr(vtp, "is_patched") else True


def test_policy_round_trip():
    pol = vtp.Policy.parse("skip_sublayers:attn=3;1,ffn=2")
    assert pol.to_string() == "skip_sublayers:attn=1;3,ffn=2,scope=all"
    assert vtp.Policy.parse(pol.to_dict()) == pol
