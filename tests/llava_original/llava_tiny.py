"""Tiny random original-LLaVA models (llava-torch 1.2.x on transformers 4.36), built offline from configs.

The llava code builds its CLIP tower with ``CLIPVisionModel.from_pretrained(mm_vision_tower)``: a tiny
random CLIP is saved to a local folder first and ``mm_vision_tower`` points there.
"""
from __future__ import annotations

import os

import torch

VOCAB = 128
BOS, EOS, PAD = 1, 2, 0
IMAGE = 32  # pixels per side; patch 8 -> a 4x4 grid, 16 features per image
PATCHES = 16


def save_tiny_clip(folder: str) -> str:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if not os.path.exists(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=IMAGE, patch_size=8, projection_dim=32)
        CLIPVisionModel(cfg).save_pretrained(folder)
        processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
        processor.save_pretrained(folder)
    return folder


def build(clip_dir: str, attn: str = "eager", seed: int = 0, **overrides):
    """A 4-layer Llama (hidden 64, 4 heads, 2 KV heads) with a 2-layer CLIP tower and an mlp2x_gelu projector."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=256, mm_vision_tower=clip_dir, mm_hidden_size=32,
              mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
              image_aspect_ratio="pad", mm_use_im_start_end=False, mm_patch_merge_type="flat",
              pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM._from_config(LlavaConfig(**kw), attn_implementation=attn)
    model.get_model().get_vision_tower().load_model()
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a visible spread of logits: the random init is tiny (std 0.02)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model.eval()


def prompt(*parts, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [1, T]`` from ints and ``"img"`` (IMAGE_TOKEN_INDEX placeholders); ``images [n_img, 3, 32, 32]``."""
    from llava.constants import IMAGE_TOKEN_INDEX

    ids = [BOS] + [IMAGE_TOKEN_INDEX if p == "img" else p for p in parts]
    g = torch.Generator().manual_seed(seed)
    n = sum(p == "img" for p in parts)
    return torch.tensor([ids]), torch.randn(n, 3, IMAGE, IMAGE, generator=g)
