"""The ``vlm-tokenprune`` CLI, called in-process through ``main([...])``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlm_tokenprune.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_methods_lists_presets_and_criteria(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for name in ("fastv", "random", "uniform"):
        assert f"\n{name}  [" in out or f"\n{name}\n" in out
    assert "2403.06764" in out and "fastv:layer=2,keep=0.5" in out
    assert "seed=0" in out  # criterion parameters with their defaults


def test_explain_prints_stages_tokens_and_ratio(capsys):
    code, out, _ = run(capsys, "explain", "fastv:layer=2,keep=0.5")
    assert code == 0
    assert "stage 0: fastv:layer=2,keep=0.5" in out
    assert "layers 0-1" in out and ": 640" in out and ": 352" in out
    assert "LLM      : 4.867 TFLOPs of 8.504 TFLOPs (ratio 0.5723)" in out  # 57.2 % on LLaVA-1.5-7B's LLM (exact count)
    # the headline is the total: CLIP ViT-L/14-336 (0.38 TFLOPs) and the projector run whole under an LLM stage
    assert "ratio    : 0.5918 of baseline" in out and "vision   : 0.3819 TFLOPs of 0.3819 TFLOPs" in out


def test_explain_json_and_other_geometries(capsys):
    code, out, _ = run(capsys, "explain", "fastv:layer=2,keep=0.25", "--model-config", "llava-next-7b", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["n_visual"] == 2880 and data["tokens_per_layer"][-1] == 64 + 720
    assert data["policy"]["stages"][0]["budget"] == {"keep": 0.25}
    code, out, _ = run(capsys, "explain", "uniform:layer=3,tokens=10", "--model-config", "tiny", "--n-text", "8")
    assert code == 0 and "layers 0-2: 264" in out and "layer  3  : 18" in out  # the shipped tiny VLM: 4 layers, 256 visual


def test_explain_reads_a_config_json(capsys, tmp_path):
    from vlm_tokenprune.eval.tiny_models import tiny_llava_config

    path = tmp_path / "config.json"
    tiny_llava_config().to_json_file(str(path))  # 4 layers, 48px / patch 8 -> 36 visual tokens
    code, out, _ = run(capsys, "explain", "fastv:layer=2,keep=0.5", "--model-config", str(path), "--n-text", "10")
    assert code == 0
    assert "10 text + 36 visual" in out and "layers 2-3: 28" in out


@pytest.mark.parametrize(
    "argv, field",
    [
        (["explain", "fastv:layer=2,keep=1.5"], "stages[0].keep"),
        (["explain", "fastv:layer=2,banana=1"], "stages[0].banana"),
        (["explain", "nosuchmethod"], "stages[0].method"),
        (["explain", "fastv:layer=32"], "stages[0].layer"),  # beyond Vicuna-7B's 32 layers
        (["explain", "fastv", "--model-config", "no/such/config.json"], "--model-config"),
        (["demo", "--policy", "fastv:keep=0"], "stages[0].keep"),
    ],
)
def test_bad_input_exits_2_and_names_the_field(capsys, argv, field):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert field in err and out == ""


def test_usage_errors_return_2(capsys):
    assert main(["explain"]) == 2
    assert main([]) == 2
    assert main(["--version"]) == 0
    capsys.readouterr()


def test_demo_runs_the_shipped_tiny_vlm(capsys):
    code, out, _ = run(capsys, "demo", "--n", "5", "--repeats", "2")
    assert code == 0
    assert "shipped trained tiny LLaVA" in out and "policy: fastv:layer=2,keep=0.25" in out
    assert "what digit is written ?" in out  # the bundled questions (synthetic test split) are printed
    assert "accuracy: baseline" in out and ", pruned " in out
    layers = out.split("tokens per decoder layer")[1].split("\n\n")[0].splitlines()[3:]
    rows = [line.split() for line in layers]
    base = int(rows[0][1])
    assert [int(r[1]) for r in rows] == [base] * 4  # 4 layers; question 0: text + 256 visual tokens
    assert [int(r[2]) for r in rows] == [base] * 2 + [base - 256 + 64] * 2  # 64 of 256 kept from layer 2
    assert "theoretical prefill FLOPs ratio: 0." in out and "latency" in out and "ratio" in out


def test_python_dash_m_entry_point():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vlm_tokenprune", "methods"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fastv" in proc.stdout
