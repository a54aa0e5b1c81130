"""EfficientVLA token selection (arXiv 2506.10100) in vlm_tokenprune == an independent oracle
(tests/reference/efficientvla_oracle.py).

The oracle reads the eager model's own attention probabilities layer by layer without a
cache, sums text -> visual attention, min-max normalises, picks key + task tokens by
relevance and the rest by cosine diversity to the key set (plain loops, float64), and
drops the others before layer K with the original position ids. The library runs hooks
inside the real forward / generate under every attention backend, batched and left-padded.
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import (
    BACKENDS, assert_batch_matches_rows_alone, assert_clear_cut, assert_generate_matches_rows_alone, generate_rows,
    kept_count, n_image_tokens, patched_prefill, tiny_llava,
)
from kit.prompts import SINGLE, TWO_IMAGES, BATCHES
from reference import efficientvla_oracle as oracle
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, make_batch

ATOL = 1e-5
MARGIN = 1e-5  # selection boundaries must be this clear (normalised relevance / cosine units; fp32 noise ~1e-7)


def tiny(attn: str, next: bool = False):
    """RMSNorm weights randomised (at init they make normalised and raw hidden states cosine-equivalent)."""
    cfg = dict(next=True, image_size=16) if next else {}
    return tiny_llava(attn, tweaks=("random_norms",), **cfg)


def policy(layer: int, budget: str, **params) -> str:
    extra = "".join(f",{k}={v}" for k, v in params.items())
    return f"efficientvla:layer={layer},{budget}{extra}"


def assert_well_separated(d: dict) -> None:
    """Every boundary the selection draws (key | task | rest by relevance; chosen | rest by diversity)
    is clear, so equal selections are not luck of rounding."""
    for cut in (d["n_key"], d["n_key"] + d["n_task"]):
        assert_clear_cut([d["s"][p] for p in d["rank"]], cut, MARGIN, what="of relevance")
    assert_clear_cut([d["diversity"][p] for p in d["div_rank"]], d["n_div"], MARGIN, what="of diversity")


def check_single_vs_oracle(model, inputs, layer: int, budget: str, **params) -> None:
    k = kept_count(budget, n_image_tokens(inputs))
    d = oracle.efficientvla_details(model, inputs, layer, k, **params)
    assert_well_separated(d)
    want_logits = oracle.efficientvla_logits(model, inputs, layer, d["keep"])
    logits, trace = patched_prefill(model, inputs, policy(layer, budget, **params))
    assert len(trace.stages) == 1
    st = trace.stages[0]
    assert st.kept_positions[0] == d["keep"]
    assert st.visual_after == [k] and len(d["keep"]) == k  # the budget, exactly
    n_text = int((inputs["input_ids"][0] != IMAGE_TOKEN_ID).sum())
    assert logits.shape == want_logits.shape == (1, n_text + k, model.config.text_config.vocab_size)
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_oracle_attention_is_eager_output_attentions(layer):
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    eager = oracle.eager_copy(model)
    embeds = oracle.prompt_embeds(model, inputs)
    T = embeds.shape[1]
    with torch.no_grad():
        hidden = oracle.run_layers(eager, embeds, list(range(T)), range(layer - 1))
        want = eager(**inputs, output_attentions=True).attentions[layer - 1][0]
    torch.testing.assert_close(oracle.attention_probs(eager, layer - 1, hidden, list(range(T))).float(), want, atol=1e-6, rtol=0)


def test_oracle_is_discriminating():
    """Equality with the oracle is not vacuous: layers, k_key and alpha change the kept set, the
    diversity part differs from plain top-k relevance, visual->text attention (the paper's formula read
    literally) is all zero under the causal mask, pruning changes logits, and cached / cache-free
    generation differ on the generate-test prompt."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    d = {layer: oracle.efficientvla_details(model, inputs, layer, 9) for layer in (1, 2, 3)}
    assert len({tuple(v["keep"]) for v in d.values()}) == 3
    assert d[2]["n_div"] == 3 and d[2]["keep"] != sorted(d[2]["rank"][:9])  # diversity picks other tokens
    assert oracle.efficientvla_keep(model, inputs, 2, 9, k_key=6) != d[2]["keep"]
    assert oracle.efficientvla_keep(model, inputs, 2, 9, alpha=1.0) == sorted(d[2]["rank"][:9])
    assert oracle.efficientvla_keep(model, inputs, 2, 9, alpha=0.0) != d[2]["keep"]
    # the paper's A[i, j] with i visual, j text after the image: zero under the causal mask
    eager = oracle.eager_copy(model)
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions[1][0]
    img = oracle.image_positions(model, inputs["input_ids"])
    text = [j for j in range(img[0], inputs["input_ids"].shape[1]) if j not in set(img)]
    assert float(att[:, img][:, :, text].abs().max()) == 0.0 and float(att[:, text][:, :, img].sum()) > 0.1
    with torch.no_grad():
        plain = model(**inputs).logits
    pruned = oracle.efficientvla_logits(model, inputs, 2, d[2]["keep"])
    assert (pruned[0, -1] - plain[0, -1]).abs().max() > 1e-3
    _, trace = patched_prefill(model, inputs, policy(2, "tokens=9"))
    assert trace.stages[0].kept_positions[0] != d[1]["keep"]
    eos = model.generation_config.eos_token_id
    assert oracle.efficientvla_generate(model, inputs, 2, 12, 8, False, eos) != oracle.efficientvla_generate(model, inputs, 2, 12, 8, True, eos)


# ------------------------------------------------------------------------------------------------
# prefill: kept indices, logits, budgets
# ------------------------------------------------------------------------------------------------
COMBOS = [
    (1, "tokens=9", {}),
    (2, "keep=0.25", {}),
    (3, "tokens=12", {}),
    (2, "tokens=3", {}),  # K_final < K_key: key set capped, nothing else
    (2, "tokens=1", {}),
    (2, "keep=0.5", {"k_key": 6, "alpha": 0.25}),
]


@pytest.mark.parametrize("layer,budget,params", COMBOS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_single_image_prefill_matches_oracle(attn, layer, budget, params):
    model = tiny(attn)
    check_single_vs_oracle(model, make_batch(model, SINGLE), layer, budget, **params)


@pytest.mark.parametrize("attn", BACKENDS)
def test_two_images_and_anyres_prefill_match_oracle(attn):
    model = tiny(attn)
    check_single_vs_oracle(model, make_batch(model, TWO_IMAGES, seed=1), 2, "keep=0.25")
    nxt = tiny(attn, next=True)
    inputs = make_batch(nxt, [[4, "img", 3]], image_sizes=[[20, 36]])
    assert n_image_tokens(inputs) > 8  # base grid + anyres crops + newlines
    check_single_vs_oracle(nxt, inputs, 2, "keep=0.3")


def test_preset_carries_paper_defaults():
    (st,) = vtp.Policy.parse("efficientvla").stages
    assert (st.criterion, st.layer, st.budget.keep) == ("efficientvla", 2, 56 / 256)
    assert dict(st.params) == {"k_key": 4, "alpha": 0.5}
    assert vtp.PRESETS.get("efficientvla").arxiv == "2506.10100"
    model = tiny("sdpa")
    inputs = make_batch(model, SINGLE)
    k = kept_count(f"keep={56 / 256}", 36)
    assert k == 8
    d = oracle.efficientvla_details(model, inputs, 2, k)
    assert_well_separated(d)
    _, trace = patched_prefill(model, inputs, "efficientvla")
    assert trace.stages[0].kept_positions[0] == d["keep"]


@pytest.mark.parametrize("spec, field", [
    ("efficientvla:k_key=0", "stages[0].k_key"),
    ("efficientvla:alpha=1.5", "stages[0].alpha"),
    ("efficientvla:k_key=2.5", "stages[0].k_key"),
])
def test_bad_params_are_named(spec, field):
    with pytest.raises(vtp.PolicyError) as e:
        vtp.Policy.parse(spec)
    assert e.value.field == field


def test_no_text_after_the_image_is_refused():
    model = tiny("sdpa")
    inputs = make_batch(model, [[5, "img"]])
    with vtp.patch(model, policy(2, "tokens=4"), strict=True), torch.no_grad():
        with pytest.raises(vtp.InputError, match="no instruction text"):
            model(**inputs)
        model(**make_batch(model, SINGLE))  # the handle is still usable afterwards


# ------------------------------------------------------------------------------------------------
# batches with left padding == rows alone
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_prefill_matches_rows_alone(attn, batch):
    rows = BATCHES[batch]
    model = tiny(attn)
    budget = "keep=0.3"

    def row_oracle(alone):
        k = kept_count(budget, n_image_tokens(alone))
        if k == 0:  # text-only row: untouched
            return None
        d = oracle.efficientvla_details(model, alone, 2, k)
        assert_well_separated(d)
        return [d["keep"]], oracle.efficientvla_logits(model, alone, 2, d["keep"])[0]

    inputs = make_batch(model, rows, seed=2)
    trace = assert_batch_matches_rows_alone(model, inputs, rows, policy(2, budget), row_oracle, atol=ATOL)
    assert trace.stages[0].visual_after == [kept_count(budget, n_image_tokens(inputs, b)) for b in range(len(rows))]


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, use_cache):
    """Cached: the prompt's kept set serves every step. Cache-free: re-chosen each step."""
    model = tiny(attn)
    inputs = make_batch(model, SINGLE)
    eos = model.generation_config.eos_token_id
    want = oracle.efficientvla_generate(model, inputs, 2, 12, 8, rescore=not use_cache, eos_token_id=eos)
    assert generate_rows(model, inputs, policy(2, "tokens=12"), use_cache=use_cache) == [want]


@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_cached_generate_matches_rows_alone(attn):
    rows = BATCHES["1img+2img"]
    model = tiny(attn)
    eos = model.generation_config.eos_token_id
    assert_generate_matches_rows_alone(
        model, make_batch(model, rows, seed=2), rows, policy(2, "keep=0.25"),
        lambda alone: oracle.efficientvla_generate(model, alone, 2, kept_count("keep=0.25", n_image_tokens(alone)), 8,
                                                   rescore=False, eos_token_id=eos))


def test_explain_knows_the_budget_is_exact():
    from vlm_tokenprune.eval.flops import TextGeometry, policy_flops

    vicuna = TextGeometry(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    out = policy_flops(vicuna, "efficientvla", 64, 576)
    assert out["tokens_per_layer"] == [640] * 2 + [64 + 126] * 30  # 56/256 of 576 = 126
    assert out["lower_bound_stages"] == []  # its own select keeps exactly the budget
    assert out["scoring_flops"] is not None and out["scoring_flops"] > 0
