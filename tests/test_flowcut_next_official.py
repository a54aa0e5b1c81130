"""FlowCut on LLaVA-NeXT as officially coded (issue 16; arXiv 2505.19536, ``TungChintao/FlowCut``): no
``image_newline`` token reaches the LLM (``newlines=drop`` on the vision stage), and the LLM stage keeps an
absolute count T of however many tokens arrive (``tokens=T``), renumbered contiguously (``positions=repack``).
The library's earlier reading (newlines kept and selectable, a fraction of the original tokens, original
positions) stays available as ``flowcut_next_fraction``. Oracles: tests/reference/flowcut_next_oracle.py (the
official packing), flowcut_llm_oracle (the LLM criterion), repack_oracle (positions), flowcut_vit_oracle."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import assert_clear_cut, kept_count, patched_prefill, tiny_llava
from reference import eager_runner as runner
from reference import flowcut_llm_oracle as llm_oracle
from reference import flowcut_next_oracle as next_oracle
from reference import flowcut_vit_oracle as fc
from reference import repack_oracle
from vlm_tokenprune.eval.tiny_models import make_batch

ATOL = 1e-5
S = 48  # the tiny NeXT's crop side (6 x 6 patches of 8 pixels)
SIZES = [[S, 2 * S], [2 * S, 2 * S], [80, 40], [50, 90]]


def tiny_next(attn: str = "sdpa"):
    return tiny_llava(attn, vision_layers=6, next=True)


def lm_inputs_of(model, inputs, policy):
    """``(LM inputs_embeds [1, T', D], logits, trace)`` of one patched forward (the reduced language-model input)."""
    box = {}
    with vtp.patch(model, policy) as h, torch.no_grad():
        def grab(module, args, kwargs):
            box.setdefault("x", kwargs["inputs_embeds"].clone())

        hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            logits = model(**inputs).logits
        finally:
            hook.remove()
        trace = h.last_trace()
    return box["x"], logits, trace


def llm_keep(eager, embeds, img_pos, k: int) -> list[int]:
    scores = llm_oracle.terms_from_embeds(eager, embeds, img_pos, 1)["score"]
    assert_clear_cut(scores.values(), k, 1e-6)
    return runner.top_k_positions(scores, k)


# ------------------------------------------------------------------------------------------------
# the presets
# ------------------------------------------------------------------------------------------------
def test_preset_is_the_official_pipeline():
    vit, llm = vtp.Policy.parse("flowcut_next").stages
    assert (vit.site, vit.criterion, vit.budget.keep, dict(vit.params)) == (
        "vision", "flowcut_vit", 160 / 576, {"positions": "repack", "newlines": "drop"})
    assert (llm.criterion, llm.layer, llm.budget.tokens, dict(llm.params)) == (
        "flowcut_llm", 2, 320, {"positions": "repack"})
    for name, t in (("flowcut_next_640", 640), ("flowcut_next_160", 160)):
        v, l_ = vtp.Policy.parse(name).stages
        assert (v.budget.keep, l_.budget.tokens) == (t / 2 / 576, t)
    assert vtp.Policy.parse("flowcut", family="llava_next") == vtp.Policy.parse("flowcut_next")
    ours = vtp.Policy.parse("flowcut_next_fraction").stages
    assert "newlines" not in ours[0].params and ours[1].budget.keep == 320 / 2880 and "positions" not in ours[1].params
    # the choices are keys of the preset; newlines= goes to the vision stage only
    keep_nl = vtp.Policy.parse("flowcut_next:newlines=keep").stages
    assert "newlines" not in keep_nl[0].params and keep_nl[1] == llm
    gaps = vtp.Policy.parse("flowcut_next:positions=gaps").stages
    assert gaps[0].params["positions"] == "gaps" and "positions" not in gaps[1].params
    for name in ("flowcut_next", "flowcut_next_fraction"):
        pol = vtp.Policy.parse(name)
        assert vtp.Policy.parse(pol.to_string()) == pol


# ------------------------------------------------------------------------------------------------
# newlines=drop: the official language-model input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_no_newline_reaches_the_llm_and_the_input_is_the_official_one(size):
    model = tiny_next()
    inputs = make_batch(model, [[3, "img", 4]], image_sizes=[size], seed=1)
    x, _, trace = lm_inputs_of(model, inputs, "flowcut_vit:tokens=10,newlines=drop")
    nl = model.model.image_newline
    assert not (x[0] == nl).all(-1).any()
    want, _ = next_oracle.lm_input(model, inputs, 10)
    assert x.shape == want.shape
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
    # with newlines kept (the default), the same kept patches plus one newline per unpadded grid row
    x_keep, _, trace_keep = lm_inputs_of(model, inputs, "flowcut_vit:tokens=10")
    n_nl = int((x_keep[0] == nl).all(-1).sum())
    assert n_nl > 0 and x_keep.shape[1] == x.shape[1] + n_nl
    assert trace_keep.stages[0].visual_after[0] == trace.stages[0].visual_after[0] + n_nl


def test_newlines_drop_alone_when_the_tower_keeps_everything():
    """A tower budget of every patch still drops the newlines (a reduction of its own)."""
    model = tiny_next()
    inputs = make_batch(model, [[3, "img", 4]], image_sizes=[[2 * S, S]], seed=1)
    x, _, _ = lm_inputs_of(model, inputs, "flowcut_vit:keep=1.0,newlines=drop")
    want, _ = next_oracle.lm_input(model, inputs, 36)
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# the LLM stage: an absolute count, renumbered
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn,size", [("sdpa", SIZES[0]), ("sdpa", SIZES[1]), ("sdpa", SIZES[2]),
                                       ("eager", SIZES[3])])
def test_official_pipeline_matches_the_oracle(attn, size):
    model = tiny_next(attn)
    inputs = make_batch(model, [[3, "img", 4]], image_sizes=[size], seed=1)
    T = 12
    _, logits, trace = lm_inputs_of(
        model, inputs, f"flowcut_vit:tokens=10,newlines=drop+flowcut_llm:layer=2,tokens={T},positions=repack")
    vit, llm = trace.stages
    assert llm.visual_before == vit.visual_after and llm.visual_after == [T]  # T of however many arrive
    embeds, img_pos = next_oracle.lm_input(model, inputs, 10)
    eager = runner.eager_copy(model)
    keep = llm_keep(eager, embeds, img_pos, T)
    want, _ = repack_oracle.run(eager, embeds, img_pos, [(2, "repack", keep)])
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


def test_preset_keeps_an_absolute_count_whatever_the_image():
    """``flowcut_next`` on the tiny NeXT: 10 of 36 patches per crop; fewer than 320 tokens arrive, so the LLM
    stage keeps them all (as the official ``visual_token_num <= target_num`` branch) and says so; a target below
    what arrives keeps exactly T on every image size."""
    model = tiny_next()
    for size in SIZES[:3]:
        inputs = make_batch(model, [[3, "img", 4]], image_sizes=[size], seed=2)
        _, logits, trace = lm_inputs_of(model, inputs, "flowcut_next")
        vit, llm = trace.stages
        assert vit.vision_tokens_per_layer[-1] == 11 and llm.visual_after == vit.visual_after
        assert 0 in llm.kept_all
        embeds, img_pos = next_oracle.lm_input(model, inputs, 10)
        want, _ = repack_oracle.run(runner.eager_copy(model), embeds, img_pos, [])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
        _, _, trace = lm_inputs_of(model, inputs, "flowcut_vit:keep=0.2777,newlines=drop+flowcut_llm:layer=2,"
                                                  "tokens=9,positions=repack")
        assert trace.stages[1].visual_after == [9] and trace.stages[1].visual_before[0] > 9


def test_generate_runs_the_official_pipeline():
    model = tiny_next()
    inputs = make_batch(model, [[3, "img", 4]], image_sizes=[SIZES[0]], seed=1)
    policy = "flowcut_vit:tokens=10,newlines=drop+flowcut_llm:layer=2,tokens=12,positions=repack"
    embeds, img_pos = next_oracle.lm_input(model, inputs, 10)
    eager = runner.eager_copy(model)
    keep = llm_keep(eager, embeds, img_pos, 12)
    eos = model.generation_config.eos_token_id
    want = runner.greedy(eager, embeds, 6, eos,
                         lambda seq, step: repack_oracle.run(eager, seq, img_pos, [(2, "repack", keep)])[0])
    L = inputs["input_ids"].shape[1]
    with vtp.patch(model, policy), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    got = g[0, L:].tolist()
    assert got[:len(want)] == want


# ------------------------------------------------------------------------------------------------
# ours, kept as an option: newlines reach the LLM, a fraction of the original tokens, original positions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES[:2])
def test_fraction_reading_matches_its_oracle(size):
    model = tiny_next()
    inputs = make_batch(model, [[3, "img", 4]], image_sizes=[size], seed=1)
    _, logits, trace = lm_inputs_of(model, inputs, "flowcut_vit:tokens=10+flowcut_llm:layer=2,keep=0.25")
    vit, llm = trace.stages
    n_orig = int((inputs["input_ids"] == model.config.image_token_id).sum())
    k = kept_count("keep=0.25", n_orig)
    assert llm.visual_after == [k]
    feats, kept, _ = fc.flowcut_encode(model, fc.all_crops(model, inputs), 10)
    (x, pos, _), = fc.reduced_rows(model, inputs, feats, kept)
    ids = inputs["input_ids"][0]
    img_pos = [i for i, p in enumerate(pos) if int(ids[p]) == model.config.image_token_id]  # newlines included
    eager = runner.eager_copy(model)
    keep = llm_keep(eager, x[None], img_pos, k)
    assert any((x[p] == model.model.image_newline).all() for p in img_pos)
    want, _ = repack_oracle.run(eager, x[None], img_pos, [(2, "gaps", keep)])
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    # and the preset runs end to end
    _, _, tr = lm_inputs_of(model, inputs, "flowcut_next_fraction")
    assert tr.stages[1].visual_after == [kept_count(("keep", 320 / 2880), n_orig)]
