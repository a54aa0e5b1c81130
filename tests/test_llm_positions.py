"""``positions=`` on LLM stages (issue 16): ``gaps`` (the default: kept tokens keep their original position ids)
or ``repack`` (FlowCut's official LLaVA-NeXT path, arXiv 2505.19536: the layers after the stage see the kept
tokens numbered 0..n'-1 and decode continues there), against an independent oracle
(tests/reference/repack_oracle.py: plain layer loops, renumbered positions, no cache)."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import (
    BACKENDS, FLASH, assert_batch_matches_rows_alone, assert_clear_cut, assert_generate_matches_rows_alone,
    assert_policy_refused, cache_kwargs, fresh_llava, generate_rows, kept_count, n_image_tokens, patched_prefill, tiny_llava,
    tiny_qwen,
)
from kit.prompts import BATCHES, NEXT_BATCH, SINGLE
from reference import flowcut_llm_oracle as flowcut
from reference import repack_oracle as oracle
from vlm_tokenprune.eval.tiny_models import make_batch, make_qwen_batch
from vlm_tokenprune.marking import is_patched

ATOL = 1e-5
GEN_SEED = 5


def flowcut_stage(model, inputs, layer: int, k: int, mode: str) -> tuple:
    """Oracle stage: FlowCut's LLM criterion at ``layer`` (scored on the whole prompt, original positions)."""
    assert_clear_cut(flowcut.flowcut_terms(model, inputs, layer - 1)["score"].values(), k, 1e-6)
    return (layer, mode, flowcut.flowcut_keep(model, inputs, layer - 1, k))


# ------------------------------------------------------------------------------------------------
# the policy
# ------------------------------------------------------------------------------------------------
def test_parsing_round_trips_and_gaps_is_the_default():
    pol = vtp.Policy.parse("fastv:layer=2,keep=0.5,positions=repack")
    assert pol.stages[0].params["positions"] == "repack"
    assert vtp.Policy.parse(pol.to_string()) == pol
    assert "positions=repack" in pol.to_string()
    assert vtp.Policy.parse("fastv:layer=2,keep=0.5,positions=gaps") == vtp.Policy.parse("fastv:layer=2,keep=0.5")
    assert "positions" not in vtp.Policy.parse("fastv:layer=2,keep=0.5").to_string()
    assert vtp.Policy.parse(pol.to_dict()) == pol
    e = assert_policy_refused("fastv:layer=2,keep=0.5,positions=packed", "stages[0].positions")
    assert "gaps, repack" in str(e)
    assert vtp.FlowCutLLM(tokens=20, positions="repack") == vtp.Policy.parse("flowcut_llm:tokens=20,positions=repack")
    assert vtp.FlowCutViT(keep=0.25, newlines="drop") == vtp.Policy.parse("flowcut_vit:keep=0.25,newlines=drop")


def test_newlines_is_a_vision_stage_key():
    e = assert_policy_refused("fastv:layer=2,keep=0.5,newlines=drop", "stages[0].newlines")
    assert "site=vision" in str(e)
    assert_policy_refused("flowcut_vit:keep=0.25,newlines=skip", "stages[0].newlines")


def test_qwen_m_rope_refuses_repack_before_touching_the_model():
    model = tiny_qwen("eager")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vtp.IncompatiblePolicyError) as e:
        vtp.patch(model, "fastv:layer=2,keep=0.5+fastv:layer=3,keep=0.25,positions=repack")
    assert e.value.field == "stages[1].positions"
    assert "M-RoPE" in str(e.value) and "allowed: gaps" in str(e.value)
    assert not is_patched(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    inputs = make_qwen_batch(model, [[4, "img", 5]])
    with vtp.patch(model, "fastv:layer=2,keep=0.5,positions=gaps"), torch.no_grad():
        model(**inputs)  # gaps runs


def test_repack_refused_without_a_model_level_rotary_or_with_dynamic_rope():
    model = fresh_llava("sdpa")
    lm = model.model.language_model
    lm.rotary_emb.rope_type = "dynamic"
    with pytest.raises(vtp.IncompatiblePolicyError) as e:
        vtp.patch(model, "fastv:layer=2,keep=0.5,positions=repack")
    assert e.value.field == "stages[0].positions" and "dynamic" in str(e.value) and "allowed: gaps" in str(e.value)
    rotary = lm.rotary_emb
    del lm.rotary_emb
    try:
        with pytest.raises(vtp.IncompatiblePolicyError) as e:
            vtp.patch(model, "fastv:layer=2,keep=0.5,positions=repack")
        assert e.value.field == "stages[0].positions" and "rotary_emb" in str(e.value)
        assert not is_patched(model)
    finally:
        lm.rotary_emb = rotary


def test_catalogue_rows_name_existing_tests():
    """docs/bad-inputs.md rows 160-161 (LLM-stage positions, vision-stage newlines) name tests that exist."""
    from kit.catalogue import assert_rows_name_existing_tests

    assert_rows_name_existing_tests((160, 161))


# ------------------------------------------------------------------------------------------------
# the oracle can fail
# ------------------------------------------------------------------------------------------------
def test_repack_changes_the_logits_and_the_second_stage_choice():
    model = tiny_llava("eager")
    inputs = make_batch(model, SINGLE, seed=1)
    st = flowcut_stage(model, inputs, 2, 9, "repack")
    rep, _ = oracle.logits(model, inputs, [st])
    gap, _ = oracle.logits(model, inputs, [(2, "gaps", st[2])])
    torch.testing.assert_close(gap, flowcut.flowcut_logits(model, inputs, 1, st[2]), atol=ATOL, rtol=0)
    assert (rep - gap).abs().max() > 1e-3
    _, kept_rep = oracle.logits(model, inputs, [(1, "repack", 18), (3, "gaps", 6)])
    _, kept_gap = oracle.logits(model, inputs, [(1, "gaps", 18), (3, "gaps", 6)])
    assert kept_rep[0] == kept_gap[0] and kept_rep[1] != kept_gap[1]


# ------------------------------------------------------------------------------------------------
# prefill
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_prefill_matches_the_oracle(attn):
    model = tiny_llava(attn)
    inputs = make_batch(model, SINGLE, seed=1)
    st = flowcut_stage(model, inputs, 2, 9, "repack")
    want, _ = oracle.logits(model, inputs, [st])
    logits, trace = patched_prefill(model, inputs, "flowcut_llm:layer=2,tokens=9,positions=repack")
    assert trace.stages[0].kept_positions[0] == st[2]
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("modes", [("repack", "gaps"), ("gaps", "repack"), ("repack", "repack")])
@pytest.mark.parametrize("attn", BACKENDS)
def test_two_stages_score_and_run_at_the_renumbered_positions(attn, modes):
    """The second stage scores with the layer after a repack at the renumbered ids (FastV's RoPE'd attention)."""
    model = tiny_llava(attn)
    inputs = make_batch(model, SINGLE, seed=1)
    want, kept = oracle.logits(model, inputs, [(1, modes[0], 18), (3, modes[1], 6)])
    policy = f"fastv:layer=1,tokens=18,positions={modes[0]}+fastv:layer=3,tokens=6,positions={modes[1]}"
    logits, trace = patched_prefill(model, inputs, policy)
    assert [s.kept_positions[0] for s in trace.stages] == kept
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_with_different_kept_counts_matches_rows_alone(attn, batch):
    rows = BATCHES[batch]
    model = tiny_llava(attn)
    inputs = make_batch(model, rows, seed=2)

    def row_oracle(alone):
        k = kept_count("keep=0.25", n_image_tokens(alone))
        if k == 0:
            return None
        st = flowcut_stage(model, alone, 2, k, "repack")
        want, kept = oracle.logits(model, alone, [st])
        return kept, want[0]

    trace = assert_batch_matches_rows_alone(model, inputs, rows, "flowcut_llm:layer=2,keep=0.25,positions=repack",
                                            row_oracle, atol=ATOL)
    assert len(set(trace.stages[0].visual_after)) > 1  # rows keep different counts


@pytest.mark.parametrize("attn", ["sdpa", FLASH])
def test_left_padded_llava_next_batch_matches_rows_alone(attn):
    """LLaVA-NeXT rows (anyres grids of three sizes, a text-only row) keep different counts; each row's layers after
    the stage see its own kept tokens renumbered from its first real token."""
    model = tiny_llava(attn, next=True, image_size=16)
    inputs = make_batch(model, NEXT_BATCH, seed=3, image_sizes=[[20, 36], [16, 16], [36, 20]])

    def row_oracle(alone):
        k = kept_count("keep=0.3", n_image_tokens(alone))
        if k == 0:
            return None
        want, kept = oracle.logits(model, alone, [flowcut_stage(model, alone, 2, k, "repack")])
        return kept, want[0]

    trace = assert_batch_matches_rows_alone(model, inputs, NEXT_BATCH, "flowcut_llm:layer=2,keep=0.3,positions=repack",
                                            row_oracle, atol=ATOL)
    assert len(set(trace.stages[0].visual_after)) == 3


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_cached_generate_matches_the_oracle(attn):
    model = tiny_llava(attn)
    inputs = make_batch(model, SINGLE, seed=GEN_SEED)
    eos = model.generation_config.eos_token_id
    st = flowcut_stage(model, inputs, 2, 9, "repack")
    want = oracle.generate(model, inputs, [st], 8, eos)
    assert generate_rows(model, inputs, "flowcut_llm:layer=2,tokens=9,positions=repack") == [want]
    gaps = oracle.generate(model, inputs, [(2, "gaps", st[2])], 8, eos)
    assert gaps == flowcut.flowcut_generate(model, inputs, 1, 9, 8, False, eos)
    # every step's logits, not only the argmax: the layers after the stage decode at the renumbered positions
    with vtp.patch(model, "flowcut_llm:layer=2,tokens=9,positions=repack"), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    eager = oracle.base.eager_copy(model)
    seq = oracle.base.prompt_embeds(model, inputs)
    img = oracle.base.image_positions(model, inputs["input_ids"])
    L = inputs["input_ids"].shape[1]
    for s, step in enumerate(g.logits):
        torch.testing.assert_close(step[0], oracle.run(eager, seq, img, [st])[0][0, -1], atol=ATOL, rtol=0)
        with torch.no_grad():
            seq = torch.cat([seq, eager.model.language_model.embed_tokens(g.sequences[:, L + s:L + s + 1])], dim=1)


def test_cached_generate_two_stages_matches_the_oracle():
    model = tiny_llava("sdpa")
    inputs = make_batch(model, SINGLE, seed=GEN_SEED)
    eos = model.generation_config.eos_token_id
    want = oracle.generate(model, inputs, [(1, "repack", 18), (3, "gaps", 6)], 8, eos)
    got = generate_rows(model, inputs, "fastv:layer=1,tokens=18,positions=repack+fastv:layer=3,tokens=6")
    assert got == [want]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_generate_matches_rows_alone(attn):
    rows = BATCHES["1img+2img"]
    model = tiny_llava(attn)
    eos = model.generation_config.eos_token_id

    def row_generate(alone):
        st = flowcut_stage(model, alone, 2, kept_count("keep=0.25", n_image_tokens(alone)), "repack")
        return oracle.generate(model, alone, [st], 8, eos)

    assert_generate_matches_rows_alone(model, make_batch(model, rows, seed=2), rows,
                                       "flowcut_llm:layer=2,keep=0.25,positions=repack", row_generate)


def test_manual_decode_on_the_returned_cache_continues_the_renumbered_positions():
    """A forward on the prefill's cache without position ids: the layers after the stage continue at n'."""
    model = tiny_llava("eager")
    inputs = make_batch(model, SINGLE, seed=GEN_SEED)
    st = flowcut_stage(model, inputs, 2, 9, "repack")
    with vtp.patch(model, "flowcut_llm:layer=2,tokens=9,positions=repack"), torch.no_grad():
        out = model(**inputs, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=tok, use_cache=True, **cache_kwargs(out)).logits[0, -1]
    embeds = oracle.base.prompt_embeds(model, inputs)
    eager = oracle.base.eager_copy(model)
    seq = torch.cat([embeds, eager.model.language_model.embed_tokens(tok)], dim=1)
    want, _ = oracle.run(eager, seq, oracle.base.image_positions(model, inputs["input_ids"]), [st])
    torch.testing.assert_close(step, want[0, -1], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# keep everything: nothing is renumbered, so the unpatched model exactly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_with_repack_is_the_unpatched_model(attn):
    model = tiny_llava(attn)
    inputs = make_batch(model, BATCHES["1img+2img"], seed=2)
    with torch.no_grad():
        plain = model(**inputs).logits
    policy = "fastv:layer=2,keep=1.0,positions=repack"
    logits, trace = patched_prefill(model, inputs, policy)
    assert torch.equal(logits, plain)
    assert trace.tokens_per_layer == [inputs["input_ids"].shape[1]] * len(trace.tokens_per_layer)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with vtp.patch(model, policy), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), g)
    assert g.shape[1] > L


# ------------------------------------------------------------------------------------------------
# other 1-D RoPE families: LLaVA-OneVision (Qwen2 text model), InternVL (Qwen2 / Llama text models)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["onevision", "internvl"])
def test_other_families_match_the_oracle(family):
    from vlm_tokenprune.eval import tiny_families as tf

    if family == "onevision":
        model = tf.build_tiny_onevision("sdpa")
        inputs = tf.make_onevision_batch(model, [[4, "img", 3]], image_sizes=[[20, 36]], seed=1)
    else:
        model = tf.build_tiny_internvl("sdpa")
        inputs = tf.make_internvl_batch(model, [[4, "img", 3]], tiles=[1], seed=1)
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    k = n // 4
    want, kept = oracle.logits(model, inputs, [(2, "repack", k)])
    logits, trace = patched_prefill(model, inputs, f"fastv:layer=2,tokens={k},positions=repack")
    assert trace.stages[0].kept_positions[0] == kept[0]
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    gaps, _ = oracle.logits(model, inputs, [(2, "gaps", k)])
    assert (gaps - want).abs().max() > 1e-4
