"""FastV (arXiv 2403.06764) in vlm_tokenprune == an independent oracle (tests/reference/fastv_oracle.py).

The oracle runs an eager deep copy of the model layer by layer without a cache, rebuilds the
last-token attention row from the layer's own modules, and drops the unkept image tokens
before layer K with the original position ids. The library runs hooks inside the real
forward / generate under every attention backend, batched and left-padded.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import vlm_tokenprune as vtp
from conftest import BACKENDS
from reference import fastv_oracle as oracle
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, build_tiny_llava, make_batch
from helpers import n_image_tokens, patched_prefill

torch.set_num_threads(1)

ATOL = 1e-5
SINGLE = [[5, "img", 7]]
TWO_IMAGES = [[3, "img", 4, "img", 2]]
BATCHES = {
    "1img+2img": [[5, "img", 7], [2, "img", 3, "img", 4]],
    "2img+1img+text": [[1, "img", "img", 5], [20, "img", 1], [12]],
}


@functools.lru_cache(maxsize=None)
def tiny(attn: str, next: bool = False):
    """One model per (backend, family), shared by the tests; never mutated (patches are always undone)."""
    return build_tiny_llava(attn, next=True, image_size=16) if next else build_tiny_llava(attn)


def k_of(budget: str, n_visual: int) -> int:
    """Kept count for a policy budget 'keep=x' / 'tokens=n' (documented rule: max(1, floor(x*n + 0.5)))."""
    key, value = budget.split("=")
    if n_visual == 0:
        return 0
    if key == "tokens":
        return int(value)
    return max(1, math.floor(float(value) * n_visual + 0.5))


def assert_well_separated(model, inputs, layer: int, k: int) -> None:
    """The k-th and (k+1)-th oracle scores differ clearly, so equal selections are not luck of rounding."""
    s = sorted(oracle.fastv_scores(model, inputs, layer).values(), reverse=True)
    if 0 < k < len(s):
        assert s[k - 1] - s[k] > 1e-7, f"ill-conditioned case: scores {s[k - 1]} vs {s[k]}"


def check_single_vs_oracle(model, inputs, layer: int, budget: str) -> None:
    k = k_of(budget, n_image_tokens(inputs))
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
def new_tokens(ids: torch.Tensor, prompt_len: int, eos, pad) -> list[int]:
    """Generated tokens up to and including the first EOS (the rest of a batch row is padding)."""
    out = []
    for t in ids[prompt_len:].tolist():
        out.append(t)
        if t == eos:
            break
    rest = ids[prompt_len + len(out):].tolist()
    assert all(t == pad for t in rest), rest
    return out


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, use_cache):
    model = tiny(attn)
    inputs = make_batch(model, SINGLE)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    kw = {} if use_cache else {"use_cache": False}
    with vtp.patch(model, "fastv:layer=2,tokens=9"), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kw)
    want = oracle.fastv_generate(model, inputs, 2, 9, 8, rescore=not use_cache, eos_token_id=eos)
    assert new_tokens(g[0], L, eos, pad) == want


# ------------------------------------------------------------------------------------------------
# batches with left padding
# ------------------------------------------------------------------------------------------------
def row_alone(inputs: dict, rows: list, b: int) -> dict:
    """Row b of a padded batch as its own unpadded batch of one (its images only)."""
    first = sum(seg == "img" for r in rows[:b] for seg in r)
    n_img = sum(seg == "img" for seg in rows[b])
    real = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][real][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if n_img:
        out["pixel_values"] = inputs["pixel_values"][first: first + n_img]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][first: first + n_img]
    return out


NEXT_BATCH = [[1, "img", "img", 5], [20, "img", 1], [12]]
NEXT_SIZES = [[20, 36], [16, 16], [36, 20]]


def check_batch_prefill_vs_rows_alone(model, inputs, rows, layer: int, budget: str) -> None:
    logits, trace = patched_prefill(model, inputs, f"fastv:layer={layer},{budget}")
    L = inputs["input_ids"].shape[1]
    kept_counts = []
    for b in range(len(rows)):
        alone = row_alone(inputs, rows, b)
        pad = L - alone["input_ids"].shape[1]
        k = k_of(budget, n_image_tokens(alone))
        assert_well_separated(model, alone, layer, k)
        keep = oracle.fastv_keep(model, alone, layer, k)
        want = oracle.fastv_logits(model, alone, layer, keep)[0]
        assert trace.stages[0].kept_positions[b] == [p + pad for p in keep], f"row {b}"
        n_b = want.shape[0]
        kept_counts.append(n_b)
        torch.testing.assert_close(logits[b, -n_b:], want, atol=ATOL, rtol=0, msg=f"row {b}")
    assert logits.shape[1] == max(kept_counts)


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
    inputs = make_batch(model, rows, seed=2)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    kw = {} if use_cache else {"use_cache": False}
    with vtp.patch(model, "fastv:layer=2,keep=0.25"), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kw)
    for b in range(len(rows)):
        alone = row_alone(inputs, rows, b)
        k = k_of("keep=0.25", n_image_tokens(alone))
        want = oracle.fastv_generate(model, alone, 2, k, 8, rescore=not use_cache, eos_token_id=eos)
        assert new_tokens(g[b], L, eos, pad) == want, f"row {b}"


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
