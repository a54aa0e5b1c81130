"""FEATHER (arXiv 2412.13180) in vlm_tokenprune == an independent oracle (tests/reference/feather_oracle.py).

The oracle runs an eager deep copy layer by layer without a cache, scores with hand-built
no-RoPE q/k over the image keys, adds the stride grid from its own layout of each image's
patch grid, and drops tokens before each stage's layer with the original position ids. The
library runs hooks inside the real forward / generate under every attention backend,
batched and left-padded.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

import vlm_tokenprune as vtp
from kit import (
    BACKENDS, assert_batch_matches_rows_alone, assert_clear_cut, assert_generate_matches_rows_alone, n_image_tokens,
    patched_prefill, tiny_llava,
)
from kit.prompts import SINGLE, TWO_IMAGES, BATCHES, NEXT_BATCH
from reference import fastv_oracle
from reference import feather_oracle as oracle
from vlm_tokenprune.errors import IncompatiblePolicyError, InputError
from vlm_tokenprune.eval.tiny_models import make_batch
from vlm_tokenprune.methods.feather import FeatherCriterion, stride_grid

ATOL = 1e-5
MARGIN = 1e-7
NEXT_SIZE = [[30, 40]]  # anyres grid: canvas rows 1-4 (unpadded) x cols 0-5, each row closed by a newline
NEXT_SIZES = [[30, 40], [40, 30], [36, 20]]


def tiny(attn: str, kind: str = "llava"):
    """4-layer LLaVA (6x6 grid), LLaVA-NeXT (3x3 base grid + anyres), or a 32-layer LLaVA for the paper preset."""
    if kind == "next":
        return tiny_llava(attn, next=True, image_size=24)
    if kind == "deep":
        return tiny_llava(attn, layers=32)
    return tiny_llava(attn)


# ------------------------------------------------------------------------------------------------
# stage specs: one description -> the library policy and the oracle stages
# ------------------------------------------------------------------------------------------------
def S(layer, keep=None, tokens=None, of="original", rope=False, softmax="keys", stride=3) -> dict:
    return dict(layer=layer, keep=keep, tokens=tokens, of=of, rope=rope, softmax=softmax, stride=stride)


R07 = [S(1, keep=0.3), S(3, keep=0.09, of="current", stride=0)]  # the paper's R = 0.7, scaled to 4 layers
R05 = [S(1, keep=0.5), S(2, keep=0.25, of="current", stride=0)]  # R = 0.5


def k_rule(x: float, n: int, floor: bool = False) -> int:
    """The documented budget rule: max(1, floor(x * n + 0.5)), 0 without visual tokens; ``floor``: the
    official code's ``int(x * n)`` (the preset's ``rounding=floor``)."""
    return 0 if n == 0 else max(1, math.floor(x * n) if floor else math.floor(x * n + 0.5))


def to_policy(specs) -> dict:
    stages = []
    for s in specs:
        st = {"criterion": "feather", "layer": s["layer"],
              "params": {"rope": s["rope"], "softmax": s["softmax"], "stride": s["stride"]}}
        if s["tokens"] is not None:
            st["tokens"] = s["tokens"]
        else:
            st["keep"] = s["keep"]
            if s["of"] != "original":
                st["of"] = s["of"]
        stages.append(st)
    return {"stages": stages}


def to_oracle(specs, n_visual: int, floor: bool = False) -> list[dict]:
    out = []
    for s in specs:
        if s["tokens"] is not None:
            k = s["tokens"]
        elif s["of"] == "current":
            k = functools.partial(k_rule, s["keep"], floor=floor)
        else:
            k = k_rule(s["keep"], n_visual, floor)
        out.append(dict(layer=s["layer"], k=k, rope=s["rope"], softmax=s["softmax"], stride=s["stride"]))
    return out


def assert_well_separated(run: dict) -> None:
    """At every stage the k-th and (k+1)-th oracle scores differ clearly (equal selections are not luck)."""
    for i, st in enumerate(run["stages"]):
        assert_clear_cut(st["scores"].values(), st["k"], MARGIN, what=f"at stage {i}")


def check_vs_oracle(model, inputs, specs) -> dict:
    want = oracle.feather_run(model, inputs, to_oracle(specs, n_image_tokens(inputs)))
    assert_well_separated(want)
    logits, trace = patched_prefill(model, inputs, to_policy(specs))
    assert not vtp.patching.is_patched(model)
    assert len(trace.stages) == len(specs)
    for i, (got, ref, spec) in enumerate(zip(trace.stages, want["stages"], specs)):
        assert got.kept_positions[0] == ref["kept"], f"stage {i}"
        # the budget: exactly k by the criterion, plus the grid (FEATHER's union), nothing else
        assert len(ref["top"]) == ref["k"]
        assert ref["kept"] == sorted(set(ref["top"]) | set(ref["grid"]))
        assert got.visual_after == [len(ref["kept"])]
        assert (len(ref["grid"]) > 0) == (spec["stride"] > 0)
    assert logits.shape == want["logits"].shape
    torch.testing.assert_close(logits, want["logits"], atol=ATOL, rtol=0)
    return want


# ------------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_oracle_attention_matches_eager_output_attentions(layer):
    """With RoPE, the hand-built rows == the eager model's attention probabilities, over the whole row
    ("row") and renormalised per head over the image keys ("keys")."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    img = fastv_oracle.image_positions(model, inputs["input_ids"])
    with torch.no_grad():
        att = oracle.base.eager_copy(model)(**inputs, output_attentions=True).attentions[layer - 1][0, :, -1]  # [H, L]
    for softmax, want in (("row", att[:, img].mean(0)),
                          ("keys", (att[:, img] / att[:, img].sum(-1, keepdim=True)).mean(0))):
        run = oracle.feather_run(model, inputs, [dict(layer=layer, k=1, rope=True, softmax=softmax, stride=0)])
        got = torch.tensor([run["stages"][0]["scores"][p] for p in img], dtype=torch.float32)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_oracle_layouts():
    """LLaVA-1.5: raster 6x6 per image. LLaVA-NeXT: 3x3 base, then the unpadded anyres rows each closed by a newline."""
    model = tiny("eager")
    lay = oracle.grid_layout(model, make_batch(model, TWO_IMAGES))
    assert lay[:7] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4), (0, 0, 5), (0, 1, 0)]
    assert lay[36] == (1, 0, 0) and len(lay) == 72
    nxt = tiny("eager", "next")
    lay = oracle.grid_layout(nxt, make_batch(nxt, [[4, "img", 3]], image_sizes=NEXT_SIZE))  # 30x40: 1x2 crops, rows unpadded
    assert lay[:9] == [(0, r, c) for r in range(3) for c in range(3)]
    assert lay[9:16] == [(1, 1, c) for c in range(6)] + [None]
    assert len(lay) == 9 + 4 * 7


def test_oracle_is_discriminating():
    """Each setting matters: RoPE on/off and the softmax domain change the ranking; the grid adds
    tokens beyond the top-k; stage 2's budget depends on stage 1's count; pruning changes logits."""
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    tops = {}
    for rope in (False, True):
        for softmax in ("keys", "row"):
            run = oracle.feather_run(model, inputs, [dict(layer=2, k=9, rope=rope, softmax=softmax, stride=0)])
            assert_well_separated(run)
            tops[rope, softmax] = tuple(run["stages"][0]["top"])
    assert tops[False, "keys"] != tops[True, "keys"] and tops[False, "row"] != tops[True, "row"], tops
    # the softmax domain: see test_softmax_domain_is_honoured (it rarely changes a tiny model's ranking)

    run = oracle.feather_run(model, inputs, to_oracle(R07, 36))
    s1, s2 = run["stages"]
    assert len(s1["kept"]) > s1["k"] == 11 and set(s1["grid"]) - set(s1["top"])
    assert s2["k"] == k_rule(0.09, len(s1["kept"]))
    with torch.no_grad():
        plain = model(**inputs).logits
    assert (run["logits"][0, -1] - plain[0, -1]).abs().max() > 1e-3
    # the library's own selection changes with each parameter too
    kept = {}
    for params in ({}, {"stride": 0}, {"rope": True}, {"stride": 2}):
        spec = [S(2, tokens=9, **params)]
        _, trace = patched_prefill(model, inputs, to_policy(spec))
        kept[tuple(sorted(params.items()))] = tuple(trace.stages[0].kept_positions[0])
    assert len(set(kept.values())) == 4, kept
    eos = model.generation_config.eos_token_id
    stages = to_oracle(R07, 36)
    cached, rescored = (oracle.feather_generate(model, inputs, stages, 8, r, eos) for r in (False, True))
    assert cached != rescored


def test_feather_with_rope_and_row_softmax_and_no_grid_is_fastv():
    model = tiny("sdpa")
    inputs = make_batch(model, SINGLE)
    _, trace = patched_prefill(model, inputs, to_policy([S(2, tokens=9, rope=True, softmax="row", stride=0)]))
    assert trace.stages[0].kept_positions[0] == fastv_oracle.fastv_keep(model, inputs, 2, 9)


# ------------------------------------------------------------------------------------------------
# the grid and the selection, on hand-made contexts
# ------------------------------------------------------------------------------------------------
def fake_ctx(cells, keep, coords_known=True):
    """``cells``: per row, a list of (segment, row, col, is_newline) for its visual tokens (padded with None)."""
    B, N = len(cells), max(len(r) for r in cells)
    t = {k: torch.full((B, N), -1, dtype=torch.long) for k in ("segment", "row", "col")}
    nl = torch.zeros(B, N, dtype=torch.bool)
    ok = torch.zeros(B, N, dtype=torch.bool)
    for b, r in enumerate(cells):
        for n, c in enumerate(r):
            if c is None:
                continue
            t["segment"][b, n], t["row"][b, n], t["col"][b, n], nl[b, n] = c
            ok[b, n] = True
    return SimpleNamespace(visual_ok=ok, is_newline=nl, keep=torch.tensor(keep), coords_known=coords_known, **t)


def test_stride_grid_non_square_several_grids_newlines():
    # segment 0: a 4 x 7 grid; segment 1: an unpadded grid whose rows start at 2, cols at 1, rows closed by newlines
    seg0 = [(0, r, c, False) for r in range(4) for c in range(7)]
    seg1 = []
    for r in (2, 3, 4, 5):
        seg1 += [(1, r, c, False) for c in (1, 2, 3, 4)] + [(1, -1, -1, True)]
    cls = [(2, -1, -1, False)]  # a CLS-like token: no grid coordinates
    cells = [seg0 + seg1 + cls, seg0[:5] + [None] * 3]
    ctx = fake_ctx(cells, [1, 1])
    got = stride_grid(ctx, 3)
    want0 = {(0, r, c) for r in (0, 3) for c in (0, 3, 6)} | {(1, r, c) for r in (2, 5) for c in (1, 4)}
    on = {(s, r, c) for (s, r, c, _), g in zip(cells[0], got[0].tolist()) if g}
    assert on == want0
    assert got[1].tolist() == [True, False, False, True, False] + [False] * (got.shape[1] - 5)
    assert stride_grid(ctx, 1)[0].sum() == 28 + 16  # every spatial token, no newline, no CLS


def test_select_is_top_k_union_grid_and_respects_padding():
    cells = [[(0, r, c, False) for r in range(3) for c in range(3)], [(0, 0, c, False) for c in range(4)] + [None] * 5]
    ctx = fake_ctx(cells, [2, 1])
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.9, 0.8, 0.4, 0.5, 0.6], [0.1, 0.9, 0.2, 0.3] + [5.0] * 5])
    crit = FeatherCriterion()
    idx, ok = crit.select(ctx, scores, rope=False, softmax="keys", stride=2)
    rows = [sorted(i[o].tolist()) for i, o in zip(idx, ok)]
    assert rows[0] == [0, 2, 4, 5, 6, 8]  # top-2 {4, 5} + grid {0, 2, 6, 8}
    assert rows[1] == [0, 1, 2]  # top-1 {1} + grid {0, 2}; padded slots never chosen
    idx, ok = crit.select(ctx, scores, rope=False, softmax="keys", stride=0)
    assert [sorted(i[o].tolist()) for i, o in zip(idx, ok)] == [[4, 5], [1]]
    with pytest.raises(InputError, match="feather.stride"):
        crit.select(fake_ctx(cells, [2, 1], coords_known=False), scores, rope=False, softmax="keys", stride=3)
    idx, ok = crit.select(fake_ctx(cells, [2, 1], coords_known=False), scores, rope=False, softmax="keys", stride=0)
    assert ok.sum(1).tolist() == [2, 1]


# ------------------------------------------------------------------------------------------------
# prefill: kept indices and logits
# ------------------------------------------------------------------------------------------------
COMBOS = {
    "R0.7": R07,
    "R0.5": R05,
    "rope,row,tokens": [S(2, tokens=9, rope=True, softmax="row", stride=0)],
    "rope,keys,stride2": [S(2, keep=0.25, rope=True, stride=2)],
    "norope,row,stride4,3stages": [S(1, keep=0.5, softmax="row", stride=4), S(2, tokens=8, stride=0),
                                   S(3, keep=0.5, of="current", stride=0)],
}


@pytest.mark.parametrize("combo", sorted(COMBOS))
@pytest.mark.parametrize("attn", BACKENDS)
def test_single_image_prefill_matches_oracle(attn, combo):
    model = tiny(attn)
    check_vs_oracle(model, make_batch(model, SINGLE), COMBOS[combo])


@pytest.mark.parametrize("attn", BACKENDS)
def test_softmax_domain_is_honoured(attn):
    """On this prompt, renormalising each head over the image keys ("keys") reweights the heads enough
    to change the top-24 against the full-row softmax ("row"), with clear margins on both sides."""
    model = tiny(attn)
    inputs = make_batch(model, [[30, "img", 30]])
    kept = [check_vs_oracle(model, inputs, [S(2, tokens=24, softmax=sm, stride=0)])["stages"][0]["kept"]
            for sm in ("keys", "row")]
    assert kept[0] != kept[1]


@pytest.mark.parametrize("attn", BACKENDS)
def test_two_images_prefill_matches_oracle(attn):
    model = tiny(attn)
    inputs = make_batch(model, TWO_IMAGES, seed=1)
    want = check_vs_oracle(model, inputs, R07)
    img = fastv_oracle.image_positions(model, inputs["input_ids"])
    g = want["stages"][0]["grid"]
    assert len(g) == 8 and sum(p < img[36] for p in g) == 4  # a 2x2 stride-3 grid on each 6x6 image
    check_vs_oracle(model, inputs, [S(2, tokens=30, rope=True, stride=2)])


@pytest.mark.parametrize("attn", BACKENDS)
def test_llava_next_anyres_prefill_matches_oracle(attn):
    model = tiny(attn, "next")
    inputs = make_batch(model, [[4, "img", 3]], image_sizes=NEXT_SIZE)
    want = check_vs_oracle(model, inputs, [S(1, keep=0.3), S(3, keep=0.5, of="current", stride=0)])
    # base (0,0) + the anyres grid anchored at its first real row: (1,0), (1,3), (4,0), (4,3); newlines never
    assert len(want["stages"][0]["grid"]) == 5
    check_vs_oracle(model, inputs, [S(2, keep=0.5, stride=2)])


@pytest.mark.parametrize("attn", BACKENDS)
def test_paper_preset_on_a_32_layer_model_matches_oracle(attn):
    """The registered preset itself at its reference depth (layers 8 and 16, keep int(0.3 n) + stride 3, then
    int(0.09 n) of the current count: the official code's floor)."""
    model = tiny(attn, "deep")
    inputs = make_batch(model, SINGLE, seed=4)
    want = oracle.feather_run(model, inputs, to_oracle([S(8, keep=0.3), S(16, keep=0.09, of="current", stride=0)], 36,
                                                       floor=True))
    assert_well_separated(want)
    logits, trace = patched_prefill(model, inputs, "feather")
    assert [s.layer for s in trace.stages] == [8, 16]
    assert [s.kept_positions[0] for s in trace.stages] == [s["kept"] for s in want["stages"]]
    assert want["stages"][0]["k"] == 10 and len(want["stages"][0]["kept"]) > 10  # int(36 * (1 - 0.7)) = 10
    torch.testing.assert_close(logits, want["logits"], atol=ATOL, rtol=0)


def test_preset_definition_and_refusal_on_small_models():
    pol = vtp.Policy.parse("feather")
    assert [(s.layer, s.budget.keep, s.budget.of, dict(s.params)) for s in pol.stages] == [
        (8, 0.3, "original", {"rope": False, "softmax": "keys", "stride": 3}),
        (16, 0.09, "current", {"rope": False, "softmax": "keys", "stride": 0}),
    ]
    assert [dict(s.params)["rope"] for s in vtp.Policy.parse("feather:rope=true").stages] == [True, True]
    assert [(s.depth, s.budget.rounding) for s in pol.stages] == [(32, "floor"), (32, "floor")]  # official int()
    model = tiny("sdpa")  # 4 layers: 8 / 16 of 32 -> 1 / 2
    with vtp.patch(model, "feather") as h:
        assert [s.layer for s in h.policy.stages] == [1, 2]
    with pytest.raises(IncompatiblePolicyError, match=r"stages\[0\]\.layer: 8 is beyond the model; allowed: 1\.\.3"):
        vtp.patch(model, pol.to_dict()["stages"][0]["criterion"] + ":layer=8,keep=0.3")
    assert not vtp.patching.is_patched(model)
    with pytest.raises(vtp.errors.PolicyError, match="stride"):
        vtp.Policy.parse({"stages": [{"criterion": "feather", "layer": 2, "keep": 0.5, "params": {"stride": -1}}]})
    with pytest.raises(vtp.errors.PolicyError, match="softmax"):
        vtp.Policy.parse({"stages": [{"criterion": "feather", "layer": 2, "keep": 0.5, "params": {"softmax": "all"}}]})


def test_listed_by_the_cli(capsys):
    from vlm_tokenprune.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "\nfeather " in out and "2412.13180" in out
    assert "feather:layer=8,depth=32,keep=0.3,rounding=floor" in out
    assert "feather:layer=16,depth=32,keep=0.09,of=current,rounding=floor,stride=0" in out
    assert "rope=False, softmax='keys', stride=3" in out


# ------------------------------------------------------------------------------------------------
# batches with left padding
# ------------------------------------------------------------------------------------------------
def check_batch_vs_rows_alone(model, inputs, rows, specs) -> None:
    def row_oracle(alone):
        n = n_image_tokens(alone)
        if n == 0:
            return None
        run = oracle.feather_run(model, alone, to_oracle(specs, n))
        assert_well_separated(run)
        return [ref["kept"] for ref in run["stages"]], run["logits"][0]

    assert_batch_matches_rows_alone(model, inputs, rows, to_policy(specs), row_oracle, atol=ATOL)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_prefill_matches_rows_alone(attn, batch):
    rows = BATCHES[batch]
    model = tiny(attn)
    check_batch_vs_rows_alone(model, make_batch(model, rows, seed=2), rows, R05)


@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_llava_next_batch_prefill_matches_rows_alone(attn):
    model = tiny(attn, "next")
    inputs = make_batch(model, NEXT_BATCH, seed=3, image_sizes=NEXT_SIZES)
    # (scored from layer 1's input: at layer 0's input all image_newline tokens are identical, hence exact ties)
    check_batch_vs_rows_alone(model, inputs, NEXT_BATCH, [S(2, keep=0.4, stride=2), S(3, keep=0.5, of="current", stride=0)])


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, use_cache):
    """Cached: the prompt's kept sets serve every step. Cache-free: re-chosen each step (oracle rescore)."""
    rows = BATCHES["1img+2img"]
    model = tiny(attn)
    eos = model.generation_config.eos_token_id
    assert_generate_matches_rows_alone(
        model, make_batch(model, rows, seed=2), rows, to_policy(R07),
        lambda alone: oracle.feather_generate(model, alone, to_oracle(R07, n_image_tokens(alone)), 8,
                                              rescore=not use_cache, eos_token_id=eos),
        use_cache=use_cache)
