"""The vision site itself (``vlm_tokenprune.vision``), independent of one method: a vision stage combined
with a later LLM stage == the composed oracles (FlowCut in the tower, then FastV on the reduced row),
text-only passthrough, stale / missing tower runs, the trace's per-layer token counts and describe()."""
from __future__ import annotations


import pytest
import torch

import vlm_tokenprune as vtp
from kit import fresh_llava, kept_count, tiny_llava
from reference import flowcut_vit_oracle as fc
from reference import pre_llm_fastv_oracle as pf
from reference import fastv_oracle as fv
from reference import pre_llm_oracle
from vlm_tokenprune.errors import InputError
from vlm_tokenprune.eval.tiny_models import make_batch

torch.set_num_threads(1)

ROWS = [[5, "img", 7], [2, "img", 3, "img", 4]]


def tiny(attn: str):
    return tiny_llava(attn, vision_layers=6, tweaks=("peaked_tower",))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("positions", ["gaps", "repack"])
def test_vision_stage_then_fastv_matches_composed_oracle(attn, positions):
    model = tiny(attn)
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, f"flowcut_vit:tokens=8,positions={positions}+fastv:layer=2,tokens=5") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    assert [s.site for s in trace.stages] == ["vision", "llm"] and trace.stages[1].visual_after == [5, 5]
    feats, kept, _ = fc.flowcut_encode(model, fc.all_crops(model, inputs), 8)
    eager = fv.eager_copy(model)
    for b, (x, pos, sources) in enumerate(fc.reduced_rows(model, inputs, feats, kept)):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        visual = [q in sources for q in pos]
        p = pf.prompt_positions(pos, positions)
        slots = pf.fastv_slots(eager, x, p, visual, 2, 5)
        assert [q - pad for q in trace.stages[1].kept_positions[b]] == [pos[i] for i in slots]
        want = pf.logits(eager, x, p, visual, 2, slots)
        torch.testing.assert_close(logits[b, logits.shape[1] - want.shape[0]:], want, atol=1e-5, rtol=0)


def test_text_only_passes_through_and_trace_counts():
    model = tiny("sdpa")
    text = make_batch(model, [[6], [4]])
    with torch.no_grad():
        before = model(**text).logits
        with vtp.patch(model, "flowcut_vit:tokens=8") as h:
            assert torch.equal(model(**text).logits, before)
            model(**make_batch(model, ROWS))
            st = h.last_trace().stages[0]
            assert st.vision_tokens_per_layer == [37, 37, st.vision_tokens_per_layer[2], st.vision_tokens_per_layer[2], 9, 9]
            assert "vision encoder layer 3: forward pre-hook" in h.describe()


def test_features_without_a_patched_tower_run_are_refused():
    """Image features computed before patch() (no tower run under the patch): a clear error, no state left."""
    model = tiny("sdpa")
    inputs = make_batch(model, ROWS)
    with torch.no_grad():
        enc = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                             vision_feature_layer=model.config.vision_feature_layer,
                                             vision_feature_select_strategy="default", return_dict=True)
        rest = {k: v for k, v in inputs.items() if k != "pixel_values"}
        with vtp.patch(model, "flowcut_vit:tokens=8") as h:
            with pytest.raises(InputError) as e:
                model(**rest, mm_encoder_outputs={"image": enc})
            assert e.value.field == "pixel_values" and h.state is None


@pytest.mark.parametrize("kwargs", [{"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}])
def test_inputs_expanded_after_the_tower_are_served(kwargs):
    """Transformers with ``mm_encoder_outputs`` (5.2x) encode the images once, then generate() expands the prompt
    (beams, several returned sequences): every copy of a row keeps what the row keeps (it was refused by name
    before; tests/test_vision_site_beams.py holds the oracles); a plain generate() follows on the same patch."""
    model = tiny("sdpa")
    inputs = make_batch(model, ROWS)
    k = max(kwargs.get("num_beams", 1), kwargs.get("num_return_sequences", 1))
    with vtp.patch(model, "flowcut_vit:tokens=8") as h, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, **kwargs)
        assert out.shape[0] == 2 * (kwargs.get("num_return_sequences") or 1)
        assert h.last_trace("prefill").stages[0].visual_after == [8] * k + [16] * k  # 8 per image
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[0] == 2


def test_flowcut_llava_next_pipeline_vit_then_llm_stage():
    """FlowCut on LLaVA-NeXT as in the paper: per crop in the tower, then ``flowcut_llm`` in the LLM."""
    model = tiny_llava("sdpa", vision_layers=6, next=True)
    s = model.config.vision_config.image_size
    inputs = make_batch(model, [[4, "img", 3], [2, "img", 5]], image_sizes=[[s, 2 * s], [2 * s, 2 * s]])
    with torch.no_grad():
        before = model(**inputs).logits
    with vtp.patch(model, "flowcut_vit:tokens=9+flowcut_llm:layer=2,tokens=12") as h, torch.no_grad():
        assert "pack_image_features" in vars(model.model)  # the instance wrapper (LLaVA-NeXT only)
        model(**inputs)
        vit, llm = h.last_trace().stages
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert "pack_image_features" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert vit.vision_tokens_per_layer[-1] == 10 and llm.visual_after == [12, 12]
    assert all(set(k) <= set(v) for k, v in zip(llm.kept_positions, vit.kept_positions))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_explain_and_flops_prediction(capsys):
    from vlm_tokenprune.cli import main
    from vlm_tokenprune.eval.flops import policy_flops, trace_flops

    assert main(["explain", "flowcut_vit_64"]) == 0
    assert "site vision" in capsys.readouterr().out
    model = tiny("sdpa")
    inputs = make_batch(model, [[5, "img", 7]])
    with vtp.patch(model, "flowcut_vit:tokens=8") as h, torch.no_grad():
        model(**inputs)
        trace = h.last_trace()
    n_vis = 36
    n_text = inputs["input_ids"].shape[1] - n_vis
    pred = policy_flops(model.config.text_config, "flowcut_vit:tokens=8", n_text, n_vis)
    got = trace_flops(model.config.text_config, trace)
    assert pred["tokens_per_layer"] == trace.tokens_per_layer == [n_text + 8] * 4
    assert got["ratio"] == pred["ratio"] < 0.5


def test_full_select_strategy_keeps_cls_in_the_llm_input():
    """``vision_feature_select_strategy="full"``: the CLS feature reaches the LLM; FlowCut always keeps it."""
    model = fresh_llava("sdpa", vision_layers=6)
    model.config.vision_feature_select_strategy = "full"
    inputs = make_batch(model, ROWS)  # 37 placeholders per image
    with vtp.patch(model, "flowcut_vit:tokens=8,positions=gaps") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    feats, kept, _ = fc.flowcut_encode(model, fc.all_crops(model, inputs), 8)
    assert trace.stages[0].visual_after == [9, 18]
    for b, (x, pos, sources) in enumerate(fc.reduced_rows(model, inputs, feats, kept)):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        assert [q - pad for q in trace.stages[0].kept_positions[b]] == [p for p in pos if p in sources]
        want = pre_llm_oracle.row_logits(model, x, pos, "gaps")
        torch.testing.assert_close(logits[b, logits.shape[1] - len(pos):], want, atol=1e-5, rtol=0)


def test_flowcut_next_preset_runs_both_stages():
    pol = vtp.Policy.parse("flowcut_next")
    assert [(s.site, s.criterion) for s in pol.stages] == [("vision", "flowcut_vit"), ("llm", "flowcut_llm")]
    model = tiny_llava("sdpa", vision_layers=6, next=True)
    s = model.config.vision_config.image_size
    inputs = make_batch(model, [[3, "img", 2]], image_sizes=[[2 * s, 2 * s]])
    with vtp.patch(model, pol) as h, torch.no_grad():
        model(**inputs)
        vit, llm = h.last_trace().stages
    assert vit.vision_tokens_per_layer[-1] == 11  # 160 / 576 of 36 patches = 10, + CLS
    # official (tests/test_flowcut_next_official.py): no newlines, the LLM stage keeps 320 of what arrives (here all)
    assert llm.visual_after == llm.visual_before == vit.visual_after and 0 in llm.kept_all
    with vtp.patch(model, "flowcut_next_fraction") as h, torch.no_grad():
        model(**inputs)
        vit, llm = h.last_trace().stages
    # the library's reading: 320 / 2880 of the row's ORIGINAL visual tokens (placeholders, newlines included)
    assert llm.visual_after == [kept_count(("keep", 320 / 2880), vit.visual_before[0])]
    assert llm.visual_before == vit.visual_after
