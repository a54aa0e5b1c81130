"""FlowCut's vision-encoder part (``flowcut_vit``, arXiv 2505.19536) == an independent oracle
(tests/reference/flowcut_vit_oracle.py: the CLIP tower run layer by layer with eager attention written
out, plain loops over tokens for the scores), on tiny LLaVA / LLaVA-NeXT, batch 2, several images,
tower under eager and sdpa: same kept patches per image, same token counts per encoder layer, same logits.
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, assert_policy_refused, left_padding, tiny_llava, tiny_qwen
from reference import flowcut_vit_oracle as oracle
from reference import pre_llm_oracle
from vlm_tokenprune.errors import IncompatiblePolicyError
from vlm_tokenprune.eval.tiny_models import make_batch

torch.set_num_threads(1)

ATOL = 1e-5
ROWS = [[5, "img", 7], [2, "img", 3, "img", 4]]


def tiny(attn: str, next: bool = False):
    """Tiny LLaVA with a 6-layer CLIP tower (feature layer 4: FlowCut prunes after layers 1 and 3) whose
    q/k weights are scaled up, so the CLS attention is peaked and the entropy-adaptive count is > 0."""
    return tiny_llava(attn, vision_layers=6, next=next, tweaks=("peaked_tower",))


def _check(model, inputs, policy, K, positions):
    with vtp.patch(model, policy) as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    feats, kept, seen = oracle.flowcut_encode(model, oracle.all_crops(model, inputs), K)
    st = trace.stages[0]
    assert st.site == "vision" and st.layer == 0
    assert st.vision_tokens_per_layer == seen
    rows = oracle.reduced_rows(model, inputs, feats, kept)
    for b, (x, pos, sources) in enumerate(rows):
        pad = left_padding(inputs, b)
        vis = [p for p in pos if p in sources]
        assert [p - pad for p in st.kept_positions[b]] == vis
        assert [[s - pad for s in src] for src in st.sources[b]] == [sources[p] for p in vis]
        want = pre_llm_oracle.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - len(pos):], want, atol=ATOL, rtol=0)
    return trace, seen


@pytest.mark.parametrize("attn", BACKENDS)  # the tower too: eager, sdpa, the flash-attention stand-in
@pytest.mark.parametrize("budget,K,positions", [("tokens=8", 8, "repack"), ("keep=0.1", 4, "gaps")])
def test_flowcut_vit_matches_oracle(attn, budget, K, positions):
    model = tiny(attn)
    assert model.config.vision_config._attn_implementation == attn
    inputs = make_batch(model, ROWS)
    trace, seen = _check(model, inputs, f"flowcut_vit:{budget},positions={positions}", K, positions)
    assert trace.stages[0].visual_after == [K, 2 * K]
    assert seen[0] == 37 and 37 > seen[2] > K + 1 and seen[4:] == [K + 1, K + 1]  # adaptive prune, then forced


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flowcut_vit_llava_next_crops(attn):
    """LLaVA-NeXT: every crop of every image is pruned in the tower; image_newline tokens stay."""
    model = tiny(attn, next=True)
    s = model.config.vision_config.image_size
    inputs = make_batch(model, [[4, "img", 3], [2, "img", 5]], image_sizes=[[s, 2 * s], [2 * s, 2 * s]])
    trace, seen = _check(model, inputs, "flowcut_vit:tokens=6,positions=gaps", 6, "gaps")
    assert seen[-1] == 7
    assert trace.stages[0].visual_after[0] < trace.stages[0].visual_before[0] // 3


def test_real_savings_later_encoder_layers_see_fewer_tokens():
    """Hooks of the test's own record what each encoder layer really receives."""
    model = tiny("sdpa")
    inputs = make_batch(model, ROWS)
    seen: list[int] = []
    with vtp.patch(model, "flowcut_vit:tokens=8"), torch.no_grad():
        # registered after the patch's hooks, so they see what the layer itself receives
        hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
                 for layer in oracle.tower_layers(model).encoder.layers]
        try:
            model(**inputs)
        finally:
            for hk in hooks:
                hk.remove()
    assert seen[:2] == [37, 37] and seen[2] < 37 and seen[4:] == [9, 9]


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_oracle(use_cache):
    model = tiny("sdpa")
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "flowcut_vit:tokens=8"), torch.no_grad():  # preset positions: repack
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache)
    feats, kept, _ = oracle.flowcut_encode(model, oracle.all_crops(model, inputs), 8)
    L = inputs["input_ids"].shape[1]
    for b, (x, pos, _) in enumerate(oracle.reduced_rows(model, inputs, feats, kept)):
        n_orig = int(inputs["attention_mask"][b].sum())
        assert out[b, L:].tolist() == pre_llm_oracle.greedy(model, x, pos, "repack", n_orig, 4)


def test_keep_everything_and_unpatch_are_exact():
    model = tiny("eager")
    inputs = make_batch(model, ROWS)
    with torch.no_grad():
        before = model(**inputs).logits
        with vtp.patch(model, "flowcut_vit:keep=1.0") as h:
            assert torch.equal(model(**inputs).logits, before)
            assert h.last_trace().stages[0].vision_tokens_per_layer == [37] * 6
        h = vtp.patch(model, "flowcut_vit:tokens=8")
        assert model(**inputs).logits.shape[1] < before.shape[1]
        h.unpatch()
        assert torch.equal(model(**inputs).logits, before)
    assert not any(getattr(hk, "__vtp__", False) for m in model.modules()
                   for hk in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))


def test_presets_scale_to_the_tower():
    """keep = 192 / 128 / 64 of 576: 12 / 8 / 4 of the tiny tower's 36 patches."""
    model = tiny("sdpa")
    inputs = make_batch(model, [[3, "img", 2]])
    for preset, k in (("flowcut_vit_192", 12), ("flowcut_vit", 8), ("flowcut_vit_64", 4)):
        with vtp.patch(model, preset) as h, torch.no_grad():
            model(**inputs)
            assert h.last_trace().stages[0].visual_after == [k]
    assert vtp.Policy.parse("flowcut_vit").stages[0].params["positions"] == "repack"


@pytest.mark.parametrize("text,field", [
    ("flowcut_vit:layer=3", "stages[0].layer"),
    ("flowcut_vit:site=llm,layer=2", "stages[0].site"),
    ("flowcut_vit:positions=dense", "stages[0].positions"),
    ("flowcut_vit+flowcut_vit", "stages[1].site"),
    ("flowcut_vit+aim_merge", "stages[0].site"),
    ("fastv:layer=2+flowcut_vit", "stages[1].site"),
    ("fastv:site=vision", "stages[0].site"),
])
def test_policy_errors_name_the_field(text, field):
    assert_policy_refused(text, field)


def test_model_errors_name_the_field():
    model = tiny("sdpa")
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(model, "flowcut_vit:tokens=40")  # 36 patches per crop
    assert e.value.field == "stages[0].tokens" and "1..36" in str(e.value)
    with pytest.raises(IncompatiblePolicyError) as e:  # Qwen2-VL runs its official Qwen stage, at positions=gaps
        vtp.patch(tiny_qwen(), "flowcut_vit")
    assert e.value.field == "stages[0].positions" and "gaps" in str(e.value)
    with pytest.raises(IncompatiblePolicyError) as e:  # Qwen2.5-VL: VisPruner only at its vision site
        vtp.patch(tiny_qwen(version="2.5"), "flowcut_vit:positions=gaps")
    assert e.value.field == "stages[0].criterion" and "vispruner" in str(e.value)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_round_trip():
    for text in ("flowcut_vit", "flowcut_vit:tokens=64,positions=gaps", "flowcut_vit_64"):
        pol = vtp.Policy.parse(text)
        assert vtp.Policy.parse(pol.to_string()) == pol and vtp.Policy.from_dict(pol.to_dict()) == pol


def test_oracle_distinguishes_settings():
    """The adaptive count, the budget and the batch (common count: max over crops) change the oracle."""
    model = tiny("eager")
    crops = oracle.all_crops(model, make_batch(model, ROWS))
    _, kept8, seen8 = oracle.flowcut_encode(model, crops, 8)
    _, kept4, _ = oracle.flowcut_encode(model, crops, 4)
    assert kept8[0] != kept4[0] and seen8[2] < 37
    _, _, seen_one = oracle.flowcut_encode(model, crops[:1], 8)
    assert seen_one[2] >= seen8[2]
