"""Vision-tower + projector FLOPs of the towers beyond CLIP / SigLIP / Qwen2-VL (issue 16): Qwen2.5-VL's windowed
tower, InternViT with CLS and pixel shuffle (InternVL), Qwen3-VL's tower with its DeepStack mergers. Each against
a hand count written here from the architecture (plain arithmetic on the released sizes), then on the tiny
transformers configs through a real forward's trace, and through ``explain``'s known models."""
from __future__ import annotations

import pytest
import torch

from vlm_tokenprune import patch
from vlm_tokenprune.eval.flops import VisionGeometry, policy_flops, prefill_flops, trace_flops, unpruned_flops

torch.set_num_threads(1)

QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064}


def vit_layer(n: int, pairs: int, D: int, M: int, mlp_matrices: int = 2) -> int:
    """Q, K, V, O (4 n D^2), q.k and attention x v over ``pairs`` query-key pairs (2 pairs D), the MLP; x2 (MACs)."""
    return 2 * (4 * n * D * D + 2 * pairs * D + mlp_matrices * n * D * M)


# -- Qwen2.5-VL-7B: 32 blocks of width 1280, SwiGLU MLP 3420, window attention except blocks 7, 15, 23, 31 -----------
QWEN25_VISION = {"model_type": "qwen2_5_vl_vision", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                 "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                 "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 3584}
QWEN25 = {"text_config": QWEN2_7B, "vision_config": QWEN25_VISION}


def test_qwen2_5_vl_windowed_tower_by_hand():
    # one 672 x 672 image: 48 x 48 patches of 14 px, merged 2 x 2 -> 24 x 24 = 576 LLM tokens. A window is 112 px
    # = 8 x 8 patches = 64 patches (4 x 4 merged tokens): 6 x 6 = 36 windows of 64 patches
    out = policy_flops(QWEN25, "fastv:layer=2,keep=0.25", n_text=40, n_visual=576)
    n, D, M = 2304, 1280, 3420
    window_pairs = 36 * 64 * 64          # 147_456 (vs 2304^2 = 5_308_416 with full attention)
    embed = 2 * n * (3 * 2 * 14 * 14) * D  # the Conv3d patch embedding: 1176 inputs per patch
    tower = embed + 28 * vit_layer(n, window_pairs, D, M, 3) + 4 * vit_layer(n, n * n, D, M, 3)
    assert out["vision_flops"] == out["vision_baseline_flops"] == tower
    # the merger: LN, then an MLP 4*1280 -> 4*1280 -> 3584 on each of the 576 merged groups
    assert out["projector_flops"] == 2 * 576 * (5120 * 5120 + 5120 * 3584)
    assert out["llm_flops"] == prefill_flops(QWEN2_7B, [616, 616] + [40 + 144] * 26)
    assert out["flops"] == out["llm_flops"] + tower + out["projector_flops"]
    assert out["parts_counted"] == ["vision", "projector", "llm"]


def test_qwen2_5_vl_partial_windows_by_hand():
    # 35 LLM tokens: the most square merged grid is 5 x 7 (10 x 14 patches). Windows of 4 x 4 merged tokens tile it
    # as rows 4 + 1 and columns 4 + 3: windows of 4x4, 4x3, 1x4, 1x3 merged tokens = 64, 48, 16, 12 patches
    out = unpruned_flops(QWEN25, n_text=10, n_visual=35)
    n, D, M = 140, 1280, 3420
    window_pairs = 64 * 64 + 48 * 48 + 16 * 16 + 12 * 12   # 6_800
    tower = 2 * n * 1176 * D + 28 * vit_layer(n, window_pairs, D, M, 3) + 4 * vit_layer(n, n * n, D, M, 3)
    assert out["vision_flops"] == tower
    assert out["projector_flops"] == 2 * 35 * (5120 * 5120 + 5120 * 3584)


def test_qwen2_5_vl_tiny_model_trace_by_hand():
    """A real forward of the tiny Qwen2.5-VL: 2 tower blocks (block 0 windowed, block 1 full), one image of 2 x 3
    merged tokens (4 x 6 patches of 4 px); windows of 2 x 2 merged tokens: 2x2 and 2x1 -> 16 and 8 patches."""
    from kit import tiny_qwen
    from vlm_tokenprune.eval.tiny_models import make_qwen_batch

    model = tiny_qwen("eager", "2.5")
    vc = model.config.vision_config
    assert (vc.depth, vc.hidden_size, vc.intermediate_size, vc.window_size, vc.fullatt_block_indexes) == (2, 32, 64, 16, [1])
    batch = make_qwen_batch(model, [[5, "img", 7]], image_grids=[(2, 3)])
    with patch(model, "fastv:layer=1,keep=0.5") as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        fl = trace_flops(model.config, h.last_trace())
    n, D, M = 24, 32, 64
    tower = 2 * n * (3 * 2 * 4 * 4) * D + vit_layer(n, 16 * 16 + 8 * 8, D, M, 3) + vit_layer(n, n * n, D, M, 3)
    assert fl["vision_flops"] == fl["vision_baseline_flops"] == tower
    assert fl["projector_flops"] == 2 * 6 * (128 * 128 + 128 * 64)
    assert fl["ratio"] > fl["llm_ratio"]  # the untouched tower dilutes the LLM saving


# -- InternVL3-8B: InternViT-300M (24 layers of 1024, MLP 4096) on 448 px tiles with CLS, 0.5 pixel shuffle ---------
INTERN_VISION = {"model_type": "internvl_vision", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                 "image_size": [448, 448], "patch_size": [14, 14]}
INTERNVL = {"text_config": QWEN2_7B, "vision_config": INTERN_VISION, "downsample_ratio": 0.5}


def test_internvit_with_cls_and_pixel_shuffle_by_hand():
    # 6 tiles + thumbnail = 7 tiles; a tile: 32 x 32 = 1024 patches + CLS = 1025 tokens in every layer; CLS dropped,
    # the 0.5 pixel shuffle folds 2 x 2 patches into one 4096-wide token: 256 LLM tokens per tile, 1792 in all
    out = policy_flops(INTERNVL, "fastv:layer=2,keep=0.25", n_text=40, n_visual=1792)
    D, M = 1024, 4096
    tile = 2 * 1024 * (3 * 14 * 14) * D + 24 * vit_layer(1025, 1025 * 1025, D, M)
    assert out["vision_flops"] == 7 * tile
    # the projector: LayerNorm(4096), Linear 4096 -> 3584, GELU, Linear 3584 -> 3584 on each of the 1792 tokens
    assert out["projector_flops"] == 2 * 1792 * (4096 * 3584 + 3584 * 3584)
    assert out["flops"] == out["llm_flops"] + 7 * tile + out["projector_flops"]


def test_internvl_tiny_model_trace_by_hand():
    from vlm_tokenprune.eval.tiny_families import build_tiny_internvl, make_internvl_batch

    model = build_tiny_internvl("eager")  # tiles of 32 px, 4 px patches: 64 patches + CLS, 16 LLM tokens per tile
    batch = make_internvl_batch(model, [[5, "img", 7]], tiles=[3])
    with patch(model, "fastv:layer=1,keep=0.5") as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        fl = trace_flops(model.config, h.last_trace())
    D, M = 32, 64
    tile = 2 * 64 * (3 * 4 * 4) * D + 2 * vit_layer(65, 65 * 65, D, M)
    assert fl["vision_flops"] == 3 * tile
    assert fl["projector_flops"] == 2 * 48 * (128 * 64 + 64 * 64)


# -- Qwen3-VL-8B: 27 blocks of 1152, GELU MLP 4304, full attention; the merger + 3 DeepStack mergers ---------------
QWEN3_VISION = {"model_type": "qwen3_vl_vision", "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]}
QWEN3_TEXT = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}


def test_qwen3_vl_tower_and_deepstack_mergers_by_hand():
    # one 1024 x 1024 image: 64 x 64 = 4096 patches of 16 px, merged 2 x 2 -> 1024 LLM tokens
    out = policy_flops({"text_config": QWEN3_TEXT, "vision_config": QWEN3_VISION}, "fastv:layer=2,keep=0.25",
                       n_text=40, n_visual=1024)
    n, D, M = 4096, 1152, 4304
    tower = 2 * n * (3 * 2 * 16 * 16) * D + 27 * vit_layer(n, n * n, D, M)
    assert out["vision_flops"] == tower
    # 4 mergers (the final one + one per DeepStack layer 8, 16, 24), each 4608 -> 4608 -> 4096 on 1024 groups
    assert out["projector_flops"] == 4 * 2 * 1024 * (4608 * 4608 + 4608 * 4096)


def test_qwen3_vl_tiny_model_trace_by_hand():
    from vlm_tokenprune.eval.tiny_families import build_tiny_qwen3_vl, make_qwen3_batch

    model = build_tiny_qwen3_vl("eager")  # 3 blocks of 32, MLP 64, DeepStack from blocks 0 and 1
    batch = make_qwen3_batch(model, [[5, "img", 7]], image_grids=[(2, 3)])
    with patch(model, "fastv:layer=1,keep=0.5") as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        fl = trace_flops(model.config, h.last_trace())
    n, D, M = 24, 32, 64
    assert fl["vision_flops"] == 2 * n * (3 * 2 * 4 * 4) * D + 3 * vit_layer(n, n * n, D, M)
    assert fl["projector_flops"] == 3 * 2 * 6 * (128 * 128 + 128 * 64)  # merger + 2 DeepStack mergers


@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "internvl3-2b", "internvl3-8b", "qwen3-vl-2b", "qwen3-vl-8b"])
def test_explain_counts_the_tower_of_these_models(name):
    from vlm_tokenprune.commands.explain import _load_model_config

    cfg, n_visual, _ = _load_model_config(name)
    assert VisionGeometry.of(cfg) is not None
    out = policy_flops(cfg, "fastv:layer=2,keep=0.25", 64, n_visual)
    assert out["parts_counted"] == ["vision", "projector", "llm"] and out["vision_flops"] > 0
    assert out["llm_ratio"] < out["ratio"] < 1


def test_a_trace_without_stages_gets_the_untouched_tower():
    """Structural ops alone leave no stage in the trace, so ``trace_flops`` cannot see the visual tokens:
    ``with_untouched_tower`` adds the whole tower + projector of the row (bench and profile use it)."""
    from types import SimpleNamespace

    from vlm_tokenprune.eval.flops import with_untouched_tower

    tr = SimpleNamespace(phase="prefill", stages=[], tokens_per_layer=[2080] * 28)
    fl = trace_flops(INTERNVL, tr)
    assert fl["vision_flops"] is None and fl["ratio"] == 1.0
    out = with_untouched_tower({**fl, "flops": fl["flops"] / 2, "llm_flops": fl["llm_flops"] / 2, "ratio": 0.5,
                                "llm_ratio": 0.5}, INTERNVL, 288, 1792)
    whole = unpruned_flops(INTERNVL, 288, 1792)
    rest = whole["vision_flops"] + whole["projector_flops"]
    assert out["vision_flops"] == whole["vision_flops"] and out["parts_counted"] == ["vision", "projector", "llm"]
    assert out["ratio"] == pytest.approx((rest + fl["llm_flops"] / 2) / (rest + fl["llm_flops"]))
    assert with_untouched_tower(out, INTERNVL, 288, 1792) is out  # a counted tower stays as it is


# -- Gemma 3 4B: SigLIP 27 x 1152 (MLP 4304, no CLS) at 896 / 14 = 64 x 64 patches, pooled 4 x 4 -> 256 tokens, one
# linear 1152 -> 2560 per pooled token (the projector's RMSNorm and average pool have no matrix product) -----------
def test_gemma3_siglip_and_pooling_projector_by_hand():
    from vlm_tokenprune.commands.explain import _load_model_config

    cfg, n_visual, _ = _load_model_config("gemma-3-4b")
    assert n_visual == 256
    out = policy_flops(cfg, "fastv:layer=2,keep=0.25", 64, n_visual)
    n, D, M = 4096, 1152, 4304
    tower = 2 * n * (3 * 14 * 14) * D + 27 * vit_layer(n, n * n, D, M)
    assert out["vision_flops"] == out["vision_baseline_flops"] == tower
    assert out["projector_flops"] == 2 * 256 * 1152 * 2560
    assert out["parts_counted"] == ["vision", "projector", "llm"] and out["llm_ratio"] < out["ratio"] < 1
    two = unpruned_flops(cfg, 64, 2 * n_visual)  # two images: two towers, 512 pooled tokens
    assert two["vision_flops"] == 2 * tower and two["projector_flops"] == 2 * 512 * 1152 * 2560


def test_gemma3_tiny_model_trace_by_hand():
    from vlm_tokenprune.eval.tiny_gemma3 import build_tiny_gemma3, make_gemma3_batch

    model = build_tiny_gemma3("eager")  # SigLIP 2 x 32 (MLP 64) on 8 x 8 patches of 4 px, pooled to 16 tokens
    batch = make_gemma3_batch(model, [[5, "img", 7, "img", 6]])
    with patch(model, "fastv:layer=1,keep=0.5") as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        fl = trace_flops(model.config, h.last_trace())
    D, M, n = 32, 64, 64
    assert fl["vision_flops"] == 2 * (2 * n * (3 * 4 * 4) * D + 2 * vit_layer(n, n * n, D, M))
    assert fl["projector_flops"] == 2 * 32 * 32 * 64
