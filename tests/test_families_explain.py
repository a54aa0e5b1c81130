"""``explain`` geometries of the newer families (LLaVA-OneVision, InternVL 3, Qwen3-VL, Qwen3-VL-MoE) and the
mixture-of-experts FLOPs: routing is per token, so a pruned token's active experts never run."""
from __future__ import annotations

import json

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune.cli import main
from vlm_tokenprune.eval.flops import TextGeometry, policy_flops, trace_flops
from vlm_tokenprune.eval.tiny_families import build_tiny_qwen3_vl, tiny_internvl_config, tiny_qwen3_vl_config
from vlm_tokenprune.eval.tiny_models import make_qwen_batch

torch.set_num_threads(1)


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


@pytest.mark.parametrize("name,n_visual,layers", [
    ("llava-onevision-7b", 3699, 28), ("internvl3-2b", 1792, 28), ("internvl3-8b", 1792, 28),
    ("qwen3-vl-2b", 1024, 28), ("qwen3-vl-8b", 1024, 36), ("qwen3-vl-30b-a3b", 1024, 48),
])
def test_explain_knows_the_released_geometries(capsys, name, n_visual, layers):
    code, out = run(capsys, "explain", "fastv:layer=2,keep=0.25", "--model-config", name, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["n_visual"] == n_visual and len(data["tokens_per_layer"]) == layers
    assert data["tokens_per_layer"][-1] == 64 + round(0.25 * n_visual)


def test_moe_geometry_counts_the_active_experts():
    g = TextGeometry.of(tiny_qwen3_vl_config(moe=True))  # 2 of 4 experts, width 64 each
    assert (g.num_experts, g.experts_per_token, g.intermediate_size) == (4, 2, 128)
    dense = TextGeometry.of(tiny_qwen3_vl_config(moe=False))
    assert dense.experts_per_token is None and dense.intermediate_size == 128


def test_explain_shows_the_saved_expert_flops(capsys):
    code, out = run(capsys, "explain", "fastv:layer=2,keep=0.25", "--model-config", "qwen3-vl-30b-a3b")
    assert code == 0
    line = next(x for x in out.splitlines() if x.strip().startswith("experts"))
    assert "8 of 128 per token" in line
    per_token = 2 * 3 * 2048 * 8 * 768
    saved = per_token * ((64 + 1024) * 48 - ((64 + 1024) * 2 + (64 + 256) * 46))
    assert f"saved {saved / 1e12:.4g} TFLOPs" in line


def test_moe_prediction_matches_a_real_run():
    """The predicted tokens per layer (hence FLOPs) of a pruned MoE prefill == the trace of a real run."""
    model = build_tiny_qwen3_vl("sdpa", moe=True)
    inputs = make_qwen_batch(model, [[5, "img", 4]], image_grids=[(4, 4)])
    with vtp.patch(model, "fastv:layer=2,keep=0.25") as h, torch.no_grad():
        model(**inputs)
        trace = h.last_trace()
    n_text = inputs["input_ids"].shape[1] - 16
    want = policy_flops(model.config, "fastv:layer=2,keep=0.25", n_text, 16)
    got = trace_flops(model.config, trace, policy="fastv:layer=2,keep=0.25")
    assert got["tokens_per_layer"] == want["tokens_per_layer"] == [n_text + 16] * 2 + [n_text + 4] * 2
    assert got["flops"] == pytest.approx(want["flops"])


def test_config_json_of_a_tiled_family_asks_for_n_visual(capsys, tmp_path):
    path = tmp_path / "config.json"
    tiny_internvl_config().to_json_file(str(path))
    code = main(["explain", "fastv:layer=2,keep=0.5", "--model-config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "--n-visual" in err
    code, out = run(capsys, "explain", "fastv:layer=2,keep=0.5", "--model-config", str(path), "--n-visual", "48")
    assert code == 0 and "48 visual" in out


@pytest.mark.parametrize("build", ["onevision", "internvl", "qwen3_vl"])
def test_profiler_random_inputs_for_the_newer_families(build):
    """``profile``'s random prompts (one image, the checkpoint's own placeholder ids) run patched on each family."""
    from vlm_tokenprune.eval import profiler
    from vlm_tokenprune.eval.tiny_families import build_tiny_internvl, build_tiny_onevision

    model = {"onevision": lambda: build_tiny_onevision("sdpa"), "internvl": lambda: build_tiny_internvl("sdpa"),
             "qwen3_vl": lambda: build_tiny_qwen3_vl("sdpa")}[build]()
    inputs = profiler.random_inputs(model, n_text=12, batch=2, image_size=(20, 36), grid=(3, 4), tiles=3)
    n_vis = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert n_vis == {"onevision": 16 + 4 * 9, "internvl": 3 * 16, "qwen3_vl": 12}[build]
    with vtp.patch(model, "fastv:layer=2,keep=0.5") as h, torch.no_grad():
        model(**inputs)
    assert h.last_trace().stages[0].visual_after == [round(n_vis / 2)] * 2
