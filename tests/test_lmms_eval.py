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


def test_simple_evaluate_scores_equal_the_offline_benchmark():
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tasks = TaskManager(include_path=plugin.TASKS_DIR, include_defaults=False)  # skip indexing ~3000 built-in YAMLs

    def run(policy):  # a fresh wrapper each time: simple_evaluate calls lm.clean(), which drops the model
        args = "pretrained=tiny" + (f",policy={policy.replace(',', ';')}" if policy else "")
        lm = plugin.VLMTokenPrune.create_from_arg_string(args, {"batch_size": 8})
        out = simple_evaluate(model=lm, tasks=["vtp_synthetic_vqa"], limit=N_DOCS, log_samples=True, bootstrap_iters=0,
                              task_manager=tasks)
        assert not hasattr(lm, "_model") and lm.handle is None  # cleaned, and unpatched first
        samples = sorted(out["samples"]["vtp_synthetic_vqa"], key=lambda s: s["doc_id"])
        return out["results"]["vtp_synthetic_vqa"], [s["filtered_resps"][0] for s in samples], samples

    examples = make_split("test", N_DOCS)
    offline = bench.run_bench([POLICY], n=N_DOCS, batch_size=8, timing_iters=0, progress=False)
    for policy, run_offline in ((POLICY, offline["runs"][1]), (None, offline["runs"][0])):
        scores, preds, samples = run(policy)
        assert [s["doc"]["question"] for s in samples] == [e["question"] for e in examples]
        assert preds == run_offline["predictions"]
        acc = run_offline["accuracy"]
        assert scores["exact_match,none"] == pytest.approx(acc["all"])
        for q in QTYPES:
            assert scores[f"{q}_accuracy,none"] == pytest.approx(acc[q]), q
