"""FLOPs of the vision tower + projector + LLM (issue 16): each part by hand on a tiny config, and a vision-site
stage lowering the tower part by what each encoder layer really saw."""
from __future__ import annotations

import pytest
import torch
from kit import tiny_llava

from vlm_tokenprune import patch
from vlm_tokenprune.eval.flops import VisionGeometry, policy_flops, prefill_flops, trace_flops
from vlm_tokenprune.eval.tiny_models import make_batch, tiny_qwen2_vl_config

torch.set_num_threads(1)

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 128}
# a CLIP tower: 2 layers of width 32 (MLP 64), 12 px images of 2 px patches -> 6x6 = 36 patches + CLS
CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "image_size": 12, "patch_size": 2, "num_channels": 3}
CONFIG = {"text_config": TEXT, "vision_config": CLIP, "vision_feature_layer": -2}


def _vit_layer(n: int, D: int = 32, M: int = 64) -> int:
    return 2 * (4 * n * D * D + 2 * n * n * D + 2 * n * D * M)


def test_each_part_by_hand():
    out = policy_flops(CONFIG, "fastv:layer=2,keep=0.25", n_text=13, n_visual=36)
    # tower: patch embedding (3*2*2 inputs per patch -> 32) + 2 layers of 37 tokens
    embed = 2 * 36 * 12 * 32                                   # 27_648
    layer = 2 * (4 * 37 * 32 * 32 + 2 * 37 * 37 * 32 + 2 * 37 * 32 * 64)
    assert layer == _vit_layer(37) == 2 * (151_552 + 87_616 + 151_552)
    assert out["vision_flops"] == out["vision_baseline_flops"] == embed + 2 * layer
    # projector: LLaVA's 2-layer MLP (32 -> 64 -> 64) on each of the 36 patches
    assert out["projector_flops"] == out["projector_baseline_flops"] == 2 * 36 * (32 * 64 + 64 * 64)
    # the LLM part is the language-model count as before, kept under llm_*
    llm, llm_base = prefill_flops(TEXT, [49, 49, 22, 22]), prefill_flops(TEXT, [49] * 4)
    assert (out["llm_flops"], out["llm_baseline_flops"]) == (llm, llm_base)
    assert out["llm_ratio"] == pytest.approx(llm / llm_base)
    # the headline figures are the total
    vis = embed + 2 * layer + 2 * 36 * (32 * 64 + 64 * 64)
    assert out["flops"] == llm + vis and out["baseline_flops"] == llm_base + vis
    assert out["ratio"] == pytest.approx((llm + vis) / (llm_base + vis))
    assert out["parts_counted"] == ["vision", "projector", "llm"]


def test_without_a_known_tower_only_the_llm_is_counted_and_said_so():
    out = policy_flops(TEXT, "fastv:layer=2,keep=0.25", 13, 36)
    assert out["vision_flops"] is None and out["projector_flops"] is None and out["parts_counted"] == ["llm"]
    assert out["ratio"] == out["llm_ratio"] and out["flops"] == out["llm_flops"]


def test_qwen2_vl_tower_and_merger_by_hand():
    cfg = tiny_qwen2_vl_config()
    vc = cfg.vision_config
    vg = VisionGeometry.of(cfg)
    D, merge = vc.embed_dim, vc.spatial_merge_size ** 2
    assert (vg.hidden_size, vg.intermediate_size, vg.num_hidden_layers, vg.merge) == (D, D * vc.mlp_ratio, vc.depth, merge)
    out = policy_flops(cfg, "fastv:layer=1,keep=0.5", n_text=10, n_visual=16)
    n = 16 * merge  # one image of 64 patches, full attention over the image
    embed = 2 * n * (vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2) * D
    assert out["vision_flops"] == embed + vc.depth * _vit_layer(n, D, D * vc.mlp_ratio)
    dm = D * merge  # the merger: an MLP (dm -> dm -> LLM width) on each merged group
    assert out["projector_flops"] == 2 * 16 * (dm * dm + dm * cfg.text_config.hidden_size)


def test_a_vision_site_stage_lowers_the_tower_part():
    torch.manual_seed(0)
    model = tiny_llava(vision_layers=6)  # feature layer 4
    batch = make_batch(model, [[5, "img", 7]])
    vc = model.config.vision_config
    full = (vc.image_size // vc.patch_size) ** 2 + 1
    with patch(model, "mctf:keep=0.25") as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        trace = h.last_trace()
        pol = h.policy
    fl = trace_flops(model.config, trace, policy=pol)
    seen = trace.stages[0].vision_tokens_per_layer
    assert len(seen) == 6 and seen[0] == full and seen[-1] < full  # merged inside the tower
    vg = VisionGeometry.of(model.config)
    embed = 2 * (full - 1) * vg.patch_dim * vg.hidden_size
    assert fl["vision_flops"] == embed + sum(_vit_layer(n, vg.hidden_size, vg.intermediate_size) for n in seen)
    assert fl["vision_baseline_flops"] == embed + 6 * _vit_layer(full, vg.hidden_size, vg.intermediate_size)
    assert fl["vision_flops"] < fl["vision_baseline_flops"]
    assert fl["projector_flops"] == pytest.approx(fl["projector_baseline_flops"] * 9 / 36)  # 9 of 36 patches
    # an LLM-site stage leaves the tower and projector whole
    with patch(model, "fastv:layer=1,keep=0.25") as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        other = trace_flops(model.config, h.last_trace())
    assert other["vision_flops"] == other["vision_baseline_flops"] == fl["vision_baseline_flops"]
    assert other["projector_flops"] == other["projector_baseline_flops"]
    assert other["ratio"] > other["llm_ratio"]  # the untouched tower dilutes the saving


def test_feature_layer_stages_keep_the_tower_up_to_the_feature_layer():
    model = tiny_llava(vision_layers=6)
    batch = make_batch(model, [[5, "img", 7]])
    with patch(model, "visionzip") as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        trace = h.last_trace()
    seen = trace.stages[0].vision_tokens_per_layer
    full = seen[0]
    assert seen[:5] == [full] * 5  # layers 0..4 (the feature layer) run on every token
    fl = trace_flops(model.config, trace)
    assert fl["llm_ratio"] < fl["ratio"] < 1
