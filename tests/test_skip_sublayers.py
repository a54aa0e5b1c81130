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


VISUAL = {
    "skip_sublayers:attn=0;2,scope=visual": ((0, 2), ()),
    "skip_sublayers:ffn=1;3,scope=visual": ((), (1, 3)),
    "skip_sublayers:attn=1,ffn=1;2,scope=visual": ((1,), (1, 2)),
    # composed with YOPO visual heads on the same layer and a token stage before it
    "fastv:layer=1,keep=0.5+prune_heads:heads=2/1,scope=visual+skip_sublayers:attn=2,ffn=3,scope=visual": None,
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", list(VISUAL))
def test_visual_scope_matches_oracle(models, impl, policy):
    """Visual rows get nothing from the listed sublayers; text rows run them over every key."""
    model = models[impl]
    inputs = make_batch(model, ROWS)
    L = inputs["input_ids"].shape[1]
    valid = inputs["attention_mask"].bool()
    vis = inputs["input_ids"] == IMAGE_TOKEN_ID
    with torch.no_grad(), vtp.patch(model, policy) as h:
        got = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, bad_words_ids=[[IMAGE_TOKEN_ID]])[:, L:]
        if VISUAL[policy] is None:  # composition: the same policy without skip_sublayers, then skip_sublayers alone
            assert h.structural.attn_visual == (2,) and h.structural.ffn_visual == (3,)
            return
    attn, ffn = VISUAL[policy]
    want = O.logits(model, inputs, visual=vis, attn_visual=attn, ffn_visual=ffn)
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got[valid], O.logits(model, inputs)[valid], atol=1e-3)
    torch.testing.assert_close(gen, O.greedy(model, inputs, STEPS, banned=IMAGE_TOKEN_ID, image_token=IMAGE_TOKEN_ID,
                                             attn_visual=attn, ffn_visual=ffn))


def test_visual_scope_skips_visual_rows_for_real(models, monkeypatch):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS)
    n_vis = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    B, T = inputs["input_ids"].shape
    layer = model.model.language_model.layers[2]
    watch = {id(layer.self_attn.q_proj.weight): "q2", id(layer.self_attn.o_proj.weight): "o2",
             id(layer.self_attn.k_proj.weight): "k2", id(layer.mlp.gate_proj.weight): "gate2"}
    rows = {}
    linear = torch.nn.functional.linear

    def counting(x, w, b=None):
        if id(w) in watch:
            rows[watch[id(w)]] = rows.get(watch[id(w)], 0) + x.shape[:-1].numel()
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    with torch.no_grad(), vtp.patch(model, "skip_sublayers:attn=2,ffn=2,scope=visual"):
        model(**inputs)
    monkeypatch.undo()
    text = B * T - n_vis
    assert rows == {"q2": text, "o2": text, "k2": B * T, "gate2": text}  # k/v_proj: every row (text attends visual keys)
    cfg = model.config
    flops = structural_flops(cfg, "skip_sublayers:attn=2,ffn=2,scope=visual", 10, 72)["ratio"]
    assert structural_flops(cfg, "skip_layers:layers=2,scope=visual", 10, 72)["ratio"] == pytest.approx(flops)


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
    ("skip_sublayers:attn=2,scope=text", PolicyError, "stages[0].scope"),
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
