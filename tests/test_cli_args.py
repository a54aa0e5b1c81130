"""The CLI checks every argument before a model is loaded (issue 15): exit status 2, the message names the
flag, no traceback (docs/bad-inputs.md, CLI rows)."""
from __future__ import annotations

import os

import pytest

from vlm_tokenprune import cli


@pytest.fixture
def no_model(monkeypatch):
    """Any model / data load fails the test: the argument error must come first."""
    def boom(*a, **k):
        raise AssertionError("a model or data set was loaded before the arguments were checked")

    import vlm_tokenprune.eval.bench as bench
    import vlm_tokenprune.eval.profiler as profiler
    import vlm_tokenprune.eval.synthetic as synthetic
    import vlm_tokenprune.eval.tiny_vlm as tiny_vlm

    monkeypatch.setattr(tiny_vlm, "load_tiny_vlm", boom)
    monkeypatch.setattr(profiler, "profile", boom)
    monkeypatch.setattr(profiler, "load_vlm", boom)
    monkeypatch.setattr(bench, "run_bench", boom)
    monkeypatch.setattr(synthetic, "make_split", boom)
    monkeypatch.setattr(synthetic, "make_example", boom)


READONLY = os.path.join(os.path.abspath(__file__), "out")  # "inside" a file: cannot be written, even by root

CASES = [
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--n", "0"], "--n"),
    (["bench", "--policy", "fastv", "--batch-size", "0"], "--batch-size"),
    (["bench", "--policy", "fastv", "--threads", "-1"], "--threads"),
    (["bench", "--policy", "fastv", "--timing-iters", "-1"], "--timing-iters"),
    (["bench", "--policy", "fastv", "--out", READONLY], "--out"),
    (["bench", "--policy", "fastv", "--budgets", "half"], "--budgets"),
    (["bench", "--policy", "fastv:keep=2"], "stages[0].keep"),
    (["profile", "--batch", "0"], "--batch"),
    (["profile", "--iters", "0"], "--iters"),
    (["profile", "--device", "bogus"], "--device"),
    (["profile", "--device", "cuda:7"], "--device"),
    (["profile", "--dtype", "bogus"], "--dtype"),
    (["profile", "--attn", "bogus"], "--attn"),
    (["profile", "--layers", "0"], "--layers"),
    (["profile", "--model", "no/such/model"], "--model"),
    (["profile", "--json", READONLY + "/r.json"], "--json"),
    (["profile", "--policy", "fastv:layer=0"], "stages[0].layer"),
    (["viz", "--policy", "fastv", "--example", "-1"], "--example"),
    (["viz", "--policy", "fastv", "--example", str(10**12)], "--example"),
    (["viz", "--policy", "fastv", "--dtype", "bogus"], "--dtype"),
    (["viz", "--policy", "fastv", "--dtype", "bf16"], "--dtype"),
    (["viz", "--policy", "fastv", "--out", READONLY + "/k.png"], "--out"),
    (["viz", "--policy", "fastv", "--image", "no/such.png", "--question", "q"], "--image"),
    (["explain", "fastv", "--n-visual", "0"], "--n-visual"),
]


@pytest.mark.parametrize("argv,flag", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_arguments_exit_2_naming_the_flag_before_any_model(capsys, no_model, argv, flag):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert flag in err and "Traceback" not in err and out == ""


def test_good_arguments_pass_the_checks(tmp_path):
    """The checks accept what the commands accept (default values, existing folders, a new file's folder)."""
    parser = cli.build_parser()
    for argv in (["demo"], ["bench", "--policy", "fastv", "--out", str(tmp_path / "new" / "dir")],
                 ["profile", "--device", "cpu", "--dtype", "fp32", "--attn", "eager", "--json", str(tmp_path / "r.json")],
                 ["viz", "--policy", "fastv", "--example", "3", "--out", str(tmp_path / "k.png")],
                 ["explain", "fastv"]):
        cli.check_args(parser.parse_args(argv))
    assert not os.path.exists(tmp_path / "new")
