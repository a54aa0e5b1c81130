"""``benchmarks/gpu.py --dry-run``: the GPU check's whole code path on the CPU (tiny widths, the Triton
interpreter), so the command is known to work before a GPU is lent.

It runs as a subprocess from a neutral folder (as a user would run it; the script's own folder is on
``sys.path`` first there), and must finish every part: kernel parity, kernel timings, cached decode vs
the cache-free oracle, and every prefill row on the three geometries either measured or refused by the
library with its field (a policy that does not fit a model is a finding, not a crash).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def test_gpu_check_dry_run_completes(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself, before triton is imported
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_report.json").read_text())
    md = (out / "gpu_report.md").read_text()
    assert report["meta"]["dry_run"] and report["meta"]["triton_interpret"] == "1"
    assert report["problems"] == []
    parts = report["parts"]
    assert list(parts) == ["kernels", "timings", "decode", "prefill"]
    assert all(p["status"] == "ok" for p in parts.values()), {k: p.get("error") for k, p in parts.items()}
    kernels = parts["kernels"]["result"]
    assert kernels["interpreted"] and kernels["all_ok"] and kernels["n_cases"] >= 4
    assert {c["dtype"] for c in kernels["cases"]} == {"bf16", "fp16", "fp32"}
    assert {c["gqa"] for c in kernels["cases"]} == {1, 4, 8}
    assert {r["op"] for r in parts["timings"]["result"]["rows"]} >= {"selection step", "gather"}
    decode = parts["decode"]["result"]["rows"]
    assert {r["site"] for r in decode} == {"llm", "pre_llm", "vision"} and all(r["ok"] for r in decode)
    models = parts["prefill"]["result"]["models"]
    assert set(models) == {"llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b"}
    for name, m in models.items():
        labels = {r["label"] for r in m["rows"]}
        assert {"fastv", "feather", "pdrop"} <= labels, (name, m["errors"])
        assert all(e["kind"] == "refused" for e in m["errors"]), m["errors"]
        assert not m["skipped"]
    rows = models["llava-1.5-7b"]["rows"]
    assert {r["backend"] for r in rows if r["label"] == "fastv"} == {"torch", "triton"}
    assert any(r["attn"] == "eager" for r in rows)
    assert any("yopo" in r["label"] for r in rows)  # the structural preset, calibrated on the model
    assert parts["prefill"]["result"]["scaling"]
    goals = {g["goal"]: g["status"] for g in report["goals"]}
    assert len(goals) == 7 and set(goals.values()) == {"not judged (dry run)"}
    assert "DRY RUN" in md and "## Goals" in md
