"""PyramidDrop (arXiv 2410.17247): the ``pdrop`` preset (FastV's criterion before layers 8 / 16 / 24,
keeping 50 / 25 / 12.5 % of the ORIGINAL visual tokens) == a multi-stage oracle.

The oracle is FEATHER's stage runner with FastV's settings (RoPE, full-row softmax, no grid;
tests/reference/feather_oracle.py), cross-checked against the FastV oracle on one stage. The
preset itself runs on a 25-layer tiny LLaVA; the same schedule scaled to layers 1 / 2 / 3 runs
on the 4-layer one.
"""
from __future__ import annotations

import math

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, assert_batch_matches_rows_alone, assert_clear_cut, n_image_tokens, tiny_llava
from kit.prompts import SINGLE
from reference import fastv_oracle
from reference import feather_oracle as oracle
from vlm_tokenprune.errors import IncompatiblePolicyError
from vlm_tokenprune.eval.tiny_models import make_batch

ATOL = 1e-5
MARGIN = 1e-7
BATCH = [[5, "img", 7], [2, "img", 3, "img", 4]]
PAPER = ((8, 0.5), (16, 0.25), (24, 0.125))
SCALED = ((1, 0.5), (2, 0.25), (3, 0.125))
SCALED_POLICY = "+".join(f"fastv:layer={layer},keep={keep}" for layer, keep in SCALED)


def tiny(attn: str, layers: int = 4):
    return tiny_llava(attn, layers=layers)


def k_rule(x: float, n: int, floor: bool = False) -> int:
    """The library's half-up rule, or the official code's ``int(x * n)`` (the preset's ``rounding=floor``)."""
    return 0 if n == 0 else max(1, math.floor(x * n) if floor else math.floor(x * n + 0.5))


def oracle_stages(schedule, n_visual: int, floor: bool = False) -> list[dict]:
    return [dict(layer=layer, k=k_rule(keep, n_visual, floor), rope=True, softmax="row", stride=0)
            for layer, keep in schedule]


def assert_well_separated(run: dict) -> None:
    for i, st in enumerate(run["stages"]):
        assert_clear_cut(st["scores"].values(), st["k"], MARGIN, what=f"at stage {i}")


def check_batch(model, inputs, rows, policy, schedule, floor: bool = False) -> None:
    def row_oracle(alone):
        want = oracle.feather_run(model, alone, oracle_stages(schedule, n_image_tokens(alone), floor))
        assert_well_separated(want)
        return [ref["kept"] for ref in want["stages"]], want["logits"][0]

    trace = assert_batch_matches_rows_alone(model, inputs, rows, policy, row_oracle, atol=ATOL)
    assert [s.layer for s in trace.stages] == [layer for layer, _ in schedule]
    for b in range(len(rows)):  # fractions of the ORIGINAL count
        assert [st.visual_after[b] for st in trace.stages] == [k_rule(x, n_image_tokens(inputs, b), floor) for _, x in schedule]


# ------------------------------------------------------------------------------------------------
# the preset
# ------------------------------------------------------------------------------------------------
def test_preset_definition():
    pol = vtp.Policy.parse("pdrop")
    assert [(s.criterion, s.layer, s.budget.keep, s.budget.of) for s in pol.stages] == [
        ("fastv", 8, 0.5, "original"), ("fastv", 16, 0.25, "original"), ("fastv", 24, 0.125, "original")]
    assert vtp.Policy.parse(SCALED_POLICY).to_dict()["stages"][2]["budget"] == {"keep": 0.125}


def test_paper_layers_map_to_a_smaller_model_explicit_layers_do_not():
    model = tiny("sdpa")  # 4 layers: the preset's 8 / 16 / 24 (for 32 layers) become 1 / 2 / 3 (Policy.at_depth)
    with vtp.patch(model, "pdrop") as h:
        assert [(s.layer, s.budget.keep, s.depth) for s in h.policy.stages] == [(1, 0.5, None), (2, 0.25, None),
                                                                                (3, 0.125, None)]
    with pytest.raises(IncompatiblePolicyError, match=r"stages\[0\]\.layer: 8 is beyond the model; allowed: 1\.\.3"):
        vtp.patch(model, "fastv:layer=8,keep=0.5")  # written out: absolute
    assert not vtp.patching.is_patched(model)


def test_listed_by_the_cli(capsys):
    from vlm_tokenprune.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "\npdrop " in out and "2410.17247" in out
    assert "fastv:layer=8,depth=32,keep=0.5,rounding=floor" in out
    assert "fastv:layer=24,depth=32,keep=0.125,rounding=floor" in out


# ------------------------------------------------------------------------------------------------
# the oracle
# ------------------------------------------------------------------------------------------------
def test_oracle_stage_is_fastv_and_the_pyramid_matters():
    model = tiny("eager")
    inputs = make_batch(model, SINGLE)
    one = oracle.feather_run(model, inputs, oracle_stages(((2, 0.25),), 36))
    assert one["stages"][0]["kept"] == fastv_oracle.fastv_keep(model, inputs, 2, 9)
    torch.testing.assert_close(one["logits"], fastv_oracle.fastv_logits(model, inputs, 2, one["stages"][0]["kept"]),
                               atol=1e-6, rtol=0)
    pyramid = oracle.feather_run(model, inputs, oracle_stages(SCALED, 36))
    oneshot = oracle.feather_run(model, inputs, oracle_stages(((3, 0.125),), 36))
    assert [len(s["kept"]) for s in pyramid["stages"]] == [18, 9, 5]  # 0.125 * 36 = 4.5 -> 5 (official floor: 4)
    assert pyramid["stages"][2]["kept"] != oneshot["stages"][0]["kept"]  # ranking after earlier drops differs
    eos = model.generation_config.eos_token_id
    stages = oracle_stages(SCALED, 36)
    cached, rescored = (oracle.feather_generate(model, inputs, stages, 8, r, eos) for r in (False, True))
    assert cached != rescored


# ------------------------------------------------------------------------------------------------
# library == oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_paper_preset_on_a_32_layer_model_matches_oracle(attn):
    model = tiny(attn, 32)  # the paper's depth: its layers 8 / 16 / 24 unchanged, its floor counts (36 -> 18 / 9 / 4)
    check_batch(model, make_batch(model, SINGLE, seed=1), SINGLE, "pdrop", PAPER, floor=True)


@pytest.mark.parametrize("attn", BACKENDS)
def test_scaled_schedule_left_padded_batch_matches_rows_alone(attn):
    model = tiny(attn)
    check_batch(model, make_batch(model, BATCH, seed=2), BATCH, SCALED_POLICY, SCALED)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, use_cache):
    """Cached: the prompt's kept sets (all three stages) serve every decoded token. Cache-free: re-chosen each step."""
    model = tiny(attn)
    inputs = make_batch(model, SINGLE)
    L = inputs["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    kw = {} if use_cache else {"use_cache": False}
    with vtp.patch(model, SCALED_POLICY), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kw)
    want = oracle.feather_generate(model, inputs, oracle_stages(SCALED, 36), 8, rescore=not use_cache, eos_token_id=eos)
    got = g[0, L:].tolist()
    assert got[: len(want)] == want
