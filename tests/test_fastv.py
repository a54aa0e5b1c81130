"""FastV (arXiv 2403.06764) in vlm_tokenprune == an independent oracle (tests/reference/fastv_oracle.py).

The oracle runs an eager deep copy of the model layer by layer without a cache, rebuilds the
last-token attention row from the layer's own modules, and drops the unkept image tokens
before layer K with the original position ids. The library runs hooks inside the real
forward / generate under every attention backend, batched and left-padded.
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
from reference import fastv_oracle as oracle
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, make_batch

ATOL = 1e-5


def tiny(attn: str, next: bool = False):
    return tiny_llava(attn, next=True, image_size=16) if next else tiny_llava(attn)


def assert_well_separated(model, inputs, layer: int, k: int) -> None:
    assert_clear_cut(oracle.fastv_scores(model, inputs, layer).values(), k, 1e-7)


def check_single_vs_oracle(model, inputs, layer: int, budget: str) -> None:
    k = kept_count(budget, n_image_tokens(inputs))
    assert_well_separated(model, inputs, layer, k)
    want_keep = oracle.fastv_keep(model, inputs, layer, k)
    want_logits = oracle.fastv_logits(model, inputs, layer, want_keep)
    logits, trace = patched_prefill(model, inputs, f"fastv:layer={layer},{budget}")
    assert len(trace.stages) == 1
    assert trace.stages[0].kept_positions[0] == want_keep
    n_text = int((inputs["input_ids"][0] != IMAGE_TOKEN_ID).sum())
    assert want_logits.shape == (1, n_text + k, model.config.text_config.vocab_size)
    assert logits.shape == want_logits.shape
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_oracle_attention_row_matches_eager_output_attentions(layer):
    """The hand-built attention row == the eager model's own attention probabilities."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    scores = oracle.fastv_scores(model, inputs, layer)
    copy = oracle.eager_copy(model)
    with torch.no_grad():
        att = copy(**inputs, output_attentions=True).attentions[layer - 1]  # [1, H, L, L]
    row = att[0, :, -1].mean(0)
    assert sorted(scores) == oracle.image_positions(model, inputs["input_ids"])
    torch.testing.assert_close(torch.tensor([scores[p] for p in sorted(scores)]), row[sorted(scores)], atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", BACKENDS)
def test_oracle_keeping_everything_is_the_plain_model(attn):
    model = tiny(attn)
    inputs = make_batch(model, TWO_IMAGES)
    every = oracle.image_positions(model, inputs["input_ids"])
    with torch.no_grad():
        plain = model(**inputs).logits
    torch.testing.assert_close(oracle.fastv_logits(model, inputs, 2, every), plain, atol=ATOL, rtol=0)


def test_oracle_is_discriminating():
    """Equality with the oracle is not vacuous: other layers choose other tokens, pruning changes logits,
    and the cached / cache-free generation semantics differ on the generate-test prompt."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    keeps = {layer: oracle.fastv_keep(model, inputs, layer, 9) for layer in (1, 2, 3)}
    assert len({tuple(v) for v in keeps.values()}) == 3, keeps
    with torch.no_grad():
        plain = model(**inputs).logits
    text = (inputs["input_ids"][0] != IMAGE_TOKEN_ID).nonzero().flatten()
    pruned = oracle.fastv_logits(model, inputs, 2, keeps[2])
    assert (pruned[0, -1] - plain[0, -1]).abs().max() > 1e-3
    assert (pruned[0, : len(text)][-1] - plain[0, text][-1]).abs().max() > 1e-3
    # the library's selection differs from the oracle's at another layer
    _, trace = patched_prefill(model, inputs, "fastv:layer=2,tokens=9")
    assert trace.stages[0].kept_positions[0] != keeps[1]
    eos = model.generation_config.eos_token_id
    assert oracle.fastv_generate(model, inputs, 2, 9, 8, False, eos) != oracle.fastv_generate(model, inputs, 2, 9, 8, True, eos)


# ------------------------------------------------------------------------------------------------
# prefill: kept indices and logits
# ------------------------------------------------------------------------------------------------
COMBOS = [(1, "tokens=9"), (2, "keep=0.25"), (2, "keep=0.5"), (3, "tokens=1"), (3, "tokens=35")]


@pytest.mark.parametrize("layer,budget", COMBOS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_single_image_prefill_matches_oracle(attn, layer, budget):
    model = tiny(attn)
    check_single_vs_oracle(model, make_batch(model, SINGLE), layer, budget)


@pytest.mark.parametrize("attn", BACKENDS)
def test_two_images_prefill_matches_oracle(attn):
    model = tiny(attn)
    inputs = make_batch(model, TWO_IMAGES, seed=1)
    check_single_vs_oracle(model, inputs, 2, "keep=0.25")
    check_single_vs_oracle(model, inputs, 1, "tokens=40")  # more than one image holds


@pytest.mark.parametrize("attn", BACKENDS)
def test_llava_next_anyres_prefill_matches_oracle(attn):
    model = tiny(attn, next=True)
    inputs = make_batch(model, [[4, "img", 3]], image_sizes=[[20, 36]])
    n = n_image_tokens(inputs)
    assert n > 4 * 2  # base grid + anyres crops + newlines
    check_single_vs_oracle(model, inputs, 2, "keep=0.5")
    check_single_vs_oracle(model, inputs, 3, "tokens=3")


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, use_cache):
    model = tiny(attn)
    inputs = make_batch(model, SINGLE)
    got = generate_rows(model, inputs, "fastv:layer=2,tokens=9", use_cache=use_cache)
    eos = model.generation_config.eos_token_id
    assert got == [oracle.fastv_generate(model, inputs, 2, 9, 8, rescore=not use_cache, eos_token_id=eos)]


# ------------------------------------------------------------------------------------------------
# batches with left padding
# ------------------------------------------------------------------------------------------------
NEXT_SIZES = [[20, 36], [16, 16], [36, 20]]


def check_batch_prefill_vs_rows_alone(model, inputs, rows, layer: int, budget: str) -> None:
    def row_oracle(alone):
        k = kept_count(budget, n_image_tokens(alone))
        assert_well_separated(model, alone, layer, k)
        keep = oracle.fastv_keep(model, alone, layer, k)
        return [keep], oracle.fastv_logits(model, alone, layer, keep)[0]

    assert_batch_matches_rows_alone(model, inputs, rows, f"fastv:layer={layer},{budget}", row_oracle, atol=ATOL)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_prefill_matches_rows_alone(attn, batch):
    rows = BATCHES[batch]
    model = tiny(attn)
    check_batch_prefill_vs_rows_alone(model, make_batch(model, rows, seed=2), rows, 2, "keep=0.25")


@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_llava_next_batch_prefill_matches_rows_alone(attn):
    model = tiny(attn, next=True)
    inputs = make_batch(model, NEXT_BATCH, seed=3, image_sizes=NEXT_SIZES)
    check_batch_prefill_vs_rows_alone(model, inputs, NEXT_BATCH, 1, "keep=0.3")
    check_batch_prefill_vs_rows_alone(model, inputs, NEXT_BATCH, 3, "keep=0.3")


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_generate_matches_rows_alone(attn, batch, use_cache):
    """Cached: the prompt's kept set serves every step. Cache-free: re-chosen each step (oracle rescore)."""
    rows = BATCHES[batch]
    model = tiny(attn)
    eos = model.generation_config.eos_token_id
    assert_generate_matches_rows_alone(
        model, make_batch(model, rows, seed=2), rows, "fastv:layer=2,keep=0.25",
        lambda alone: oracle.fastv_generate(model, alone, 2, kept_count("keep=0.25", n_image_tokens(alone)), 8,
                                            rescore=not use_cache, eos_token_id=eos),
        use_cache=use_cache)


# ------------------------------------------------------------------------------------------------
# a generated token equal to image_token_id is text (no pixels come with it), as in the plain model
# ------------------------------------------------------------------------------------------------
def test_generating_the_image_token_id_does_not_abort_cached_generate():
    from transformers import LogitsProcessor, LogitsProcessorList

    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    L = inputs["input_ids"].shape[1]

    class ForceImageTokenFirst(LogitsProcessor):
        def __call__(self, ids, scores):
            if ids.shape[1] == L:
                scores = torch.full_like(scores, -1e9)
                scores[:, IMAGE_TOKEN_ID] = 0.0
            return scores

    kw = dict(max_new_tokens=3, do_sample=False, logits_processor=LogitsProcessorList([ForceImageTokenFirst()]))
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)  # the unpatched model continues normally
        assert plain[0, L] == IMAGE_TOKEN_ID and plain.shape[1] == L + 3
        with vtp.patch(model, "fastv:layer=2,keep=1.0"):  # keeps every token: must behave like the plain model
            g = model.generate(**inputs, **kw)
    assert torch.equal(g, plain)
