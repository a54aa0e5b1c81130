"""Depth-aware presets (issue 16): a preset states its layers for the paper's reference depth
(``Stage.depth``, 32 for LLaVA-1.5-7B) and ``patch()`` maps them with ``Policy.at_depth``; identical
at the reference depth, explicit ``layer=`` wins; per-stage budget rounding (FEATHER / PyramidDrop
keep the official ``int()``); every preset runs on every tiny model family and on the shipped tiny
VLM, and ``explain`` predicts it for every geometry ``profile`` knows.
"""
from __future__ import annotations

import functools
import math

import pytest

import vlm_tokenprune as vtp
from kit import tiny_llava, tiny_qwen
from vlm_tokenprune import IncompatiblePolicyError, Policy, PolicyError
from vlm_tokenprune.cli import main
from vlm_tokenprune.eval.profiler import MODEL_CHOICES
from vlm_tokenprune.eval.tiny_models import make_batch



def _parses(name: str) -> bool:
    try:
        Policy.parse(name)
    except PolicyError:  # needs a file argument made for the model (efficientvla_layers, finercut: calibration=)
        return False
    return True


PRESETS = [n for n in vtp.PRESETS.names() if _parses(n)]  # read at collection: later presets are covered too


def _maps(name: str, depth: int) -> list:
    return [(s.layer, s.budget.to_dict() if s.budget else None) for s in Policy.parse(name).at_depth(depth).stages
            if s.changes_tokens]


# -- the rule -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_identical_to_the_paper_at_the_reference_depth(name):
    pol = Policy.parse(name)
    for depth in {s.depth for s in pol.stages} - {None}:
        mapped = pol.at_depth(depth)
        assert [s.layer for s in mapped.stages] == [s.layer for s in pol.stages]
        assert all(s.depth is None for s in mapped.stages)


def test_mapping_table():
    assert [s.layer for s in Policy.parse("feather").at_depth(40).stages] == [10, 20]  # 13B
    assert [s.layer for s in Policy.parse("feather").at_depth(28).stages] == [7, 14]  # Qwen2-VL-7B
    assert [s.layer for s in Policy.parse("pdrop").at_depth(24).stages] == [6, 12, 18]  # Qwen2-0.5B
    assert [s.layer for s in Policy.parse("pdrop").at_depth(4).stages] == [1, 2, 3]
    assert Policy.parse("yopo").at_depth(40).stages[3].layer == 15
    # collapse: token stages landing on one layer -> the later one there (its budget)
    assert _maps("pdrop", 3) == [(1, {"keep": 0.5, "rounding": "floor"}), (2, {"keep": 0.125, "rounding": "floor"})]
    # ... an of=current budget composed with the earlier keep (0.3 then 0.09 of what is left)
    (only,) = Policy.parse("feather").at_depth(2).stages
    assert only.layer == 1 and math.isclose(only.budget.keep, 0.3 * 0.09) and only.budget.of == "original"
    assert _maps("aim", 4) == [(2, {"keep": 0.25}), (3, {"tokens": 1})]
    # first_layer: never at or below the model's first full-attention layer
    assert [s.layer for s in Policy.parse("pdrop").at_depth(4, first_layer=2).stages] == [2, 3]


def test_explicit_layers_win_and_depth_round_trips():
    assert Policy.parse("fastv:layer=8,keep=0.5").at_depth(4).stages[0].layer == 8  # absolute: patch() refuses it
    assert Policy.parse("fastv:layer=8,keep=0.5,depth=32").at_depth(4).stages[0].layer == 1
    assert Policy.parse("yopo:drop=3").stages[3].depth is None
    for name in PRESETS:
        pol = Policy.parse(name)
        assert Policy.parse(pol.to_string()) == pol, name
        assert Policy.from_dict(pol.to_dict()) == pol, name
    with pytest.raises(PolicyError) as e:
        Policy.parse("fastv:layer=32,keep=0.5,depth=32")
    assert e.value.field == "stages[0].layer"
    with pytest.raises(PolicyError) as e:
        Policy.parse("uniform:site=pre_llm,keep=0.5,depth=32")
    assert e.value.field == "stages[0].depth"


def test_patch_resolves_and_describe_shows_it():
    model = tiny_llava("sdpa")
    with vtp.patch(model, "feather") as h:
        assert [s.layer for s in h.policy.stages] == [1, 2] and h.requested_policy == Policy.parse("feather")
        assert "feather:layer=1," in h.describe()
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(model, "feather:layer=8,keep=0.3")
    assert e.value.field == "stages[0].layer" and not vtp.patching.is_patched(model)


# -- rounding ---------------------------------------------------------------------------------------
def test_budget_rounding_modes_and_the_official_feather_count():
    half, floor, ceil = (vtp.policy.Budget(keep=0.3, rounding=r) for r in ("half_up", "floor", "ceil"))
    assert (half.count(576), floor.count(576), ceil.count(576)) == (173, 172, 173)
    assert (half.count(5), floor.count(5), ceil.count(5)) == (2, 1, 2)  # 1.5
    assert floor.count(2) == 1  # at least one token in every mode
    # FEATHER's released code: int(V * (1 - R)), then int(N1 * (1 - R) ** 2); the preset's keep=0.3 / 0.09 with
    # rounding=floor give the same count for every V below 5,000 (floating point included)
    a, b = Policy.parse("feather").stages
    for n in range(1, 5000):
        assert a.budget.count(n) == max(1, int(n * (1 - 0.7))), n
        assert b.budget.count(n, n) == max(1, int(n * (1 - 0.7) ** 2)), n
    with pytest.raises(PolicyError) as e:
        Policy.parse("fastv:layer=2,tokens=4,rounding=floor")
    assert e.value.field == "stages[0].rounding"
    with pytest.raises(PolicyError) as e:
        Policy.parse("fastv:layer=2,keep=0.5,rounding=up")
    assert e.value.field == "stages[0].rounding" and "half_up, floor, ceil" in str(e.value)
    assert Policy.parse("feather:rounding=half_up").stages[1].budget.rounding == "half_up"


def test_kept_count_follows_the_rounding():
    model = tiny_llava("sdpa")  # 36 visual tokens: 0.3 * 36 = 10.8
    inputs = make_batch(model, [[5, "img", 7]])
    for rounding, want in (("floor", 10), ("half_up", 11), ("ceil", 11)):
        with vtp.patch(model, f"fastv:layer=2,keep=0.3,rounding={rounding}") as h:
            model(**inputs)
            assert h.last_trace().stages[0].visual_after == [want]


# -- every preset on every model family ---------------------------------------------------------------
@functools.cache
def _family(kind: str):
    if kind == "llava":
        return tiny_llava("sdpa", vision_layers=6)
    if kind == "llava_next":
        return tiny_llava("sdpa", next=True, image_size=24, vision_layers=6)
    if kind == "qwen2_vl":
        return tiny_qwen("sdpa")
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm

    return load_tiny_vlm("sdpa")[0]


# refusals that are by design, not by depth: a vision-site stage needs a CLIP tower; a file (learned weights,
# calibration) belongs to the model it was made for; contiguous positions (repack) do not exist under M-RoPE
BY_DESIGN = ("config_hash", "stages[0].site", "stages[0].criterion", "weights", ".positions")


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_vl", "shipped"])
def test_every_preset_patches_every_family(kind):
    model = _family(kind)
    refused = {}
    for name in PRESETS:
        try:
            vtp.patch(model, name).unpatch()
        except IncompatiblePolicyError as e:
            assert any(k in e.field for k in BY_DESIGN), f"{name} on {kind}: {e}"  # never a layer out of range
            refused[name] = e.field
    if kind == "shipped":
        assert refused == {}  # the shipped tiny VLM runs every preset


@pytest.mark.parametrize("model_name", MODEL_CHOICES)
def test_explain_predicts_every_preset_for_every_profile_geometry(model_name, capsys):
    for name in PRESETS:
        assert main(["explain", name, "--model-config", model_name]) == 0, (name, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "ratio    :" in out


def test_explain_shows_the_mapping(capsys):
    assert main(["explain", "pdrop", "--model-config", "qwen2-vl-7b"]) == 0
    out = capsys.readouterr().out
    assert "policy as written: fastv:layer=8,depth=32" in out and "\npolicy: fastv:layer=7," in out
    assert "28 layers" in out


def test_demo_runs_every_preset(capsys):
    """``vlm-tokenprune demo --policy P`` for every preset P (one question; timing: test_cli)."""
    for name in PRESETS:
        assert main(["demo", "--policy", name, "--n", "1", "--repeats", "0", "--batch-size", "1"]) == 0, \
            (name, capsys.readouterr().err)
        assert "accuracy: baseline" in capsys.readouterr().out


# -- a paper's name picks its family's setting ------------------------------------------------------------
@pytest.mark.parametrize("kind, preset", [("llava", "flowcut_vit"), ("llava_next", "flowcut_next"),
                                          ("qwen2_vl", "flowcut_qwen")])
def test_flowcut_by_its_papers_name_takes_the_family_setting(kind, preset):
    model = _family(kind)
    with vtp.patch(model, "flowcut") as h:
        assert h.policy == Policy.parse(preset)
    parsed = Policy.parse("flowcut")  # parsed before the model is known (the CLI): patch() still picks the family
    with vtp.patch(model, parsed) as h:
        assert h.policy == Policy.parse(preset)
    assert Policy.parse("flowcut:keep=0.3", family="qwen2_5_vl") == Policy.parse("flowcut_llm:keep=0.3")
    assert Policy.parse("flowcut") == Policy.parse("flowcut_vit")  # no model: the LLaVA-1.5 setting
    as_dict = Policy.parse({"stages": [{"preset": "flowcut"}]})  # a dict (a YAML / JSON file) too
    assert Policy.parse(as_dict, family="qwen2_vl") == Policy.parse("flowcut_qwen")


def test_every_method_named_in_the_readme_table_works_by_name():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Methods", 1)[1].split("\n\n", 2)[1]
    names = {n for line in table.splitlines() if line.startswith("| `")
             for n in re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])}
    assert {"fastv", "feather", "pdrop", "yopo"} <= names
    for name in sorted(names):
        assert name in vtp.PRESETS or name in vtp.CRITERIA, name
        if name not in ("efficientvla_layers", "finercut"):  # need a calibration file
            Policy.parse(name)
