"""Tiny random-weight LLaVA-1.5 / LLaVA-NeXT checkpoints that both transformers and vLLM load (tests/vllm only).

Built from configs with transformers, saved with the shipped tiny VLM's tokenizer (vocabulary of 55 word
tokens + ``<image>`` = id 3) and a processor of the family. The text model has head_dim 64 (vLLM's CPU
attention refuses 16; 32 is what the shipped tiny VLM has, see benchmarks/results/vllm_tiny.md).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

ASSET = Path(__file__).resolve().parents[2] / "vlm_tokenprune" / "assets" / "tiny_vlm"
IMAGE = 48  # vision tower input side
PATCH = 8   # 6 x 6 = 36 patches per crop


def _config(next_: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    text = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, intermediate_size=256, vocab_size=64, max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=64)
    common = dict(vision_config=vision, text_config=text, image_token_index=3, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    if next_:
        s = IMAGE
        return LlavaNextConfig(image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], **common)
    return LlavaConfig(image_seq_length=(IMAGE // PATCH) ** 2, **common)


def _processor(next_: bool):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    tok = AutoTokenizer.from_pretrained(ASSET)
    kw = dict(do_resize=True, size={"height": IMAGE, "width": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
              do_center_crop=False)
    if next_:
        s = IMAGE
        ip = LlavaNextImageProcessor(image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], **kw)
        return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                                  vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)
    return LlavaProcessor(image_processor=CLIPImageProcessor(**kw), tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def save_tiny(path: Path, family: str, seed: int = 0) -> Path:
    """Write a tiny ``llava`` / ``llava_next`` checkpoint (float32 weights, seeded) to ``path``."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    next_ = family == "llava_next"
    cfg = _config(next_)
    cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # sharper logits than the 0.02-std init, so greedy tokens are well separated
        model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    _processor(next_).save_pretrained(path)
    _rename_vision_keys(path / "model.safetensors")
    for name in ("generation_config.json",):
        if (ASSET / name).exists() and not (path / name).exists():
            shutil.copy(ASSET / name, path / name)
    return path


def _rename_vision_keys(file: Path) -> None:
    """transformers 5.x writes the CLIP tower as ``vision_tower.embeddings...``; vLLM's CLIP loader wants the
    hub layout ``vision_tower.vision_model.embeddings...`` (which transformers also loads)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(file)
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        out[k] = v
    save_file(out, file, metadata={"format": "pt"})
