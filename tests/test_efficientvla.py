"""EfficientVLA token selection (arXiv 2506.10100) in vlm_tokenprune == an independent oracle
(tests/reference/efficientvla_oracle.py).

The oracle reads the eager model's own attention probabilities layer by layer without a
cache, sums text -> visual attention, min-max normalises, picks key + task tokens by
relevance and the rest by cosine diversity to the key set (plain loops, float64), and
drops the others before layer K with the original position ids. The library runs hooks
inside the real forward / generate under every attention backend, batched and left-padded.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import vlm_tokenprune as vtp
from conftest import BACKENDS
from reference import efficientvla_oracle as oracle
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, build_tiny_llava, make_batch
from helpers import n_image_tokens, new_tokens

torch.set_num_threads(1)

ATOL = 1e-5
MARGIN = 1e-5  # selection boundaries must be this clear (normalised relevance / cosine units; fp32 noise ~1e-7)
SINGLE = [[5, "img", 7]]
TWO_IMAGES = [[3, "img", 4, "img", 2]]
BATCHES = {
    "1img+2img": [[5, "img", 7], [2, "img", 3, "img", 4]],
    "2img+1img+text": [[1, "img", "img", 5], [20, "img", 1], [12]],
}


def randomize_norms(model):
    """RMSNorm weights are all ones at init, which makes the normalised and raw hidden states
    cosine-equivalent; random weights let the tests tell which representation is used."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in model.model.language_model.named_modules():
            if name.endswith("input_layernorm"):
                mod.weight.copy_(0.75 + 0.5 * torch.rand(mod.weight.shape, generator=g))
    return model


@functools.lru_cache(maxsize=None)
def tiny(attn: str, next: bool = False):
    """One model per (backend, family), shared by the tests; never mutated (patches are always undone)."""
    return randomize_norms(build_tiny_llava(attn, next=True, image_size=16) if next else build_tiny_llava(attn))


def k_of(budget: str, n_visual: int) -> int:
    key, value = budget.split("=")
    if n_visual == 0:
        return 0
    return int(value) if key == "tokens" else max(1, math.floor(float(value) * n_visual + 0.5))


def policy(layer: int, budget: str, **params) -> str:
    extra = "".join(f",{k}={v}" for k, v in params.items())
    return f"efficientvla:layer={layer},{budget}{extra}"


def assert_well_separated(d: dict) -> None:
    """Every boundary the selection draws (key | task | rest by relevance; chosen | rest by diversity)
    is clear, so equal selections are not luck of rounding."""
    s = [d["s"][p] for p in d["rank"]]
    for cut in (d["n_key"], d["n_key"] + d["n_task"]):
        if 0 < cut < len(s):
            assert s[cut - 1] - s[cut] > MARGIN, f"ill-conditioned relevance cut at {cut}: {s[cut - 1]} vs {s[cut]}"
    div = [d["diversity"][p] for p in d["div_rank"]]
    if 0 < d["n_div"] < len(div):
        assert div[d["n_div"] - 1] - div[d["n_div"]] > MARGIN, "ill-conditioned diversity cut"


def patched_prefill(model, inputs, pol):
    with vtp.patch(model, pol) as h, torch.no_grad():
        out = model(**inputs)
        trace = h.last_trace()
    return out.logits, trace


def check_single_vs_oracle(model, inputs, layer: int, budget: str, **params) -> None:
    k = k_of(budget, n_image_tokens(inputs))
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
    k = k_of(f"keep={56 / 256}", 36)
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
def row_alone(inputs: dict, rows: list, b: int) -> dict:
    first = sum(seg == "img" for r in rows[:b] for seg in r)
    n_img = sum(seg == "img" for seg in rows[b])
    real = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][real][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if n_img:
        out["pixel_values"] = inputs["pixel_values"][first: first + n_img]
    return out


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_prefill_matches_rows_alone(attn, batch):
    rows = BATCHES[batch]
    model = tiny(attn)
    inputs = make_batch(model, rows, seed=2)
    budget = "keep=0.3"
    logits, trace = patched_prefill(model, inputs, policy(2, budget))
    L = inputs["input_ids"].shape[1]
    lengths = []
    for b in range(len(rows)):
        alone = row_alone(inputs, rows, b)
        pad = L - alone["input_ids"].shape[1]
        k = k_of(budget, n_image_tokens(alone))
        if k == 0:  # text-only row: untouched
            keep, want = [], model(**alone).logits[0].detach()
        else:
            d = oracle.efficientvla_details(model, alone, 2, k)
            assert_well_separated(d)
            keep = d["keep"]
            want = oracle.efficientvla_logits(model, alone, 2, keep)[0]
        assert trace.stages[0].kept_positions[b] == [p + pad for p in keep], f"row {b}"
        assert trace.stages[0].visual_after[b] == k
        lengths.append(want.shape[0])
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0, msg=f"row {b}")
    assert logits.shape[1] == max(lengths)


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, use_cache):
    """Cached: the prompt's kept set serves every step. Cache-free: re-chosen each step."""
    model = tiny(attn)
    inputs = make_batch(model, SINGLE)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    kw = {} if use_cache else {"use_cache": False}
    with vtp.patch(model, policy(2, "tokens=12")), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kw)
    want = oracle.efficientvla_generate(model, inputs, 2, 12, 8, rescore=not use_cache, eos_token_id=eos)
    assert new_tokens(g[0], L, eos, pad) == want


@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_cached_generate_matches_rows_alone(attn):
    rows = BATCHES["1img+2img"]
    model = tiny(attn)
    inputs = make_batch(model, rows, seed=2)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    with vtp.patch(model, policy(2, "keep=0.25")), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    for b in range(len(rows)):
        alone = row_alone(inputs, rows, b)
        k = k_of("keep=0.25", n_image_tokens(alone))
        want = oracle.efficientvla_generate(model, alone, 2, k, 8, rescore=False, eos_token_id=eos)
        assert new_tokens(g[b], L, eos, pad) == want, f"row {b}"


def test_explain_knows_the_budget_is_exact():
    from vlm_tokenprune.eval.flops import TextGeometry, policy_flops

    vicuna = TextGeometry(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    out = policy_flops(vicuna, "efficientvla", 64, 576)
    assert out["tokens_per_layer"] == [640] * 2 + [64 + 126] * 30  # 56/256 of 576 = 126
    assert out["lower_bound_stages"] == []  # its own select keeps exactly the budget
    assert out["scoring_flops"] is not None and out["scoring_flops"] > 0
