"""Newcomer UX of policies (issue 16): `methods` prints stages that parse back to the same policy and fits
100 columns, override errors say what can be overridden and name the key the user wrote, policy files are
accepted wherever a policy is, bad policies among several are reported together before any model is built."""
from __future__ import annotations

import json

import pytest

import vlm_tokenprune as vtp
from vlm_tokenprune import Policy, PolicyError
from vlm_tokenprune.cli import compact_stage, main


def _listed(out: str) -> dict[str, list[str]]:
    """preset name -> its stage lines from `methods`."""
    presets, name = {}, None
    for line in out.split("\nCriteria:")[0].splitlines():
        if line and not line.startswith(" ") and line.split()[0] in vtp.PRESETS:
            name = line.split()[0]
            presets[name] = []
        elif name and line.startswith(("    = ", "    + ")):
            presets[name].append(line[6:])
    return presets


def test_methods_stages_parse_back_and_fit_100_columns(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for line in out.splitlines():  # one stage string holding a file path stays on one line (copyable)
        assert len(line) <= 100 or "calibration=" in line or "weights=" in line, line
    listed = _listed(out)
    for name, stages in listed.items():
        try:
            want = Policy.parse(name)
        except PolicyError:
            assert stages == [], name
            continue
        assert Policy.parse("+".join(stages)) == want, name
        for st, text in zip(want.stages, stages):  # each stage alone too (FEATHER's second keeps stride=0)
            assert Policy.parse(text).stages == (st,), text
    assert "feather:layer=16,depth=32,keep=0.09,of=current,rounding=floor,stride=0" in listed["feather"]


def test_compact_stage_is_exact():
    for text in ("feather:layer=3,keep=0.2,stride=2,rope=true", "uniform:site=pre_llm,tokens=4",
                 "ffn_cut:ratio=4", "visual_drop:layer=3"):
        (st,) = Policy.parse(text).stages
        assert Policy.parse(compact_stage(st)).stages == (st,)


@pytest.mark.parametrize("spec, field, says", [
    ("feather:layer=2", "stages[0].keep", "give keep= or tokens= too"),
    ("pdrop:keep=0.3", "stages[0].keep", "allowed: rounding"),
    ("feather:foo=1", "stages[0].foo", "allowed: rope, rounding, softmax, stride"),
    ("aim:tau=0", "stages[0].tau", "> 0"),
    ("yopo:drop=0", "stages[0].drop", ">= 1"),
    ("yopo:window=4", "stages[0].window", "odd"),
    ("yopo_12:kept=2", "stages[0].kept", "(0, 1]"),
])
def test_override_errors_name_the_key_and_what_is_allowed(spec, field, says):
    with pytest.raises(PolicyError) as e:
        Policy.parse(spec)
    assert e.value.field == field and says in str(e.value)


def test_policy_files_everywhere(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - {criterion: fastv, layer: 2, keep: 0.25}\n")
    jpath = tmp_path / "p.json"
    jpath.write_text(json.dumps(Policy.parse("feather").to_dict()))
    assert Policy.parse(str(path)) == Policy.parse("fastv:layer=2,keep=0.25")
    assert Policy.parse(jpath) == Policy.parse("feather")  # os.PathLike too
    assert main(["explain", str(jpath), "--model-config", "tiny"]) == 0
    assert "feather:layer=1," in capsys.readouterr().out
    with pytest.raises(PolicyError, match="no such file"):
        Policy.parse(str(tmp_path / "missing.yaml"))
    assert Policy.parse("skip_layers:calibration=x.json,layers_kept=3").stages  # '=': a policy string, not a file


def test_bad_policies_reported_together_before_any_model(monkeypatch, capsys):
    import vlm_tokenprune.eval.tiny_vlm as tv

    monkeypatch.setattr(tv, "load_tiny_vlm", lambda *a, **k: pytest.fail("a model was built"))
    assert main(["bench", "--policy", "fastv", "--policy", "nope", "--policy", "fastv:keep=2", "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 policies are malformed" in err and "'nope'" in err and "fastv:keep=2" in err
    from vlm_tokenprune.eval import profiler

    monkeypatch.setattr(profiler, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    assert main(["profile", "--policy", "fastv", "--policy", "nope"]) == 2
    assert "1 of 2 policies are malformed" in capsys.readouterr().err


def test_one_policy_that_does_not_fit_is_skipped_and_the_run_goes_on(capsys):
    from vlm_tokenprune.eval.bench import markdown_table, run_bench

    res = run_bench(["fastv:layer=9,keep=0.5", "pdrop"], n=2, batch_size=2, timing_iters=0, progress=False)
    assert [r["label"] for r in res["runs"]] == ["baseline", "pdrop"]
    assert res["skipped"][0]["label"] == "fastv:layer=9,keep=0.5" and "beyond the model" in res["skipped"][0]["error"]
    assert res["runs"][1]["policy_string"].startswith("fastv:layer=1,")  # the resolved policy (4 layers)
    table = markdown_table(res)
    assert "n/a" in table and "skipped `fastv:layer=9,keep=0.5`" in table  # --timing-iters 0: n/a, not 1.000
