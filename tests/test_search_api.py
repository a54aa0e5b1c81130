"""``search_policy`` / ``vlm-tokenprune search`` on the shipped tiny VLM, kept small (1 calibration batch,
a few children): the result meets the FLOPs budget, is an ordinary policy file, and a resumed search
equals the straight one; bad budgets and spaces are refused by name."""
from __future__ import annotations

import json

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError
from vlm_tokenprune.eval.flops import structural_flops
from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm
from vlm_tokenprune.search.api import parse_budget, parse_constraint, parse_space, search_policy

SMALL = dict(calibration=8, batch_size=8, offspring=3, levels=8, progress=False)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_tiny_vlm()


def test_meets_budget_and_writes_an_ordinary_policy(tiny, tmp_path):
    model, processor = tiny
    res = search_policy(model, processor, "flops=0.4", space="tokens,sublayers", sublayers=1, generations=1, heldout=8,
                        heldout_top=1, out=tmp_path, trade=0.0, seed_presets=False, **SMALL)
    assert res.policy is not None and res.flops_ratio <= 0.4
    pol = vtp.Policy.from_file(str(tmp_path / "best.yaml"))
    assert pol == vtp.Policy.parse(res.policy) == vtp.Policy.parse((tmp_path / "best.txt").read_text().strip())
    assert sum(st.op == "skip_sublayers" for st in pol.stages) == 1  # the sublayer count is kept exactly
    n_text, n_visual = json.loads((tmp_path / "pareto.json").read_text())["n_text"], 256
    assert structural_flops(model.config, pol, n_text, n_visual)["ratio"] == pytest.approx(res.flops_ratio)
    with vtp.patch(model, str(tmp_path / "best.yaml")) as h:  # the result is an ordinary policy file
        assert h.policy == pol
    table = (tmp_path / "pareto.md").read_text()
    assert "| `baseline` | 1.000 |" in table and res.policy in table
    assert res.accuracy is not None


def test_resume_equals_straight_run(tiny, tmp_path):
    model, processor = tiny
    straight = search_policy(model, processor, "flops=0.3", generations=2, heldout=0, out=tmp_path / "a", **SMALL)
    search_policy(model, processor, "flops=0.3", generations=1, heldout=0, out=tmp_path / "b", **SMALL)
    resumed = search_policy(model, processor, "flops=0.3", generations=2, heldout=0, out=tmp_path / "b", resume=True, **SMALL)
    assert resumed.policy == straight.policy and resumed.fitness == straight.fitness
    a = json.loads((tmp_path / "a" / "pareto.json").read_text())
    b = json.loads((tmp_path / "b" / "pareto.json").read_text())
    assert a["history"] == b["history"]


@pytest.mark.parametrize("text,field", [("flops=1.5", "budget"), ("latency=0.3", "budget"), ("flops=x", "budget"),
                                        ("latency=0", "budget"), ("speed=0.5", "budget")])
def test_bad_budget(text, field):
    with pytest.raises(InputError) as e:
        parse_budget(text)
    assert e.value.field == field


def test_bad_criteria_and_trade(tiny):
    model, processor = tiny
    for kw, field in ((dict(criteria=("fastv", "nosuch")), "criteria"), (dict(trade=1.5), "trade")):
        with pytest.raises(InputError) as e:
            search_policy(model, processor, "flops=0.4", generations=0, heldout=0, **kw, **SMALL)
        assert e.value.field == field


BAD_COUNTS = [  # (argument, value, words of the message)
    ("generations", -1, ">= 0"), ("offspring", 0, ">= 1"), ("levels", 1, ">= 2"), ("sublayers", -1, ">= 0"),
    ("heads", -2, ">= 0"), ("heldout", -5, ">= 0"), ("heldout_top", -1, ">= 0"), ("batch_size", 0, ">= 1"),
    ("calibration", 0, ">= 1"), ("latency_iters", 0, ">= 1"), ("answer_tokens", 0, ">= 1"),
    ("generations", 2.5, "an integer"), ("offspring", True, "an integer"), ("seed", "0", "an integer"),
    ("trade", float("nan"), "finite"), ("trade", -0.1, "[0, 1]"), ("metric", "l2", "allowed: kl, js"),
]


@pytest.mark.parametrize("name,value,words", BAD_COUNTS)
def test_bad_counts_are_refused_by_name_before_the_model_runs(tiny, monkeypatch, name, value, words):
    """Every count of the search is checked by its own name before any forward (a negative held-out count used to
    run the whole search; a negative generation count or a level count below 2 raised an unnamed ValueError)."""
    model, processor = tiny
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("the model ran"))
    kw = {**SMALL, "generations": 0, "heldout": 0, name: value}
    with pytest.raises(InputError) as e:
        search_policy(model, processor, "flops=0.4", **kw)
    assert e.value.field == name and words in str(e.value), str(e.value)


@pytest.mark.parametrize("argv,flag,words", [
    (["--generations", "-1"], "--generations", ">= 0"), (["--offspring", "0"], "--offspring", ">= 1"),
    (["--levels", "0"], "--levels", ">= 2"), (["--heldout", "-5"], "--heldout", ">= 0"),
    (["--heldout-top", "-1"], "--heldout-top", ">= 0"), (["--sublayers", "-1"], "--sublayers", ">= 0"),
    (["--latency-iters", "0"], "--latency-iters", ">= 1"), (["--per-sample", "--samples", "0"], "--samples", ">= 1"),
    (["--per-sample", "--simulations", "0"], "--simulations", ">= 1"),
    (["--per-sample", "--length-penalty", "-1"], "--length-penalty", ">= 0"),
    (["--trade", "inf"], "--trade", "finite"),
])
def test_bad_count_flags_are_refused_before_any_model_loads(monkeypatch, capsys, tmp_path, argv, flag, words):
    import vlm_tokenprune.eval.tiny_vlm as tiny_vlm
    from vlm_tokenprune.cli import main

    monkeypatch.setattr(tiny_vlm, "load_tiny_vlm", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["search", "--out", str(tmp_path), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err and words in err, err


def test_latency_budget_is_measured_and_reused_on_resume(tiny, tmp_path, monkeypatch):
    """``latency=R``: every candidate's measured prefill latency ratio is within R; the measurements are kept in
    latency.json, and a resumed search measures nothing again (so it is the straight run)."""
    model, processor = tiny
    assert parse_constraint("latency=0.5") == ("latency", 0.5) and parse_constraint(0.3) == ("flops", 0.3)
    kw = dict(space="tokens", generations=1, heldout=0, trade=0.0, seed_presets=False, latency_iters=1, out=tmp_path,
              **{**SMALL, "levels": 4, "offspring": 2})
    res = search_policy(model, processor, "latency=0.95", **kw)
    lat = json.loads((tmp_path / "latency.json").read_text())["ratios"]
    assert res.latency_ratio is not None and res.latency_ratio <= 0.95 and lat[res.policy] == res.latency_ratio
    assert all(r["latency_ratio"] <= 0.95 for r in res.rows if r["policy"] is not None)
    assert json.loads((tmp_path / "pareto.json").read_text())["budget"] == {"latency": 0.95}

    def no_timing(*a, **k):
        raise AssertionError("a resumed search must reuse latency.json")

    monkeypatch.setattr("vlm_tokenprune.eval.timing.interleaved", no_timing)
    again = search_policy(model, processor, "latency=0.95", resume=True, **kw)
    assert again.policy == res.policy and again.fitness == res.fitness


def test_bad_space():
    with pytest.raises(InputError) as e:
        parse_space("tokens,layers")
    assert e.value.field == "space"
    assert parse_space("heads,tokens") == ("heads", "tokens")


def test_seeds_and_budget_trading_on_the_tiny_vlm(tiny, tmp_path):
    """Preset seeds (MCTF alone, FastV / DART at each layer, PDrop's schedule, scaled to the budget) are scored on
    every calibration batch and the result is never worse there; budget trading and the criterion unit stay under
    the FLOPs budget."""
    model, processor = tiny
    res = search_policy(model, processor, "flops=0.45", space="tokens,sublayers", sublayers=1, generations=1, heldout=0,
                        criteria=("fastv", "dart"), trade=1.0, out=tmp_path, **SMALL)
    fams = {r["family"] for r in res.seeds}
    assert {"mctf:layer=0 alone", "fastv at layer 1", "dart at layer 1", "pdrop schedule"} <= fams
    for r in res.seeds:
        assert r["flops_ratio"] <= 0.45 and r["fitness"] is not None
        assert res.fitness <= r["fitness"] + 1e-12  # one calibration batch: the seed's full score
    assert all(r["flops_ratio"] <= 0.45 + 1e-12 for r in res.rows if r["policy"] is not None)
    assert any("dart:" in (r["policy"] or "") for r in res.rows)  # the criterion unit is searched
    assert json.loads((tmp_path / "pareto.json").read_text())["seeds"] == res.seeds


def test_catalogue_row_names_these_tests():
    from kit.catalogue import assert_rows_name_existing_tests

    assert_rows_name_existing_tests((183,))
