"""Prefill profiler (``vlm_tokenprune.eval.profiler``) and ``vlm-tokenprune profile`` on CPU."""
from __future__ import annotations

import json

import pytest
import torch

from vlm_tokenprune import patch
from vlm_tokenprune.cli import main
from vlm_tokenprune.eval import profiler
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, build_tiny_qwen2_vl

STAT_KEYS = {"median", "p25", "p75", "min", "max", "mean", "stdev", "n", "samples"}


def test_profile_cli_json_fields_on_cpu(capsys, tmp_path):
    out = tmp_path / "p.json"
    code = main(["profile", "--model", "tiny", "--policy", "fastv:layer=2,keep=0.25",
                 "--policy", "fastv:layer=1,keep=0.5+fastv:layer=2,keep=0.25", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "quotient" in printed and "fastv:layer=2,keep=0.25" in printed
    rep = json.loads(out.read_text())
    assert rep["protocol"]["iters"] == 20 and rep["protocol"]["timer"] == "perf_counter" and rep["protocol"]["interleaved"]
    assert "VmHWM" in rep["protocol"]["memory"] or "unavailable" in rep["protocol"]["memory"]
    assert rep["prompt"]["n_visual"] == 144 and rep["model"]["text_layers"] == 4
    assert {"version", "device", "torch", "transformers"} <= set(rep["environment"])
    assert len(rep["policies"]) == 2
    for r in rep["policies"]:
        for k in ("prefill_ms", "baseline_prefill_ms", "ttft_ms", "baseline_ttft_ms", "scoring_selection_ms"):
            assert STAT_KEYS <= set(r[k]), k
        assert r["prefill_ms"]["n"] == r["baseline_prefill_ms"]["n"] == 20 and r["ttft_ms"]["n"] == 20
        assert r["prefill_ms"]["min"] <= r["prefill_ms"]["median"] <= r["prefill_ms"]["max"]
        assert r["measured_ratio"] == pytest.approx(r["prefill_ms"]["median"] / r["baseline_prefill_ms"]["median"])
        assert r["quotient"] == pytest.approx(r["predicted_ratio"] / r["measured_ratio"])
        assert 0 < r["predicted_ratio"] < 1 and r["flops"] < r["baseline_flops"]
        assert len(r["tokens_per_layer"]) == 4 and r["tokens_per_layer"][0] > r["tokens_per_layer"][-1]
        assert r["overhead_pct_of_baseline"] > 0
        if r["peak_memory_bytes"] is not None:
            assert r["peak_memory_bytes"] >= 0 and r["baseline_peak_memory_bytes"] >= 0
    one, two = rep["policies"]
    assert one["kept_visual_per_stage"] == [[36]] and two["kept_visual_per_stage"] == [[72], [36]]
    assert two["tokens_per_layer"][1] < one["tokens_per_layer"][1]  # the 2-stage policy prunes from layer 1


def test_cpu_peak_memory_follows_allocations():
    if "unavailable" in profiler.memory_method(torch.device("cpu")):
        pytest.skip("needs Linux /proc/self/clear_refs")
    big, _ = profiler.peak_memory(lambda: torch.ones(16 * 2**20).sum(), "cpu")  # a 64 MiB temporary
    small, _ = profiler.peak_memory(lambda: torch.ones(2**16).sum(), "cpu")  # 256 KiB
    assert big >= 60 * 2**20 and small < 16 * 2**20


def test_summary_and_timer():
    s = profiler.summary([0.003, 0.001, 0.002, 0.004])
    assert s["median"] == pytest.approx(2.5) and s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(4.0)
    assert s["p25"] <= s["median"] <= s["p75"] and s["n"] == 4
    timer, name = profiler.make_timer(torch.device("cpu"))
    assert name == "perf_counter" and timer(lambda: None) >= 0


@pytest.mark.parametrize("name", list(profiler.KNOWN_GEOMETRIES))
def test_known_geometries_build_from_config(name):
    # on the meta device: the real 7B configs, no memory; --layers / --vision-layers shrink them
    m = profiler.build_geometry(name, layers=2, vision_layers=1, device="meta", dtype="bf16")
    g = profiler.KNOWN_GEOMETRIES[name]
    tc = m.config.text_config
    assert tc.num_hidden_layers == 2 and tc.hidden_size == g["text"]["hidden_size"] and m.dtype == torch.bfloat16
    assert len(m.model.language_model.layers) == 2
    vc = m.config.vision_config
    assert (vc.depth if name.startswith("qwen") else vc.num_hidden_layers) == 1
    with pytest.raises(ValueError, match="--layers"):
        profiler.build_geometry(name, layers=1, device="meta")


def test_random_inputs_use_the_checkpoints_own_placeholder_ids():
    torch.manual_seed(0)
    llava = build_tiny_llava(layers=3)
    llava.config.image_token_id = 100  # as in real checkpoints: not the tiny builders' id 3
    inp = profiler.random_inputs(llava, n_text=20, batch=2)
    assert inp["input_ids"].shape[0] == 2 and int((inp["input_ids"][0] == 100).sum()) == 36
    assert int((inp["input_ids"] == 3).sum()) == 0
    qwen = build_tiny_qwen2_vl(layers=3)
    q = profiler.random_inputs(qwen, n_text=20, grid=(2, 3))
    assert int((q["input_ids"] == qwen.config.image_token_id).sum()) == 6
    # a profile on an already built model (the API the CLI uses for geometries and local checkpoints)
    rep = profiler.profile(qwen, ["fastv:layer=2,keep=0.5"], inputs=q, iters=2, warmup=0, ttft=False)
    assert rep["prompt"]["n_visual"] == 6 and rep["policies"][0]["kept_visual_per_stage"] == [[3]]
    assert not any(getattr(h, "__vtp__", False) for h in qwen._forward_pre_hooks.values())  # unpatched afterwards
    patch(qwen, "fastv:layer=2,keep=0.5").unpatch()


def test_profile_cli_bad_input_exits_2(capsys):
    assert main(["profile", "--model", "no/such/dir", "--policy", "fastv"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["profile", "--model", "tiny", "--policy", "fastv:layer=9"]) == 2
    assert "stages[0].layer" in capsys.readouterr().err


def test_build_prompt_plain_format_and_chat_template():
    from vlm_tokenprune.eval.tiny_vlm import PROMPT, build_processor

    proc = build_processor()  # no chat template: the plain USER/ASSISTANT format of the tiny model and llava-hf 1.5
    assert profiler.build_prompt(proc, "how many circles ?") == PROMPT.format(question="how many circles ?")
    assert profiler.build_prompt(proc, "<image>\nhow many circles ?") == PROMPT.format(question="how many circles ?")
    assert profiler.build_prompt(proc, "q", 2).count("<image>") == 2
    tpl = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
           "[{{ c['text'] }}]{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} A:{% endif %}")
    assert profiler.build_prompt(proc, "q", 1, chat_template=tpl) == "<image>[q] A:"
    assert profiler.build_prompt(proc, "<image> q", 1, chat_template=tpl) == "[<image> q] A:"
