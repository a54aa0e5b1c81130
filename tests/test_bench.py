"""Offline benchmark (``vlm_tokenprune.eval.bench``) and the ``demo`` / ``bench`` CLI on the shipped tiny VLM."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from vlm_tokenprune import Policy
from vlm_tokenprune.cli import main
from vlm_tokenprune.errors import PolicyError
from vlm_tokenprune.eval import bench
from vlm_tokenprune.eval.synthetic import QTYPES, make_split
from vlm_tokenprune.eval.tiny_vlm import evaluate, load_tiny_vlm

TWO_STAGE = "fastv:layer=1,keep=0.5+fastv:layer=2,keep=0.25"


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_tiny_vlm()


# -- budgets -------------------------------------------------------------------------------------
def test_with_budget_single_and_multi_stage():
    assert bench.with_budget("fastv", 0.11).to_string() == "fastv:layer=2,keep=0.11"
    assert bench.with_budget("uniform:layer=3,tokens=10", 0.5).to_string() == "uniform:layer=3,keep=0.5"
    # multi-stage: the first stage keeps b, later keep-of-original stages scale with it (1 : 1/2 : 1/4 kept)
    pd = bench.with_budget("fastv:layer=1,keep=0.5+fastv:layer=2,keep=0.25+fastv:layer=3,keep=0.125", 0.2)
    assert [s.budget.keep for s in pd.stages] == pytest.approx([0.2, 0.1, 0.05])
    # of=current and tokens= stages are already relative / absolute: unchanged
    fe = bench.with_budget("feather:layer=1,keep=0.3+feather:layer=2,keep=0.09,of=current", 0.11)
    assert fe.stages[0].budget.keep == pytest.approx(0.11) and fe.stages[1].budget.to_dict() == {"keep": 0.09, "of": "current"}
    aim = bench.with_budget("aim:layer=2,keep=0.5+aim:layer=3,tokens=1", 0.25)
    assert aim.stages[0].budget.keep == 0.25 and aim.stages[1].budget.to_dict() == {"tokens": 1}
    with pytest.raises(PolicyError, match="budgets"):
        bench.with_budget("fastv:layer=1,tokens=40+fastv:layer=2,keep=0.1", 0.5)


# -- batch-size invariance -----------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fastv:layer=2,keep=0.25", "feather:layer=1,keep=0.3+feather:layer=2,keep=0.09,of=current"])
def test_batch_size_8_equals_batch_1(tiny, policy):
    model, processor = tiny
    ex = make_split("test", 16)
    b8 = bench.evaluate_policy(model, processor, ex, policy, batch_size=8)
    b1 = bench.evaluate_policy(model, processor, ex, policy, batch_size=1)
    assert len({t[0] for t in b8["tokens_per_example"]}) > 1  # prompts of different lengths: batch 8 is left-padded
    assert b8["predictions"] == b1["predictions"]
    assert b8["tokens_per_example"] == b1["tokens_per_example"]
    assert b8["kept_index_per_example"] == b1["kept_index_per_example"]  # the very same visual tokens per example
    assert b8["flops_ratio"] == pytest.approx(b1["flops_ratio"])
    # the kept-set comparison can fail: another criterion keeps other tokens
    other = bench.evaluate_policy(model, processor, ex[:8], "uniform:layer=2,keep=0.25", batch_size=8)
    assert other["kept_index_per_example"] != b8["kept_index_per_example"][:8]


def test_baseline_accuracy_is_tiny_vlm_evaluate(tiny):
    model, processor = tiny
    ex = make_split("test", 10)
    ours = bench.evaluate_policy(model, processor, ex, None, batch_size=8)
    assert bench.accuracy(ex, ours["predictions"]) == evaluate(model, processor, ex, batch_size=8)
    assert ours["flops_ratio"] == 1.0 and all(len(set(t)) == 1 for t in ours["tokens_per_example"])
    everything = bench.evaluate_policy(model, processor, ex, "fastv:layer=2,keep=1.0", batch_size=8)
    assert everything["kept_row_mean"] == [pytest.approx(0.5)]  # all 12 rows kept: mean row 0.5 of the grid
    assert everything["predictions"] == ours["predictions"]


# -- run_bench and its files ---------------------------------------------------------------------
def test_run_bench_json_schema_markdown_and_plot(tiny, tmp_path):
    pytest.importorskip("matplotlib", reason="the PNG plot needs matplotlib (pip install -e '.[test]' installs it)")
    model, processor = tiny
    res = bench.run_bench(["fastv", TWO_STAGE], [0.5, 0.25], n=10, batch_size=8, model=model, processor=processor,
                          timing_iters=1, progress=False, out=tmp_path)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data == json.loads(json.dumps(res))
    env = data["environment"]
    assert {"version", "git_commit", "device", "device_name", "torch", "transformers", "date"} <= set(env)
    assert data["data"]["n"] == 10 and len(data["data"]["examples"]) == 10 and data["batch_size"] == 8
    assert data["budgets"] == [0.5, 0.25] and "multi-stage" in data["budget_rule"]
    runs = data["runs"]
    assert [(r["label"], r["budget"]) for r in runs] == [("baseline", None), ("fastv", 0.5), ("fastv", 0.25),
                                                        (TWO_STAGE, 0.5), (TWO_STAGE, 0.25)]
    L = model.config.text_config.num_hidden_layers
    for r in runs:
        assert set(r["accuracy"]) == set(QTYPES) | {"all"}
        assert len(r["predictions"]) == 10 and len(r["tokens_per_layer"]) == L
        assert {"ratio", "per_example", "baseline_per_example", "scoring_per_example"} <= set(r["flops"])
        assert "measured_ratio" in r["prefill"]
    base, f50, f25, t50, t25 = runs
    assert base["policy"] is None and base["flops"]["ratio"] == 1.0 and base["prefill"]["measured_ratio"] == 1.0
    assert Policy.parse(f25["policy"]) == bench.with_budget("fastv", 0.25)
    assert Policy.parse(t25["policy"]).to_string() == "fastv:layer=1,keep=0.25+fastv:layer=2,keep=0.125"
    assert 1.0 > f50["flops"]["ratio"] > f25["flops"]["ratio"] and 1.0 > t50["flops"]["ratio"] > t25["flops"]["ratio"]
    assert f25["tokens_per_layer"][:2] == base["tokens_per_layer"][:2] and f25["tokens_per_layer"][2] < base["tokens_per_layer"][2]
    assert f25["kept_visual_per_stage"] == [64.0]  # 0.25 of 256, every example
    assert t25["kept_visual_per_stage"] == [64.0, 32.0] and len(t25["kept_row_mean"]) == 2
    assert all(0.0 <= x <= 1.0 for x in t25["kept_row_mean"])
    md = (tmp_path / "bench.md").read_text()
    assert md.count("\n| ") == len(runs) + 1 and "| baseline | - |" in md and "FLOPs ratio" in md
    from PIL import Image

    with Image.open(tmp_path / "bench.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_timed_prefill_of_a_vision_site_policy(tiny):
    """The timed LM prefill reuses precomputed image features; a vision-site policy needs its own patched
    tower's features (and kept slots), re-encoded outside the timer."""
    model, processor = tiny
    r = bench.run_bench(["flowcut_vit:keep=0.25"], None, n=8, model=model, processor=processor, timing_iters=1,
                        progress=False)
    run = r["runs"][1]
    assert run["prefill"]["iters"] == 1 and 0 < run["prefill"]["measured_ratio"] < 1
    assert run["kept_visual_per_stage"] == [64.0]


def test_plot_skipped_with_a_note_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = {"runs": [], "model": {}, "data": {"n": 0}}
    assert bench.plot(res, tmp_path / "x.png") is False
    assert "matplotlib is not installed" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


# -- CLI -----------------------------------------------------------------------------------------
def test_bench_cli_writes_files_and_rejects_bad_budgets(capsys, tmp_path):
    code = main(["bench", "--policy", "fastv", "--budgets", "0.25", "--n", "5", "--timing-iters", "1",
                 "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "| `fastv` | 0.25 |" in out
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.md").exists()
    assert main(["bench", "--policy", "fastv", "--budgets", "0.5,2", "--out", str(tmp_path)]) == 2
    assert "--budgets" in capsys.readouterr().err


def test_structural_only_policies_count_the_untouched_tower(tiny):
    """A policy of structural ops alone (no token stage in the trace) still counts the vision tower and projector
    in its total FLOPs ratio: total = (tower + projector + LLM) / (tower + projector + LLM baseline)."""
    from vlm_tokenprune.eval.flops import unpruned_flops

    model, processor = tiny
    r = bench.run_bench(["ffn_cut:ratio=2"], None, n=8, model=model, processor=processor, timing_iters=0,
                        progress=False)
    fl = r["runs"][1]["flops"]
    assert fl["llm_ratio"] < fl["ratio"] < 1.0
    whole = unpruned_flops(model.config, 11, 256)
    rest = whole["vision_flops"] + whole["projector_flops"]
    llm_base = fl["baseline_per_example"] - rest  # every example: 256 visual tokens, the same tower
    assert fl["ratio"] == pytest.approx((rest + fl["llm_ratio"] * llm_base) / (rest + llm_base))
