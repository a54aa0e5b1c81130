"""FlowCut's LLM stage (arXiv 2505.19536) in vlm_tokenprune == an independent oracle
(tests/reference/flowcut_llm_oracle.py).

The oracle works in FlowCut's own numbering (scores inside decoder layer P, prunes its
output), with key / value heads repeated to the query heads as the official SDPA path does;
the library scores with layer K-1's modules before layer K, over the H_kv value heads. The
tiny model has 4 query heads and 2 key/value heads, so the GQA head averaging is exercised.
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import (
    BACKENDS, assert_batch_matches_rows_alone, assert_clear_cut, assert_generate_matches_rows_alone, generate_rows,
    kept_count, n_image_tokens, patched_prefill, tiny_llava,
)
from kit.prompts import SINGLE, TWO_IMAGES, BATCHES, NEXT_BATCH
from reference import fastv_oracle
from reference import flowcut_llm_oracle as oracle
from vlm_tokenprune.eval.tiny_models import make_batch
from vlm_tokenprune.methods.flowcut_llm import FlowCutLLMCriterion
from vlm_tokenprune.scoring import ScoringContext

ATOL = 1e-5
MARGIN = 1e-6  # scores are O(1) here (value L1 norms), so margins are absolute on that scale
NEXT_SIZES = [[20, 36], [16, 16], [36, 20]]


def tiny(attn: str, next: bool = False):
    return tiny_llava(attn, next=True, image_size=16) if next else tiny_llava(attn)


def assert_well_separated(model, inputs, prune_layer: int, k: int) -> None:
    assert_clear_cut(oracle.flowcut_terms(model, inputs, prune_layer)["score"].values(), k, MARGIN)


def check_vs_oracle(model, inputs, layer: int, budget: str) -> list[int]:
    """Library stage at ``layer`` == FlowCut with prune_layer = layer - 1."""
    k = kept_count(budget, n_image_tokens(inputs))
    assert_well_separated(model, inputs, layer - 1, k)
    keep = oracle.flowcut_keep(model, inputs, layer - 1, k)
    want = oracle.flowcut_logits(model, inputs, layer - 1, keep)
    logits, trace = patched_prefill(model, inputs, f"flowcut_llm:layer={layer},{budget}")
    assert trace.stages[0].kept_positions[0] == keep
    assert trace.stages[0].visual_after == [k]  # the budget, exactly
    assert logits.shape == want.shape
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    return keep


# ------------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prune_layer", [0, 1, 2])
def test_oracle_relevance_term_is_eager_attention_over_the_image_keys(prune_layer):
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    img = fastv_oracle.image_positions(model, inputs["input_ids"])
    with torch.no_grad():
        att = fastv_oracle.eager_copy(model)(**inputs, output_attentions=True).attentions[prune_layer][0, :, -1]
    want = (att[:, img] / att[:, img].sum(-1, keepdim=True)).mean(0)
    rel = oracle.flowcut_terms(model, inputs, prune_layer)["rel"]
    torch.testing.assert_close(torch.tensor([rel[p] for p in img], dtype=torch.float32), want, atol=1e-6, rtol=0)


def test_oracle_is_discriminating():
    """Every term matters (relevance alone, value similarity alone, without the value norm: other
    top-k), FlowCut is not FastV, the layer matters, and pruning changes the logits.

    On the tiny model the value norm spreads much more than the two softmax terms, so those decide
    the top-k only on some prompts: this one (seed 1, top 9), also run through the library in
    test_each_term_decides_this_case."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE, seed=1)
    t = oracle.flowcut_terms(model, inputs, 1)
    top = lambda s: fastv_oracle.top_k_positions(s, 9)  # noqa: E731
    rs, ss = sum(t["rel"].values()), sum(t["sem"].values())
    variants = {
        "full": top(t["score"]),
        "rel*dens": top({p: t["rel"][p] / rs * t["dens"][p] for p in t["rel"]}),
        "sem*dens": top({p: t["sem"][p] / ss * t["dens"][p] for p in t["rel"]}),
        "rel+sem": top({p: t["rel"][p] / rs + t["sem"][p] / ss for p in t["rel"]}),
        "fastv": fastv_oracle.fastv_keep(model, inputs, 2, 9),
        "layer0": oracle.flowcut_keep(model, inputs, 0, 9),
        "layer2": oracle.flowcut_keep(model, inputs, 2, 9),
    }
    assert len({tuple(v) for v in variants.values()}) == len(variants), variants
    with torch.no_grad():
        plain = model(**inputs).logits
    assert (oracle.flowcut_logits(model, inputs, 1, variants["full"])[0, -1] - plain[0, -1]).abs().max() > 1e-3
    # the value norm does not depend on the query, so re-scoring each step rarely matters; it does on this prompt
    eos = model.generation_config.eos_token_id
    gen = make_batch(model, SINGLE, seed=GEN_SEED)
    assert oracle.flowcut_generate(model, gen, 1, 9, 8, False, eos) != oracle.flowcut_generate(model, gen, 1, 9, 8, True, eos)


@pytest.mark.parametrize("attn", BACKENDS)
def test_each_term_decides_this_case(attn):
    model = tiny(attn)
    check_vs_oracle(model, make_batch(model, SINGLE, seed=1), 2, "tokens=9")


def test_paper_layer_mapping():
    """FlowCut's "decoder layer 1" (scores inside layer 1, prunes its output) is this library's layer 2;
    the preset carries it and its budget."""
    pol = vtp.Policy.parse("flowcut_llm")
    assert [(s.criterion, s.layer, s.budget.keep) for s in pol.stages] == [("flowcut_llm", 2, 0.2222)]
    model = tiny("sdpa")
    inputs = make_batch(model, SINGLE)
    k = kept_count("keep=0.2222", 36)
    assert k == 8
    assert_well_separated(model, inputs, 1, k)
    logits, trace = patched_prefill(model, inputs, "flowcut_llm")
    keep = oracle.flowcut_keep(model, inputs, 1, k)
    assert trace.stages[0].kept_positions[0] == keep
    assert keep != oracle.flowcut_keep(model, inputs, 0, k)  # the other reading of "layer 1" differs
    torch.testing.assert_close(logits, oracle.flowcut_logits(model, inputs, 1, keep), atol=ATOL, rtol=0)


def test_listed_by_the_cli(capsys):
    from vlm_tokenprune.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "\nflowcut_llm " in out and "2505.19536" in out and "flowcut_llm:layer=2,keep=0.2222" in out


@pytest.mark.parametrize("prune_layer", [0, 1, 2])
def test_scores_equal_the_oracle_scores(prune_layer):
    """The criterion's score vector itself == the oracle's (GQA: H_kv value heads vs the official repeat_kv),
    tightly enough to tell the softmax domain of the relevance term apart (a full-row softmax, renormalised,
    is off by up to 2e-5 on this prompt); with the values captured from v_proj or, when absent, projected."""
    model = tiny("eager")
    inputs = make_batch(model, [[30, "img", 30]])
    eager = fastv_oracle.eager_copy(model)
    embeds = fastv_oracle.prompt_embeds(model, inputs)
    lm = eager.model.language_model
    L = embeds.shape[1]
    img = fastv_oracle.image_positions(model, inputs["input_ids"])
    vis = torch.tensor([img])
    with torch.no_grad():
        hidden = fastv_oracle.run_layers(eager, embeds, list(range(L)), range(prune_layer))
        layer = lm.layers[prune_layer]
        x = layer.input_layernorm(hidden)
        keys, values = layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)

        def score(values):
            ctx = ScoringContext(
                layer=layer, hidden=hidden, position_embeddings=lm.rotary_emb(hidden, torch.arange(L)[None]),
                seq_valid=torch.ones(1, L, dtype=torch.bool), last_idx=torch.tensor([L - 1]), visual_idx=vis,
                visual_ok=torch.ones_like(vis, dtype=torch.bool), orig_pos=vis, row=vis * 0, col=vis * 0,
                segment=vis * 0, is_newline=vis < 0, coords_known=False, keep=torch.tensor([9]), keys=keys, values=values)
            return FlowCutLLMCriterion().score(ctx)[0]

        got, projected = score(values), score(None)
    t = oracle.terms_from_embeds(eager, embeds, img, prune_layer)["score"]
    want = torch.tensor([t[p] for p in img], dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    torch.testing.assert_close(projected, got, atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------------
# prefill: kept indices and logits
# ------------------------------------------------------------------------------------------------
COMBOS = [(1, "tokens=9"), (2, "keep=0.25"), (2, "keep=0.5"), (3, "tokens=1"), (3, "tokens=35")]


@pytest.mark.parametrize("layer,budget", COMBOS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_single_image_prefill_matches_oracle(attn, layer, budget):
    model = tiny(attn)
    check_vs_oracle(model, make_batch(model, SINGLE), layer, budget)


@pytest.mark.parametrize("attn", BACKENDS)
def test_two_images_prefill_matches_oracle(attn):
    model = tiny(attn)
    inputs = make_batch(model, TWO_IMAGES, seed=1)
    keep = check_vs_oracle(model, inputs, 2, "keep=0.25")
    img = fastv_oracle.image_positions(model, inputs["input_ids"])
    assert 0 < sum(p < img[36] for p in keep) < len(keep)  # one budget shared by both images
    check_vs_oracle(model, inputs, 1, "tokens=40")


@pytest.mark.parametrize("attn", BACKENDS)
def test_llava_next_anyres_prefill_matches_oracle(attn):
    model = tiny(attn, next=True)
    inputs = make_batch(model, [[4, "img", 3]], image_sizes=[[20, 36]])
    check_vs_oracle(model, inputs, 2, "keep=0.5")
    check_vs_oracle(model, inputs, 3, "tokens=3")


# ------------------------------------------------------------------------------------------------
# batches with left padding
# ------------------------------------------------------------------------------------------------
def check_batch_vs_rows_alone(model, inputs, rows, layer: int, budget: str) -> None:
    def row_oracle(alone):
        k = kept_count(budget, n_image_tokens(alone))
        if k == 0:
            return None
        assert_well_separated(model, alone, layer - 1, k)
        keep = oracle.flowcut_keep(model, alone, layer - 1, k)
        return [keep], oracle.flowcut_logits(model, alone, layer - 1, keep)[0]

    assert_batch_matches_rows_alone(model, inputs, rows, f"flowcut_llm:layer={layer},{budget}", row_oracle, atol=ATOL)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_prefill_matches_rows_alone(attn, batch):
    rows = BATCHES[batch]
    model = tiny(attn)
    check_batch_vs_rows_alone(model, make_batch(model, rows, seed=2), rows, 2, "keep=0.25")


@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_llava_next_batch_prefill_matches_rows_alone(attn):
    model = tiny(attn, next=True)
    inputs = make_batch(model, NEXT_BATCH, seed=3, image_sizes=NEXT_SIZES)
    check_batch_vs_rows_alone(model, inputs, NEXT_BATCH, 2, "keep=0.3")


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
GEN_SEED = 5


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, use_cache):
    """Cached: the prompt's kept set serves every step. Cache-free: re-chosen each step (oracle rescore)."""
    model = tiny(attn)
    inputs = make_batch(model, SINGLE, seed=GEN_SEED)
    eos = model.generation_config.eos_token_id
    want = oracle.flowcut_generate(model, inputs, 1, 9, 8, rescore=not use_cache, eos_token_id=eos)
    assert generate_rows(model, inputs, "flowcut_llm:layer=2,tokens=9", use_cache=use_cache) == [want]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_generate_matches_rows_alone(attn, use_cache):
    rows = BATCHES["1img+2img"]
    model = tiny(attn)
    eos = model.generation_config.eos_token_id
    assert_generate_matches_rows_alone(
        model, make_batch(model, rows, seed=2), rows, "flowcut_llm:layer=2,keep=0.25",
        lambda alone: oracle.flowcut_generate(model, alone, 1, kept_count("keep=0.25", n_image_tokens(alone)), 8,
                                              rescore=not use_cache, eos_token_id=eos),
        use_cache=use_cache)
