"""lmms-eval plugin (``vlm_tokenprune.integrations.lmms_eval``) and its offline task, in process."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed; install it as README 'lmms-eval plugin' says "
           "(pip install lmms-eval==0.7.3 torch==2.13.0 torchvision==0.28.0 triton==3.9.0 'filelock<4' && pip uninstall -y torchvision)",
)

from vlm_tokenprune.errors import PolicyError  # noqa: E402
from vlm_tokenprune.eval import bench  # noqa: E402
from vlm_tokenprune.eval.synthetic import QTYPES, make_split  # noqa: E402
from vlm_tokenprune.integrations import lmms_eval as plugin  # noqa: E402

POLICY = "fastv:layer=2,keep=0.25"
N_DOCS = 16


@pytest.fixture(autouse=True)
def _data_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VTP_DATA_DIR", str(tmp_path_factory.getbasetemp() / "vtp_data"))
    torch.set_num_threads(1)


def test_entry_point_resolves_to_the_wrapper():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vlm_tokenprune"]
    assert eps, "entry point missing: reinstall the package (pip install -e .)"
    reg = ModelRegistryV2()
    reg.load_entrypoint_manifests()
    assert reg.get_model_class("vlm_tokenprune") is plugin.VLMTokenPrune
    assert get_model("vlm_tokenprune") is plugin.VLMTokenPrune  # lmms-eval's own registry, as --model resolves it


def test_policy_model_args():
    p = plugin.parse_policy_arg
    assert p() is None
    assert p("fastv:layer=2;keep=0.25").to_string() == POLICY
    assert p('"fastv:layer=2,keep=0.25"').to_string() == POLICY
    assert p('{"stages": [{"criterion": "fastv", "layer": 2, "keep": 0.25}]}').to_string() == POLICY
    with pytest.raises(PolicyError):
        p("fastv:keep=0")
    with pytest.raises(ValueError, match="policy"):
        p("fastv", "x.json")
    lm = plugin.VLMTokenPrune.create_from_arg_string("pretrained=tiny,policy=fastv:layer=2;keep=0.25", {"batch_size": 4})
    assert lm.handle.policy.to_string() == POLICY and lm.batch_size == 4
    lm.clean()
    assert lm.handle is None and not hasattr(lm, "_model")
    with pytest.raises(ValueError, match="model_args"):
        plugin.VLMTokenPrune(pretrained="tiny", banana=1)


def test_a_policy_split_on_commas_is_refused_with_the_fix_before_loading(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the model args were checked")

    monkeypatch.setattr(plugin, "load_vlm", no_load)
    for args, extra in (("pretrained=tiny,policy=fastv:layer=2,keep=0.25", "keep=0.25"),
                        ("pretrained=tiny,policy=fastv:layer=2,keep=0.25+ffn_cut:ratio=2", "keep=0.25+ffn_cut:ratio=2")):
        with pytest.raises(ValueError, match="model_args") as e:
            plugin.VLMTokenPrune.create_from_arg_string(args, {"batch_size": 2})
        msg = str(e.value)
        assert f"{extra} looks like the rest of a policy string" in msg
        assert f"policy=fastv:layer=2;{extra}" in msg and f'policy="fastv:layer=2,{extra}"' in msg and "policy_file" in msg
        # the quoted form the hint offers is what lmms-eval then passes through whole
        from lmms_eval.utils import simple_parse_args_string
        quoted = simple_parse_args_string(f'pretrained=tiny,policy="fastv:layer=2,{extra}"')
        assert set(quoted) == {"pretrained", "policy"}
        assert plugin.parse_policy_arg(quoted["policy"]) == plugin.parse_policy_arg(f"fastv:layer=2;{extra}")
    with pytest.raises(ValueError, match="model_args") as e:  # not policy-like: the plain refusal
        plugin.VLMTokenPrune(pretrained="tiny", banana=1)
    assert "policy string" not in str(e.value)


def test_run_tag_names_the_policy_safely():
    assert plugin.run_tag(None) == "unpruned"
    assert plugin.run_tag(plugin.parse_policy_arg(POLICY)) == "fastv-layer=2_keep=0.25"
    long = plugin.run_tag(plugin.parse_policy_arg("pdrop+ffn_cut:ratio=2+neighbor_attention:window=3"))
    assert len(long) <= 100 and "/" not in long and long.startswith("fastv-layer=")


def test_generate_until_on_hand_built_requests():
    ex = make_split("test", 5)
    lm = plugin.VLMTokenPrune(pretrained="tiny", policy=POLICY, batch_size=4)
    lm.task_dict = {"t": {"test": ex}}
    gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    reqs = [SimpleNamespace(args=(e["question"], dict(gen), lambda d: [d["image"]], i, "t", "test")) for i, e in enumerate(ex)]
    out = lm.generate_until(reqs)
    ref = bench.evaluate_policy(lm.model, lm.processor, ex, None, batch_size=1)["predictions"]  # lm's model is patched
    assert out == ref
    # until cuts the text; loglikelihood agrees with greedy decoding
    cut = lm.generate_until([SimpleNamespace(args=(ex[1]["question"], dict(gen, until=[ref[1].split()[-1]]),
                                                   lambda d: [d["image"]], 1, "t", "test"))])
    assert cut == [ref[1].rsplit(" ", 1)[0] if " " in ref[1] else ""]
    ll = lm.loglikelihood([SimpleNamespace(args=(ex[0]["question"], " " + ref[0], lambda d: [d["image"]], 0, "t", "test"))])
    assert ll[0][1] is True and ll[0][0] < 0
    lm.clean()


def test_simple_evaluate_scores_equal_the_offline_benchmark_and_record_the_pruning(tmp_path):
    import json

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    tasks = TaskManager(include_path=plugin.TASKS_DIR, include_defaults=False)  # skip indexing ~3000 built-in YAMLs

    def run(policy):  # a fresh wrapper each time: simple_evaluate calls lm.clean(), which drops the model
        args = "pretrained=tiny" + (f",policy={policy.replace(',', ';')}" if policy else "")
        tracker = EvaluationTracker(output_path=str(tmp_path / "out"))
        if policy:  # as `python -m lmms_eval --model vlm_tokenprune --model_args ...` runs it
            out = simple_evaluate(model="vlm_tokenprune", model_args=args, batch_size=8, tasks=["vtp_synthetic_vqa"],
                                  limit=N_DOCS, log_samples=True, bootstrap_iters=0, task_manager=tasks,
                                  evaluation_tracker=tracker, datetime_str="run1")
        else:  # a wrapper object, as in a notebook
            lm = plugin.VLMTokenPrune.create_from_arg_string(args, {"batch_size": 8})
            out = simple_evaluate(model=lm, model_args=args, tasks=["vtp_synthetic_vqa"], limit=N_DOCS, log_samples=True,
                                  bootstrap_iters=0, task_manager=tasks, evaluation_tracker=tracker, datetime_str="run0")
            assert not hasattr(lm, "_model") and lm.handle is None  # cleaned, and unpatched first
        samples = sorted(out["samples"]["vtp_synthetic_vqa"], key=lambda s: s["doc_id"])
        tracker.save_results_aggregated(results=dict(out, samples=None), samples=None, datetime_str=out["date"])
        return out["results"]["vtp_synthetic_vqa"], [s["filtered_resps"][0] for s in samples], samples, out

    examples = make_split("test", N_DOCS)
    offline = bench.run_bench([POLICY], n=N_DOCS, batch_size=8, timing_iters=0, progress=False)
    for policy, run_offline in ((POLICY, offline["runs"][1]), (None, offline["runs"][0])):
        scores, preds, samples, out = run(policy)
        assert [s["doc"]["question"] for s in samples] == [e["question"] for e in examples]
        # the results file sits in a folder named by the policy and records the kept tokens per stage
        (folder,) = (tmp_path / "out").glob("tiny__" + plugin.run_tag(plugin.parse_policy_arg(policy) if policy else None))
        (saved,) = folder.glob("*_results.json")
        saved = json.loads(saved.read_text())
        assert saved["model_name_sanitized"] == folder.name
        if policy:
            assert folder.name == "tiny__fastv-layer=2_keep=0.25"
            kept = saved["throughput"]["avg_vtp_stage0_fastv_kept_visual_tokens"]
            n_in = saved["throughput"]["avg_vtp_visual_tokens_in"]
            assert kept == pytest.approx(run_offline["kept_visual_per_stage"][0]) == pytest.approx(0.25 * n_in)
            assert n_in == 256  # the shipped model's 16 x 16 grid
            assert saved["throughput"]["total_gen_tokens"] > 0
        else:
            assert folder.name == "tiny__unpruned"
            assert not any(k.startswith("avg_vtp") for k in saved.get("throughput", {}))
        tmp_path.joinpath("out").rename(tmp_path / f"out_{policy is not None}")
        assert preds == run_offline["predictions"]
        acc = run_offline["accuracy"]
        assert scores["exact_match,none"] == pytest.approx(acc["all"])
        for q in QTYPES:
            assert scores[f"{q}_accuracy,none"] == pytest.approx(acc[q]), q
