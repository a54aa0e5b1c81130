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


# -- random: a fresh subset per row, reproducibly ------------------------------------------------------
def _kept_rel(model, inputs, policy, b=0):
    from kit import patched_prefill

    _, tr = patched_prefill(model, inputs, policy)
    first = int((inputs["input_ids"][b] == model.config.image_token_id).nonzero()[0])
    return [p - first for p in tr.stages[0].kept_positions[b]]


@pytest.mark.parametrize("site", ["layer=2", "site=pre_llm"])
def test_random_draws_per_row_reproducibly_and_batch_independently(site):
    from kit import row_alone, tiny_llava
    from vlm_tokenprune.eval.tiny_models import make_batch

    model = tiny_llava("sdpa")
    rows = [[5, "img", 7], [3, "img", 4], [6, "img", 2]]
    batch = make_batch(model, rows, seed=3, padding="left")
    pol = f"random:{site},keep=0.25"
    in_batch = [_kept_rel(model, batch, pol, b) for b in range(3)]
    alone = [_kept_rel(model, row_alone(batch, rows, b), pol) for b in range(3)]
    assert in_batch == alone  # the same subset in any batch
    assert len({tuple(k) for k in in_batch}) == 3  # different inputs, different subsets
    assert [_kept_rel(model, batch, pol, b) for b in range(3)] == in_batch  # reproducible
    assert _kept_rel(model, batch, pol + ",seed=1", 0) != in_batch[0]
    fixed = [_kept_rel(model, row_alone(batch, rows, b), pol + ",draw=fixed") for b in range(3)]
    assert fixed[0] == fixed[1] == fixed[2]  # the old behaviour: one subset per seed
    with pytest.raises(PolicyError) as e:
        Policy.parse("random:draw=sometimes")
    assert e.value.field == "stages[0].draw"


# -- last_trace("prefill"), a custom criterion by name, CONTRIBUTING's field names --------------------------
def test_last_trace_prefill_after_generate():
    from kit import tiny_llava
    from vlm_tokenprune.eval.tiny_models import make_batch

    model = tiny_llava("sdpa")
    inputs = make_batch(model, [[5, "img", 7]])
    with vtp.patch(model, "fastv:layer=2,keep=0.25") as h:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert h.last_trace().phase == "decode" and h.last_trace("decode").phase == "decode"
        pre = h.last_trace("prefill")
        assert pre.phase == "prefill" and pre.stages[0].visual_after == [9]
        with pytest.raises(vtp.VTPError) as e:
            h.last_trace("warmup")
        assert e.value.field == "phase"
        model(**inputs)
        assert h.last_trace("decode") is None and h.last_trace("prefill").phase == "prefill"


def test_a_registered_criterion_is_usable_by_name():
    import torch

    from vlm_tokenprune.methods.base import Criterion, register_criterion
    from vlm_tokenprune.registry import CRITERIA

    class LastTokens(Criterion):
        name = "test_last_tokens"
        paper = "test: keep the last visual tokens"

        def score(self, ctx):
            return ctx.orig_pos.float()

    register_criterion(LastTokens)
    try:
        from kit import tiny_llava
        from vlm_tokenprune.eval.tiny_models import make_batch

        pol = Policy.parse("test_last_tokens:layer=2,keep=0.25")
        assert pol.stages[0].criterion == "test_last_tokens" and Policy.parse(pol.to_string()) == pol
        model = tiny_llava("sdpa")
        assert _kept_rel(model, make_batch(model, [[5, "img", 7]]), pol) == list(range(27, 36))
        assert torch.is_tensor(torch.zeros(1))
    finally:
        CRITERIA._items.pop("test_last_tokens", None)
    with pytest.raises(vtp.PolicyError) as e:
        Policy.parse("test_last_tokens:layer=2,keep=0.25")
    assert "fastv" in str(e.value) and "skip_layers" in str(e.value)  # presets, criteria and ops are listed


def test_contributing_names_real_scoring_context_fields():
    import dataclasses
    import re
    from pathlib import Path

    from vlm_tokenprune.scoring import ScoringContext

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    names = set(re.findall(r"ctx\.([a-z_]+)", text))
    known = {f.name for f in dataclasses.fields(ScoringContext)} | {n for n in dir(ScoringContext) if not n.startswith("_")}
    assert "hidden" in names and names <= known, names - known


@pytest.mark.parametrize("name", ["atp", "covipal"])
def test_weights_of_another_model_say_how_to_train_them(name):
    from kit import tiny_llava

    with pytest.raises(vtp.IncompatiblePolicyError) as e:
        vtp.patch(tiny_llava("sdpa"), name)  # the shipped weights belong to the tiny VLM
    assert e.value.field.endswith("config_hash")
    assert f"vlm-tokenprune train {name}" in str(e.value) and f"vlm_tokenprune.train.{name}" in str(e.value)


# -- a per-call policy without a new handle ----------------------------------------------------------------
def test_handle_use_swaps_the_policy_for_a_block_and_validates_it():
    import torch

    from kit import tiny_llava
    from vlm_tokenprune.eval.tiny_models import make_batch

    model = tiny_llava("sdpa")
    inputs = make_batch(model, [[5, "img", 7]])
    with torch.no_grad():
        base = model(**inputs).logits
        with vtp.patch(model, "fastv:layer=1,keep=0.5") as h:
            own = model(**inputs).logits
            with h.use("uniform:layer=2,tokens=4") as same:
                assert same is h and h.policy == Policy.parse("uniform:layer=2,tokens=4")
                other = model(**inputs).logits
                assert h.last_trace().stages[0].visual_after == [4]
            with h.use("feather") as hh:
                assert [s.layer for s in hh.policy.stages] == [1, 2]  # resolved for this model, like patch()
            assert h.policy == Policy.parse("fastv:layer=1,keep=0.5") and h.active
            torch.testing.assert_close(model(**inputs).logits, own, atol=0, rtol=0)
            assert h.last_trace().stages[0].visual_after == [18]
            with pytest.raises(vtp.IncompatiblePolicyError) as e:  # validated like patch(): nothing changes
                with h.use("fastv:layer=9,keep=0.5"):
                    pass
            assert e.value.field == "stages[0].layer" and h.active
            torch.testing.assert_close(model(**inputs).logits, own, atol=0, rtol=0)
        assert not vtp.patching.is_patched(model)
        torch.testing.assert_close(model(**inputs).logits, base, atol=0, rtol=0)
    assert not torch.equal(other[:, -1], own[:, -1])


# -- CLI rough edges ------------------------------------------------------------------------------------------
def test_every_flag_has_help():
    import argparse

    from vlm_tokenprune.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"


def test_no_progress_silences_transformers_too(monkeypatch):
    from transformers.utils import logging as hf_logging

    import vlm_tokenprune.cli as cli

    seen = []
    monkeypatch.setattr(cli, "cmd_demo", lambda args: seen.append(hf_logging.is_progress_bar_enabled()) or 0)
    monkeypatch.setattr(cli, "check_args", lambda args: None)
    assert main(["demo", "--no-progress"]) == 0 and main(["demo"]) == 0
    assert seen == [False, True] and hf_logging.is_progress_bar_enabled()


def test_no_broken_pipe_traceback_under_head():
    import subprocess
    import sys

    out = subprocess.run(f"{sys.executable} -m vlm_tokenprune methods | head -1", shell=True, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.startswith("Presets") and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


def test_viz_numbers_stages_as_the_policy_and_draws_question_answer_legend(tmp_path):
    from vlm_tokenprune.eval.synthetic import make_split
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm
    from vlm_tokenprune.eval.visualize import kept_tokens, kept_tokens_figure

    model, processor = load_tiny_vlm()
    ex = make_split("test", 2)[1]
    _, panels = kept_tokens(model, processor, ex["image"], ex["question"], "ffn_cut+fastv:layer=1,keep=0.25")
    assert panels[0].title.startswith("stage 1: fastv")  # stage 0 is the structural ffn_cut
    plain = kept_tokens_figure(model, processor, image=ex["image"], question=ex["question"], policy="fastv:layer=1,keep=0.25",
                               out=tmp_path / "k.png")
    assert plain.size[1] == 28 + 288 + 8 + 2 * 16  # title, panel, margin, caption (Q / A), legend
    assert (tmp_path / "k.png").is_file()


def test_catalogue_rows_141_146_name_existing_tests():
    """docs/bad-inputs.md rows 141-146 (this issue) each name tests that exist (``file::test``, ``::test`` = same file)."""
    from kit.catalogue import assert_rows_name_existing_tests

    assert_rows_name_existing_tests(range(141, 147))


def test_inline_json_and_yaml_documents_parse_like_their_dict():
    """A JSON object or a YAML document given as text (the CLI's --policy, patch(model, text)) is read as that document,
    not as the short string syntax (which refused it with 'expected key=value')."""
    doc = {"stages": [{"criterion": "fastv", "layer": 2, "keep": 0.5}]}
    want = Policy.from_dict(doc)
    assert Policy.parse(json.dumps(doc)) == want
    assert Policy.parse("  stages: [{criterion: fastv, layer: 2, keep: 0.5}]") == want
    assert Policy.parse("stages:\n  - criterion: fastv\n    layer: 2\n    keep: 0.5\n") == want
    assert Policy.parse("stages:\n  - preset: fastv\n    keep: 0.25") == Policy.parse("fastv:keep=0.25")
    for bad, words in (('{"stages": [', "invalid JSON"), ('{"stages": 3}', "must be a list"),
                       ("stages:\n  - criterion: [", "invalid YAML")):
        with pytest.raises(PolicyError) as e:
            Policy.parse(bad)
        assert words in str(e.value), str(e.value)
