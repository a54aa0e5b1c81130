"""Policy parsing, presets, round trips, registry strictness and field-named errors."""
from __future__ import annotations

import json
import math

import pytest

from kit import assert_policy_refused
import vlm_tokenprune as vtp
from vlm_tokenprune import Policy, PolicyError, UnknownNameError
from vlm_tokenprune.registry import Registry


def test_preset_carries_paper_defaults():
    (st,) = Policy.parse("fastv").stages
    assert (st.criterion, st.layer, st.budget.keep, st.site, st.op) == ("fastv", 2, 0.5, "llm", "prune")
    assert vtp.PRESETS.get("fastv").arxiv == "2403.06764"


def test_string_grammar_multi_stage_and_overrides():
    p = Policy.parse("fastv:layer=2,keep=0.5+fastv:layer=16,keep=0.25+uniform:layer=20,tokens=8")
    assert [(s.criterion, s.layer) for s in p.stages] == [("fastv", 2), ("fastv", 16), ("uniform", 20)]
    assert p.stages[2].budget.tokens == 8 and p.stages[2].budget.keep is None
    assert Policy.parse("random:seed=7,keep=0.1").stages[0].params["seed"] == 7


@pytest.mark.parametrize(
    "spec",
    ["fastv", "fastv:layer=3,keep=0.25", "fastv:layer=2,keep=0.5+fastv:layer=3,keep=0.25", "random:seed=3,tokens=5"],
)
def test_round_trips(spec, tmp_path):
    p = Policy.parse(spec)
    assert Policy.from_dict(p.to_dict()) == p
    assert Policy.parse(p.to_string()) == p
    assert Policy.from_json(p.to_json()) == p
    yaml = pytest.importorskip("yaml")
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(p.to_dict()))
    assert Policy.from_yaml(str(f)) == p
    j = tmp_path / "p.json"
    j.write_text(json.dumps(p.to_dict()))
    assert Policy.from_file(str(j)) == p


def test_dict_preset_form():
    p = Policy.from_dict({"stages": [{"preset": "fastv", "keep": 0.25}, {"criterion": "uniform", "layer": 3, "tokens": 4}]})
    assert p.stages[0].budget.keep == 0.25 and p.stages[1].budget.tokens == 4


@pytest.mark.parametrize(
    "spec, field",
    [
        ("nosuch", "stages[0].method"),
        ("fastv:bogus=1", "stages[0].bogus"),
        ("fastv:keep=0", "stages[0].keep"),
        ("fastv:keep=1.5", "stages[0].keep"),
        ("fastv:keep=-0.1", "stages[0].keep"),
        ("fastv:keep=nan", "stages[0].keep"),
        ("fastv:tokens=0", "stages[0].tokens"),
        ("fastv:tokens=2.5", "stages[0].tokens"),
        ("fastv:layer=0", "stages[0].layer"),
        ("fastv:layer=-1", "stages[0].layer"),
        ("fastv:layer=two", "stages[0].layer"),
        ("fastv:site=vision", "stages[0].site"),
        ("fastv:op=merge", "stages[0].op"),
        ("random:seed=x", "stages[0].seed"),
        ("fastv:layer=3+fastv:layer=2", "stages[1].layer"),
        ("fastv:layer=2,keep=0.25+fastv:layer=3,keep=0.5", "stages[1].keep"),
        ("fastv:layer", "stages[0]"),
        ("", "policy"),
    ],
)
def test_bad_policies_name_the_field(spec, field):
    assert_policy_refused(spec, field)


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        Policy.parse("fastvv")
    for name in ("fastv", "random", "uniform"):
        assert name in str(e.value)


def test_bad_dicts():
    with pytest.raises(PolicyError, match="stages"):
        Policy.from_dict({"stage": []})
    with pytest.raises(PolicyError, match="budget"):
        Policy.from_dict({"stages": [{"criterion": "fastv", "layer": 2, "budget": {"ratio": 0.5}}]})
    with pytest.raises(PolicyError, match="exactly one"):
        Policy.from_dict({"stages": [{"criterion": "fastv", "layer": 2, "keep": 0.5, "tokens": 3}]})
    with pytest.raises(PolicyError, match="invalid JSON"):
        Policy.from_json("{not json")


def test_budget_count_rounding():
    b = vtp.Budget(keep=0.25)
    assert [b.count(n) for n in (576, 36, 3, 1, 0)] == [144, 9, 1, 1, 0]
    assert vtp.Budget(keep=0.5).count(5) == 3  # half rounds up
    assert vtp.Budget(tokens=7).count(100) == 7
    assert math.isclose(vtp.Budget(keep=1).keep, 1)


def test_registry_is_strict():
    r = Registry("thing")
    r.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        r.register("a", 2)
    with pytest.raises(ValueError, match="lowercase"):
        r.register("Bad", 3)
    with pytest.raises(UnknownNameError, match="allowed: a"):
        r.get("b")


def test_list_methods():
    assert {"fastv", "random", "uniform"} <= set(vtp.list_methods())


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = (
        "import transformers.masking_utils as mu, transformers.modeling_utils as m;"
        "from transformers import AttentionInterface;"
        "before=(dict(AttentionInterface._global_mapping), dict(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping));"
        "import torch; n=torch.get_num_threads(); import vlm_tokenprune;"
        "after=(dict(AttentionInterface._global_mapping), dict(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping));"
        "assert before==after; assert torch.get_num_threads()==n; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_budget_reference():
    p = Policy.parse("fastv:layer=2,keep=0.5+fastv:layer=3,keep=0.6,of=current")
    assert p.stages[1].budget.of == "current" and Policy.from_dict(p.to_dict()) == p
    assert p.stages[1].budget.count(100, 50) == 30
    with pytest.raises(PolicyError) as e:
        Policy.parse("fastv:tokens=3,of=current")
    assert e.value.field == "stages[0].of"
    with pytest.raises(PolicyError) as e:
        Policy.parse("fastv:keep=0.3,of=all")
    assert e.value.field == "stages[0].of"
