"""AIM stage B (arXiv 2412.03248) in vlm_tokenprune == an independent oracle (tests/reference/aim_oracle.py).

The oracle runs an eager deep copy layer by layer without a cache, builds each scoring layer's
full [H, T, T] attention logits by hand (float64), runs the 5-step PageRank on
softmax(logits / tau), keeps the top-k image tokens and REMOVES the others before the next
layer (original position ids, plain causal mask). The library rebuilds the rows blockwise from
the layer's modules inside the real forward / generate under every backend, batched and
left-padded, one stage per layer of the schedule.

The tiny model's random attention is nearly uniform (logits ~ 0.03), so PageRank on it reduces
to the causal prior "earlier tokens collect more mass" and keeps the first k image tokens:
a test there could not tell a wrong importance from "keep the earliest". The tests therefore
sharpen its attention (q_proj x 16, logits of order 1-10, like a trained model's); the
discriminating test shows the selections are then content-dependent.
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
from reference import aim_oracle as oracle
from vlm_tokenprune.errors import PolicyError
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, make_batch
from vlm_tokenprune.methods.aim import aim_schedule, pagerank_importance

ATOL = 1e-5
REL_MARGIN = 1e-4  # the k-th and (k+1)-th importance differ by this much, relatively
SHARPEN = 16.0


def tiny(attn: str, next: bool = False, sharp: bool = True):
    """The shared tiny LLaVA (NeXT: 16 px crops), its LLM attention sharpened (q_proj x 16) unless ``sharp=False``."""
    cfg = dict(next=True, image_size=16) if next else {}
    return tiny_llava(attn, tweaks=("sharp_llm",) if sharp else (), **cfg)


def schedule(pol: vtp.Policy) -> list[tuple[int, tuple]]:
    out = []
    for st in pol.stages:
        b = st.budget
        out.append((st.layer, ("keep", b.keep) if b.keep is not None else ("tokens", b.tokens)))
    return out


def oracle_stages(pol: vtp.Policy, n_visual: int) -> list[tuple[int, int]]:
    return [(layer, kept_count(budget, n_visual)) for layer, budget in schedule(pol)]


def assert_well_separated(res: dict, stages) -> None:
    for (layer, k), score in zip(stages, res["scores"]):
        assert_clear_cut(score.values(), k, REL_MARGIN, relative=True, what=f"at layer {layer}")


def check_vs_oracle(model, inputs, pol) -> None:
    pol = vtp.Policy.parse(pol)
    stages = oracle_stages(pol, n_image_tokens(inputs))
    p = pol.stages[0].params
    res = oracle.aim_run(model, inputs, stages, tau=p["tau"], iters=p["iters"], d=p["damping"])
    assert_well_separated(res, stages)
    logits, trace = patched_prefill(model, inputs, pol)
    assert [st.kept_positions[0] for st in trace.stages] == res["kept"]
    assert [st.visual_after[0] for st in trace.stages] == [k for _, k in stages]  # budgets, exactly
    assert [len(s) for s in res["kept"]] == [k for _, k in stages]
    n_text = int((inputs["input_ids"][0] != IMAGE_TOKEN_ID).sum())
    assert logits.shape == res["logits"].shape == (1, n_text + stages[-1][1], model.config.text_config.vocab_size)
    torch.testing.assert_close(logits, res["logits"], atol=ATOL, rtol=0)


def one(layer: int, budget: str, **params) -> str:
    return f"aim:layer={layer},{budget}" + "".join(f",{k}={v}" for k, v in params.items())


# ------------------------------------------------------------------------------------------------
# the oracle itself, and the blockwise importance against it
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_oracle_logits_are_the_models_attention(layer):
    """softmax(oracle logits) == the eager model's own attention probabilities."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    eager = oracle.eager_copy(model)
    embeds = oracle.prompt_embeds(model, inputs)
    pos = list(range(embeds.shape[1]))
    with torch.no_grad():
        hidden = oracle.run_layers(eager, embeds, pos, range(layer))
        want = eager(**inputs, output_attentions=True).attentions[layer][0]
    got = torch.softmax(oracle.attention_logits(eager, layer, hidden, pos), dim=-1)
    torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=0)


def test_oracle_pagerank_is_the_official_update():
    """The oracle's loops == the official vectorised update (dist @ M, RMS over heads), damping too."""
    g = torch.Generator().manual_seed(0)
    H, N = 3, 7
    logits = torch.randn(1, H, N, N, generator=g, dtype=torch.float64) * 3
    logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    for d in (0.0, 0.15):
        M = torch.softmax(logits / 0.1, dim=-1)
        dist = torch.ones(1, H, 1, N, dtype=torch.float64) / N
        for _ in range(5):
            dist = (dist @ M) * (1 - d) + d / N
        want = dist.pow(2).mean(dim=1).sqrt().view(N)
        torch.testing.assert_close(torch.tensor(oracle.pagerank(logits[0], 0.1, 5, d), dtype=torch.float64), want)


@pytest.mark.parametrize("block_rows", [1, 5, None])
def test_blockwise_importance_equals_oracle_values_with_padding(block_rows):
    """Library importance (any block size, with left-padding slots of garbage) == oracle values."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    eager = oracle.eager_copy(model)
    lm = eager.model.language_model
    embeds = oracle.prompt_embeds(model, inputs)
    T = embeds.shape[1]
    with torch.no_grad():
        hidden = oracle.run_layers(eager, embeds, list(range(T)), range(1))
        want = torch.tensor(oracle.pagerank(oracle.attention_logits(eager, 1, hidden, list(range(T))), 0.2, 4, 0.1))
        pad = 3
        h = torch.cat([torch.randn(1, pad, hidden.shape[2]) * 5, hidden], dim=1)
        pos = torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(T)])[None]
        pe = lm.rotary_emb(h, pos)
        valid = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, T, dtype=torch.bool)], dim=1)
        got = pagerank_importance(lm.layers[1], h, pe, valid, tau=0.2, iters=4, damping=0.1, block_rows=block_rows)
    assert torch.all(got[0, :pad] == 0)
    torch.testing.assert_close(got[0, pad:].double(), want.double(), rtol=1e-4, atol=0)


def test_oracle_is_discriminating():
    """Equality with the oracle is not vacuous: on the sharpened model the kept sets depend on the layer
    and on tau and are not the earliest tokens (on the plain tiny model they are), the schedule's
    dropping changes later selections and the logits, and cached / cache-free generation differ."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    img = oracle.image_positions(model, inputs["input_ids"])
    keeps = {layer: oracle.aim_run(model, inputs, [(layer, 9)])["kept"][0] for layer in (1, 2, 3)}
    assert len({tuple(v) for v in keeps.values()}) == 3
    assert all(v != img[:9] for v in keeps.values())
    assert oracle.aim_run(model, inputs, [(2, 9)], tau=1.0)["kept"][0] != keeps[2]
    plain = tiny("eager", sharp=False)
    assert oracle.aim_run(plain, inputs, [(2, 9)])["kept"][0] == img[:9]
    # a second stage scores on the shortened sequence: not the same as scoring everything
    two = oracle.aim_run(model, inputs, [(1, 24), (3, 9)])
    assert two["kept"][1] != keeps[3]
    with torch.no_grad():
        full = model(**inputs).logits
    assert (two["logits"][0, -1] - full[0, -1]).abs().max() > 1e-3
    _, trace = patched_prefill(model, inputs, one(2, "tokens=9"))
    assert trace.stages[0].kept_positions[0] != keeps[1]
    stages = oracle_stages(aim_schedule(0, 3, 4), len(img))
    eos = model.generation_config.eos_token_id
    assert oracle.aim_generate(model, inputs, stages, 8, False, eos) != oracle.aim_generate(model, inputs, stages, 8, True, eos)


# ------------------------------------------------------------------------------------------------
# prefill: one stage, and schedules (one stage per layer)
# ------------------------------------------------------------------------------------------------
SINGLE_STAGE = [one(1, "tokens=9"), one(2, "keep=0.25"), one(3, "tokens=1"), one(2, "tokens=30"),
                one(2, "keep=0.5", tau=0.5, iters=3, damping=0.1)]
SCHEDULES = {"0->3": (0, 3), "1->3": (1, 3), "0->2": (0, 2)}


@pytest.mark.parametrize("pol", SINGLE_STAGE)
@pytest.mark.parametrize("attn", BACKENDS)
def test_single_stage_prefill_matches_oracle(attn, pol):
    model = tiny(attn)
    check_vs_oracle(model, make_batch(model, SINGLE), pol)


@pytest.mark.parametrize("sched", sorted(SCHEDULES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_schedule_prefill_matches_oracle(attn, sched):
    l1, l2 = SCHEDULES[sched]
    model = tiny(attn)
    inputs = make_batch(model, SINGLE)
    pol = aim_schedule(l1, l2, 4)
    check_vs_oracle(model, inputs, pol)
    _, trace = patched_prefill(model, inputs, pol)
    n_text = int((inputs["input_ids"][0] != IMAGE_TOKEN_ID).sum())
    expect = [36] * (l1 + 1) + [n for _, n in oracle_stages(pol, 36)] + [1] * (3 - l2)
    assert trace.tokens_per_layer == [n_text + n for n in expect]


@pytest.mark.parametrize("attn", BACKENDS)
def test_two_images_and_anyres_match_oracle(attn):
    model = tiny(attn)
    check_vs_oracle(model, make_batch(model, TWO_IMAGES, seed=1), aim_schedule(0, 3, 4))
    nxt = tiny(attn, next=True)
    inputs = make_batch(nxt, [[4, "img", 3]], image_sizes=[[20, 36]])
    assert n_image_tokens(inputs) > 8
    check_vs_oracle(nxt, inputs, aim_schedule(1, 3, 4))


# ------------------------------------------------------------------------------------------------
# batches with left padding == rows alone
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_padded_batch_schedule_matches_rows_alone(attn, batch, padding):
    """Padding slots are neither PageRank keys nor mass holders (pi_0 = 0 there), so a padded row scores
    as it does alone; right padding puts padded queries after real keys (causally visible to them)."""
    rows = BATCHES[batch]
    model = tiny(attn)
    inputs = make_batch(model, rows, seed=2, padding=padding)
    pol = aim_schedule(0, 3, 4)
    visual_after = []

    def row_oracle(alone):
        stages = oracle_stages(pol, n_image_tokens(alone))
        visual_after.append([k for _, k in stages])
        if stages[0][1] == 0:  # text-only row: untouched
            return None
        res = oracle.aim_run(model, alone, stages)
        assert_well_separated(res, stages)
        return res["kept"], res["logits"][0]

    trace = assert_batch_matches_rows_alone(model, inputs, rows, pol, row_oracle, padding=padding, atol=ATOL)
    assert [[st.visual_after[b] for st in trace.stages] for b in range(len(rows))] == visual_after


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, use_cache):
    """Cached: the prompt's kept sets (one per stage) serve every step. Cache-free: re-chosen each step."""
    model = tiny(attn)
    inputs = make_batch(model, SINGLE)
    eos = model.generation_config.eos_token_id
    pol = aim_schedule(0, 3, 4)
    want = oracle.aim_generate(model, inputs, oracle_stages(pol, 36), 8, rescore=not use_cache, eos_token_id=eos)
    assert generate_rows(model, inputs, pol, use_cache=use_cache) == [want]


@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_cached_generate_matches_rows_alone(attn):
    rows = BATCHES["1img+2img"]
    model = tiny(attn)
    eos = model.generation_config.eos_token_id
    pol = aim_schedule(1, 3, 4)
    assert_generate_matches_rows_alone(
        model, make_batch(model, rows, seed=2), rows, pol,
        lambda alone: oracle.aim_generate(model, alone, oracle_stages(pol, n_image_tokens(alone)), 8, False, eos))


# ------------------------------------------------------------------------------------------------
# the schedule and the preset
# ------------------------------------------------------------------------------------------------
def test_schedule_is_linear_and_ends_at_one_token():
    pol = aim_schedule(13, 21, 32)
    assert [s.layer for s in pol.stages] == list(range(14, 22))
    assert [s.budget.keep for s in pol.stages[:-1]] == [(21 - j) / 8 for j in range(14, 21)]
    assert pol.stages[-1].budget.tokens == 1 and pol.stages[-1].budget.keep is None
    assert all(s.criterion == "aim" and dict(s.params) == {"tau": 0.1, "iters": 5, "damping": 0.0} for s in pol.stages)
    assert vtp.Policy.parse("aim").at_depth(32) == pol  # the preset: Vicuna-7B defaults (its layers for 32 layers)
    assert vtp.PRESETS.get("aim").arxiv == "2412.03248"
    assert all(s.params["tau"] == 0.2 for s in vtp.Policy.parse("aim:tau=0.2").stages)
    assert aim_schedule(0, 3, 4, iters=3).stages[0].params["iters"] == 3
    # the official Qwen2 scheduler (retain_rate of scoring layer l applies from layer l + 1)
    retain = [max(0, 1.0 - (j - 14 + 1) * 0.125) if j >= 14 else 1.0 for j in range(28)]
    qwen = aim_schedule(14, 22, 28)
    want = [(j + 1, r) for j, r in enumerate(retain) if r < 1.0]
    want = want[: [r for _, r in want].index(0.0) + 1]  # ends where the rate first reaches 0 (here: 1 token)
    assert want[-1] == (22, 0.0)
    assert [(s.layer, s.budget.keep if s.budget.keep is not None else 0.0) for s in qwen.stages] == want


def test_schedule_policies_round_trip():
    pol = aim_schedule(0, 3, 4, tau=0.2)
    assert vtp.Policy.from_dict(pol.to_dict()) == pol
    assert vtp.Policy.parse(pol.to_string()) == pol
    assert vtp.Policy.parse(one(2, "keep=0.5")).stages[0].layer == 2


@pytest.mark.parametrize("args, field", [
    ((3, 3, 4), "aim_schedule.l1"),
    ((-1, 3, 4), "aim_schedule.l1"),
    ((0, 4, 4), "aim_schedule.l2"),
    ((0, 2.5, 4), "aim_schedule.l2"),
])
def test_schedule_errors_name_the_argument(args, field):
    with pytest.raises(PolicyError) as e:
        aim_schedule(*args)
    assert e.value.field == field


def test_bad_params_and_multi_stage_overrides_are_named():
    for spec, field in [("aim:tau=0", "stages[0].tau"), ("aim:iters=0", "stages[0].iters"),
                        ("aim:damping=1.0", "stages[0].damping")]:
        with pytest.raises(PolicyError) as e:
            vtp.Policy.parse(spec)
        assert e.value.field == field
    with pytest.raises(PolicyError):
        vtp.Policy.parse("aim:keep=0.5")  # the preset's budgets are a schedule: write stages to change them
    model = tiny("sdpa")
    with vtp.patch(model, "aim") as h:  # layers 14..21 of 32 on 4 layers: 14..19 -> 2 (the last: 25 %), 20, 21 -> 3
        assert [(s.layer, s.budget.to_dict()) for s in h.policy.stages] == [(2, {"keep": 0.25}), (3, {"tokens": 1})]
    with pytest.raises(vtp.IncompatiblePolicyError):
        vtp.patch(model, aim_schedule(13, 21, 32))  # written out: absolute layers, beyond a 4-layer model


def test_explain_counts_the_preset_schedule():
    from vlm_tokenprune.eval.flops import TextGeometry, policy_flops

    vicuna = TextGeometry(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    out = policy_flops(vicuna, "aim", 64, 576)
    want = [576] * 14 + [kept_count(("keep", (21 - j) / 8), 576) for j in range(14, 21)] + [1] * 11
    assert out["tokens_per_layer"] == [64 + v for v in want]
    assert out["lower_bound_stages"] == []  # plain top-k: the budgets are exact
