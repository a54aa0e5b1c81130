"""``bench`` on profile's random-weight geometries (issue 16): tokens, FLOPs and timing, accuracy n/a."""
from __future__ import annotations

import json

import pytest
import torch

from vlm_tokenprune.errors import PolicyError
from vlm_tokenprune.eval import bench_geometry, profiler


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_a_tiny_geometry_gives_tokens_flops_and_timing_but_no_accuracy(tmp_path, capsys):
    res = bench_geometry.run_bench_geometry(
        "llava-small", ["fastv:layer=1", "fastv:layer=5"], [0.25, 0.5], layers=2, vision_layers=1, batch_size=2,
        n_text=8, timing_iters=1, out=tmp_path)
    n_visual = (224 // 14) ** 2
    base, *runs = res["runs"]
    assert base["policy"] is None and base["flops"]["ratio"] == 1.0 and base["tokens_per_layer"] == [n_visual + 8] * 2
    assert [r["budget"] for r in runs] == [0.25, 0.5]  # layer 5 does not fit 2 layers: skipped, the rest runs
    assert [s["budget"] for s in res["skipped"]] == [0.25, 0.5] and "fastv:layer=5" in capsys.readouterr().err
    for r, keep in zip(runs, (0.25, 0.5)):
        assert r["accuracy"] is None
        assert r["kept_visual_per_stage"] == [round(keep * n_visual)]
        assert r["tokens_per_layer"] == [n_visual + 8, round(keep * n_visual) + 8]
        assert 0 < r["flops"]["llm_ratio"] < 1 and 0 < r["flops"]["ratio"] < 1
        assert r["prefill"]["measured_ratio"] > 0 and r["prefill"]["iters"] == 1
    assert runs[0]["flops"]["llm_ratio"] < runs[1]["flops"]["llm_ratio"]
    assert res["accuracy"].startswith("n/a: random weights") and res["model"]["weights"] == "random"
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["runs"][1]["kept_visual_per_stage"] == runs[0]["kept_visual_per_stage"]
    md = (tmp_path / "bench.md").read_text()
    assert "accuracy: n/a: random weights" in md and "| `fastv:layer=1` | 0.25 | 64 | 264/72 |" in md


def test_bad_input_is_refused_before_the_geometry_is_built(monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr(profiler, "load_model", no_build)
    with pytest.raises(PolicyError):
        bench_geometry.run_bench_geometry("llava-small", ["fastv:keep=2", "uniform:keep=0"])
    with pytest.raises(ValueError, match="--model"):
        bench_geometry.run_bench_geometry("llava-huge", ["fastv"])
    with pytest.raises(ValueError, match="--budgets"):
        bench_geometry.run_bench_geometry("llava-small", ["fastv"], [1.5])


def test_cli_bench_takes_profiles_geometries(tmp_path, capsys):
    from vlm_tokenprune.cli import main

    rc = main(["bench", "--model", "llava-small", "--layers", "2", "--vision-layers", "1", "--n-text", "8",
               "--policy", "fastv:layer=1,keep=0.25", "--batch-size", "1", "--timing-iters", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "| `fastv:layer=1,keep=0.25` | - | 64 | 264/72 |" in out
    assert "accuracy: n/a: random weights" in out and (tmp_path / "bench.json").is_file()


@pytest.mark.parametrize("args, flag", [
    (["--model", "llava-huge"], "--model"),
    (["--model", "llava-small", "--layers", "7"], "--layers"),
    (["--model", "qwen2-vl-7b", "--vision-layers", "33"], "--vision-layers"),
    (["--layers", "2"], "--layers"),  # the shipped tiny model: no --layers
    (["--model", "tiny", "--vision-layers", "1"], "--vision-layers"),
    (["--model", "llava-small", "--n-text", "1"], "--n-text"),
])
def test_cli_bench_model_flags_refused_before_any_model(args, flag, tmp_path, capsys, monkeypatch):
    from vlm_tokenprune.cli import main
    from vlm_tokenprune.eval import bench

    def no_build(*a, **k):
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(profiler, "load_model", no_build)
    monkeypatch.setattr(bench, "run_bench", no_build)
    assert main(["bench", "--policy", "fastv:layer=1,keep=0.25", "--out", str(tmp_path / "o"), *args]) == 2
    assert flag in capsys.readouterr().err


def test_catalogue_rows_147_148_name_existing_tests():
    """docs/bad-inputs.md rows 147-148 (lmms-eval comma split, bench's model flags) name tests that exist."""
    from kit.catalogue import assert_rows_name_existing_tests

    assert_rows_name_existing_tests((147, 148))
