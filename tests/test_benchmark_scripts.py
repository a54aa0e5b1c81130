"""Every script in ``benchmarks/`` starts (``--help``, from a neutral folder) and no module of ours shadows a
package that transformers or torch import; every ``vlm-tokenprune`` command in README.md and
benchmarks/README.md parses with the CLI as written (flags and choices exist).

A script's own folder is first on ``sys.path``: a ``benchmarks/kernels.py`` once shadowed the
``kernels`` package that transformers 5.25 probes, and every script crashed before it started
(``ImportError: cannot import name 'CUDAProperties' from 'kernels'``).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))


def probed_packages() -> set[str]:
    """Top-level names transformers checks for (``_is_package_available("name")``) and may then import."""
    import transformers.utils.import_utils as iu

    names = re.findall(r'_is_package_available\(\s*"([\w.\-]+)"', inspect.getsource(iu))
    return {n.split(".")[0].replace("-", "_") for n in names}


def test_no_benchmark_module_shadows_an_importable_package():
    probed = probed_packages()
    assert {"torch", "accelerate"} <= probed  # the probe list was read
    for script in SCRIPTS:
        name = script.stem
        assert name not in probed, f"benchmarks/{script.name} shadows the package {name!r} that transformers probes"
        spec = importlib.util.find_spec(name)  # benchmarks/ is not on sys.path here
        assert spec is None, f"benchmarks/{script.name} shadows the installed module {name!r} ({spec.origin})"


def test_every_benchmark_script_starts(tmp_path):
    assert len(SCRIPTS) >= 8 and (BENCH / "gpu.py") in SCRIPTS
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {s.name: subprocess.Popen([sys.executable, str(s), "--help"], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in SCRIPTS}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "usage:" in out, f"{name} --help: rc {p.returncode}\n{out[-2000:]}{err[-3000:]}"
    assert not list(tmp_path.iterdir())  # --help writes nothing


def readme_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every ``vlm-tokenprune ...`` line in a fenced code block of the READMEs."""
    out = []
    for md in (ROOT / "README.md", BENCH / "README.md"):
        in_block, buf = False, ""
        for line in md.read_text().splitlines():
            if line.lstrip().startswith("```"):
                in_block, buf = not in_block, ""
                continue
            if not in_block:
                continue
            buf += line.rstrip().rstrip("\\") + " " if line.rstrip().endswith("\\") else line
            if line.rstrip().endswith("\\"):
                continue
            cmd = buf.split(" #")[0].strip()
            buf = ""
            if "vlm-tokenprune " not in cmd:
                continue
            lex = shlex.shlex(cmd, posix=True, punctuation_chars=";&|")
            lex.whitespace_split = True
            words, parts = [], []
            for tok in [*lex, ";"]:  # split at ;, &&, | (outside quotes)
                if set(tok) <= set(";&|"):
                    parts.append(words)
                    words = []
                else:
                    words.append(tok)
            for words in parts:
                while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
                    words = words[1:]
                if words[:1] == ["vlm-tokenprune"]:
                    out.append((str(md.relative_to(ROOT)), shlex.join(words)))
        # inline commands in table cells (benchmarks/README.md's list of commands)
        for cmd in re.findall(r"\| `(vlm-tokenprune [^`]+)`", md.read_text()):
            out.append((str(md.relative_to(ROOT)), cmd))
    return out


COMMANDS = readme_commands()


def test_readme_commands_were_found():
    subcommands = {shlex.split(c)[1] for _, c in COMMANDS}
    assert {"demo", "profile", "bench", "train"} <= subcommands, subcommands


@pytest.mark.parametrize("source,command", COMMANDS, ids=[c[:60] for _, c in COMMANDS])
def test_readme_command_parses(source, command):
    from vlm_tokenprune.cli import build_parser

    argv = shlex.split(command)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's error: an unknown flag or a value outside its choices
        pytest.fail(f"{source}: `{command}` does not parse (exit {e.code})")
