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
                 "--policy", "fastv:layer=1,keep=0.5+fastv:layer=2,keep=0.25", "--no-parts", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "quotient" in printed and "fastv:layer=2,keep=0.25" in printed
    rep = json.loads(out.read_text())
    assert rep["protocol"]["iters"] == 20 and rep["protocol"]["timer"] == "perf_counter" and rep["protocol"]["interleaved"]
    assert "VmHWM" in rep["protocol"]["memory"] or "unavailable" in rep["protocol"]["memory"]
    assert rep["prompt"]["n_visual"] == 256 and rep["model"]["text_layers"] == 4
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
        assert "parts" not in r  # --no-parts
    one, two = rep["policies"]
    assert one["kept_visual_per_stage"] == [[64]] and two["kept_visual_per_stage"] == [[128], [64]]
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


def test_profile_parts_json_fields_on_cpu(capsys, tmp_path):
    """One forward from pixels per call, split into vision tower (+ projector), language model and the rest."""
    out = tmp_path / "p.json"
    code = main(["profile", "--model", "tiny", "--policy", "aim_merge:keep=0.25+fastv:layer=2,keep=0.125",
                 "--iters", "3", "--warmup", "0", "--no-ttft", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "vision ms (ratio)" in printed and "llm ms (ratio)" in printed
    rep = json.loads(out.read_text())
    assert "vision" in rep["protocol"]["forward"]
    (r,) = rep["policies"]
    assert STAT_KEYS <= set(r["forward_ms"]) and r["forward_ms"]["n"] == r["baseline_forward_ms"]["n"] == 3
    assert r["forward_ratio"] == pytest.approx(r["forward_ms"]["median"] / r["baseline_forward_ms"]["median"])
    assert set(r["parts"]) == {"vision", "llm", "other"}
    for part in r["parts"].values():
        assert STAT_KEYS <= set(part["baseline_ms"]) and part["patched_ms"]["n"] == 3
        assert part["ratio"] == pytest.approx(part["patched_ms"]["median"] / part["baseline_ms"]["median"])
    for kind, total in (("baseline_ms", "baseline_forward_ms"), ("patched_ms", "forward_ms")):
        for i in range(3):  # the parts of each call add up to (at most) the whole call
            got = sum(p[kind]["samples"][i] for p in r["parts"].values())
            assert 0 < got <= r[total]["samples"][i] * (1 + 1e-9)
    assert r["kept_visual_per_stage"] == [[64], [32]]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_parts_attribute_time_to_the_right_modules(monkeypatch, family):
    """A fake clock advanced by 7 inside the vision encoder and by 11 inside a decoder layer: the parts read
    exactly 7 and 11 (nothing else advances it), patched with a pre-LLM reduction + an LLM stage too."""
    clock = [0.0]
    monkeypatch.setattr(profiler.time, "perf_counter", lambda: clock[0])
    if family == "llava":
        model = build_tiny_llava()
        from vlm_tokenprune.eval.tiny_models import make_batch

        inputs = make_batch(model, [[5, "img", 7]])
        encoder = model.model.vision_tower.encoder
        policy = "aim_merge:keep=0.25+fastv:layer=2,keep=0.125"
    else:
        model = build_tiny_qwen2_vl()
        inputs = profiler.random_inputs(model, n_text=20, grid=(2, 3))
        encoder = model.model.visual.blocks[0]
        policy = "aim_merge:keep=0.5,positions=gaps+fastv:layer=2,keep=0.25"
    encoder.register_forward_hook(lambda *a: clock.__setitem__(0, clock[0] + 7))
    model.model.language_model.layers[1].register_forward_hook(lambda *a: clock.__setitem__(0, clock[0] + 11))
    call = profiler.PartsCall(model, lambda: model(**inputs, logits_to_keep=1), "cpu")
    for pol in (None, policy):
        h = patch(model, pol) if pol is not None else None
        call.install()
        with torch.no_grad():
            call()
        call.remove()
        if h is not None:
            assert h.last_trace().stages[0].site == "pre_llm"
            h.unpatch()
        assert call.parts() == {"vision": 7.0, "llm": 11.0, "other": 0.0}
    assert not any(m._forward_pre_hooks for m in (model.model.language_model,))  # removed again


def test_vision_site_policy_is_profiled_on_its_own_tower_output():
    """A vision-site stage needs features from the patched tower: the LM-prefill call re-encodes them
    (outside the timer) for patched runs instead of reusing the unpatched features (which it refuses)."""
    model = build_tiny_llava(vision_layers=4)
    from vlm_tokenprune.eval.tiny_models import make_batch

    inputs = make_batch(model, [[5, "img", 7]])
    rep = profiler.profile(model, ["flowcut_vit:keep=0.25"], inputs=inputs, iters=1, warmup=0, ttft=False)
    (r,) = rep["policies"]
    assert r["kept_visual_per_stage"] == [[9]] and set(r["parts"]) == {"vision", "llm", "other"}
    assert not any(getattr(h, "__vtp__", False) for m in model.modules() for h in m._forward_pre_hooks.values())
