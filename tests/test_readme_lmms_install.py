"""README's lmms-eval install lines install what CI's main job installs (.ci/run), keeping CPU torch 2.13 (issue 16)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requirements(lines: list[str]) -> set[str]:
    """Every requirement the `pip install` commands in ``lines`` name (flags and `-e .` left out)."""
    reqs: set[str] = set()
    for line in lines:
        for cmd in re.split(r"&&", line.split("#")[0]):
            words = shlex.split(cmd)
            if words[:2] == ["pip", "install"]:
                reqs |= {w for w in words[2:] if not w.startswith("-") and w != "."}
    return reqs


def test_readme_lmms_eval_install_matches_ci_pins():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("Install traps (CPU-only torch)", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.strip()]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    main_env = ci.split("main_env() {", 1)[1].split("\n}", 1)[0]
    ci_lines = [ln.strip() for ln in main_env.splitlines() if ln.strip().startswith("pip ")]
    assert _requirements(lines) == _requirements(ci_lines)
    assert "torch==2.13.0" in _requirements(lines)  # the lmms-eval line pins CPU torch
    # both drop PyPI's CUDA-linked torchvision right after, and README installs the package without its [eval] deps
    assert any("pip uninstall -y torchvision" in ln for ln in lines) and any("pip uninstall -y torchvision" in ln for ln in ci_lines)
    assert any("pip install --no-deps -e ." in ln for ln in lines)
