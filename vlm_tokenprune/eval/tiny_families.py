"""Tiny random-weight LLaVA-OneVision and InternVL models built offline from configs (real transformers
classes), and hand-built inputs for them (their processors need torchvision). Used by the tests."""
from __future__ import annotations

import math

import torch

from .tiny_models import BOS_ID, IMAGE_TOKEN_ID, PAD_ID, pad_qwen_rows

VIDEO_TOKEN_ID = 4  # LLaVA-OneVision video placeholder
FIRST_TEXT_ID = 7  # random text tokens are drawn from [7, vocab): never a special token


def _text_config(model_type: str, *, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
                 vocab: int):
    from transformers.models.auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=4096,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2, tie_word_embeddings=False,
    )


def _rows_to_inputs(rows: list[list], counts: dict, vocab: int, g: torch.Generator, padding: str,
                    tokens: dict) -> dict:
    """``input_ids`` / ``attention_mask`` for rows of segments: int n = n random text tokens, a key of
    ``counts`` (``"img"``, ``"vid"``) = the next item's placeholders (``counts[key]``: tokens per item, in order)."""
    its = {k: iter(v) for k, v in counts.items()}
    seqs = []
    for r in rows:
        s = [BOS_ID]
        for seg in r:
            if seg in its:
                s += [tokens[seg]] * next(its[seg])
            else:
                s += torch.randint(FIRST_TEXT_ID, vocab, (int(seg),), generator=g).tolist()
        seqs.append(s)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(L - len(s), L) if padding == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------
# LLaVA-OneVision (SigLIP + Qwen2)
# ------------------------------------------------------------------------------------------------
def tiny_onevision_config(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                          intermediate: int = 128, vocab: int = 128, image_size: int = 16, patch: int = 4,
                          vision_hidden: int = 32, vision_layers: int = 2, vision_aspect_ratio: str = "anyres_max_9"):
    """A tiny ``LlavaOnevisionConfig``: a ``image_size/patch`` square SigLIP grid per crop, crops up to 2 x 2."""
    from transformers import LlavaOnevisionConfig, SiglipVisionConfig

    text = _text_config("qwen2", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                        intermediate=intermediate, vocab=vocab)
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                                patch_size=patch, vision_use_head=False)
    s = image_size
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]], vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio=vision_aspect_ratio, tie_word_embeddings=False,
    )


def build_tiny_onevision(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32, **config_kwargs):
    """A tiny ``LlavaOnevisionForConditionalGeneration`` with seeded random weights."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(
        tiny_onevision_config(**config_kwargs), attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def make_onevision_batch(model, rows: list[list], seed: int = 0, padding: str = "left", image_sizes=None,
                         video_frames=None, batch_num_images=None) -> dict:
    """Inputs for rows of segments: int n = n random text tokens, ``"img"`` / ``"vid"`` = the next image / video.

    ``image_sizes``: per image (H, W) (default one crop); ``video_frames``: frames per video (all videos
    of a batch share one count: ``pixel_values_videos`` is ``[n_videos, frames, 3, s, s]``);
    ``batch_num_images``: images per sample (the processor sends it: a sample with several images is not tiled).
    Placeholder counts come from the model's own feature path.
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    s = cfg.vision_config.image_size
    n_img = sum(seg == "img" for r in rows for seg in r)
    n_vid = sum(seg == "vid" for r in rows for seg in r)
    inputs: dict = {}
    counts: dict = {"img": [], "vid": []}
    if n_img:
        sizes = torch.tensor(image_sizes if image_sizes is not None else [[s, s]] * n_img)
        n_p = [image_size_to_num_patches(x, cfg.image_grid_pinpoints, s) for x in sizes]
        inputs["pixel_values"] = torch.randn(n_img, max(n_p), 3, s, s, generator=g)
        inputs["image_sizes"] = sizes
        if batch_num_images is not None:
            inputs["batch_num_images"] = torch.tensor(batch_num_images)
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=sizes,
                                                 batch_num_images=inputs.get("batch_num_images"))
        counts["img"] = [int(f.shape[0]) for f in getattr(out, "pooler_output", out)]
    if n_vid:
        frames = video_frames or 2
        inputs["pixel_values_videos"] = torch.randn(n_vid, frames, 3, s, s, generator=g)
        side = s // cfg.vision_config.patch_size
        counts["vid"] = [frames * math.ceil(side / 2) ** 2 + 1] * n_vid
    inputs.update(_rows_to_inputs(rows, counts, cfg.text_config.vocab_size, g, padding,
                                  {"img": IMAGE_TOKEN_ID, "vid": VIDEO_TOKEN_ID}))
    return inputs


# ------------------------------------------------------------------------------------------------
# InternVL 3 / 3.5 (InternViT + pixel shuffle + Qwen2 / Qwen3)
# ------------------------------------------------------------------------------------------------
def tiny_internvl_config(*, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                         intermediate: int = 128, vocab: int = 128, image_size: int = 32, patch: int = 4,
                         vision_hidden: int = 32, vision_layers: int = 2, text_model_type: str = "qwen2"):
    """A tiny ``InternVLConfig``: ``image_size/patch`` square patches per tile, a 0.5 pixel shuffle
    (``(image_size / patch / 2)^2`` LLM tokens per tile: 16 by default)."""
    from transformers import InternVLConfig, InternVLVisionConfig

    text = _text_config(text_model_type, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                        intermediate=intermediate, vocab=vocab)
    vision = InternVLVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                  num_hidden_layers=vision_layers, num_attention_heads=4,
                                  image_size=[image_size, image_size], patch_size=[patch, patch])
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                          downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                          image_seq_length=(image_size // patch // 2) ** 2, tie_word_embeddings=False)


def build_tiny_internvl(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32, **config_kwargs):
    """A tiny ``InternVLForConditionalGeneration`` with seeded random weights."""
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(
        tiny_internvl_config(**config_kwargs), attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def make_internvl_batch(model, rows: list[list], seed: int = 0, padding: str = "left", tiles=None) -> dict:
    """Inputs for rows of segments: int n = n random text tokens, ``"img"`` = the next image (a run of
    placeholders; separate images by text, as ``<img>`` / ``</img>`` do in real prompts); ``tiles``: per image
    its tile count (the thumbnail included; default 1). ``pixel_values`` ``[sum(tiles), 3, s, s]``."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    s = cfg.vision_config.image_size[0]
    per_tile = int(s // cfg.vision_config.patch_size[0] * cfg.downsample_ratio) ** 2
    n_img = sum(seg == "img" for r in rows for seg in r)
    tiles = list(tiles) if tiles is not None else [1] * n_img
    if len(tiles) != n_img:
        raise ValueError(f"{n_img} images but {len(tiles)} tile counts")
    inputs: dict = {}
    if n_img:
        inputs["pixel_values"] = torch.randn(sum(tiles), 3, s, s, generator=g)
    inputs.update(_rows_to_inputs(rows, {"img": [n * per_tile for n in tiles]}, cfg.text_config.vocab_size, g,
                                  padding, {"img": IMAGE_TOKEN_ID}))
    return inputs


# ------------------------------------------------------------------------------------------------
# Qwen3-VL / Qwen3-VL-MoE (DeepStack, interleaved M-RoPE); inputs: tiny_models.make_qwen_batch
# ------------------------------------------------------------------------------------------------
def tiny_qwen3_vl_config(*, moe: bool = False, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                         head_dim: int = 16, intermediate: int = 128, vocab: int = 128, mrope_section=(4, 2, 2),
                         patch: int = 4, merge: int = 2, vision_hidden: int = 32, vision_layers: int = 3,
                         deepstack=(0, 1), experts: int = 4, experts_per_token: int = 2):
    """A tiny ``Qwen3VLConfig`` (``moe``: ``Qwen3VLMoeConfig``): DeepStack features of vision layers
    ``deepstack`` injected after decoder layers 0 .. len(deepstack) - 1; ``mrope_section`` sums to head_dim / 2."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    from .tiny_models import QWEN_VIDEO_TOKEN_ID, QWEN_VISION_END_ID, QWEN_VISION_START_ID

    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                max_position_embeddings=4096, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section),
                                 "mrope_interleaved": True})
    if moe:
        text.update(num_experts=experts, num_experts_per_tok=experts_per_token, moe_intermediate_size=intermediate // 2,
                    decoder_sparse_step=1)
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=4,
                  patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=64, deepstack_visual_indexes=list(deepstack))
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
               video_token_id=QWEN_VIDEO_TOKEN_ID, vision_start_token_id=QWEN_VISION_START_ID,
               vision_end_token_id=QWEN_VISION_END_ID, tie_word_embeddings=False)


def build_tiny_qwen3_vl(attn_implementation: str = "sdpa", moe: bool = False, seed: int = 0, dtype=torch.float32,
                        **config_kwargs):
    """A tiny ``Qwen3VLForConditionalGeneration`` (``moe``: ``Qwen3VLMoeForConditionalGeneration``), seeded."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(tiny_qwen3_vl_config(moe=moe, **config_kwargs), attn_implementation=attn_implementation,
                             dtype=dtype)
    return model.eval()


def make_qwen3_batch(model, rows: list[list], seed: int = 0, padding: str = "left", image_grids=None,
                     video_grids=None) -> dict:
    """Qwen3-VL inputs built by hand: like ``tiny_models.make_qwen_batch`` (``image_grids`` (h, w),
    ``video_grids`` (t, h, w) in LLM tokens), but every video FRAME is its own ``<t> <vision_start> frame
    <vision_end>`` group after a timestamp text token, as Qwen3-VL's processor writes videos (its
    ``get_rope_index`` splits ``video_grid_thw`` into t single frames)."""
    from .tiny_models import QWEN_VIDEO_TOKEN_ID, QWEN_VISION_END_ID, QWEN_VISION_START_ID, make_qwen_batch

    base = make_qwen_batch(model, [[seg for seg in r if seg != "vid"] or [1] for r in rows], seed=seed,
                           image_grids=image_grids)
    g = torch.Generator().manual_seed(seed + 1)
    cfg = model.config
    vc = cfg.vision_config
    merge = vc.spatial_merge_size
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
    n_vid = sum(seg == "vid" for r in rows for seg in r)
    video_grids = [tuple(x) for x in (video_grids or [(2, 2, 2)] * n_vid)]
    out: dict = {k: v for k, v in base.items() if k in ("pixel_values", "image_grid_thw")}
    if n_vid:
        thw = torch.tensor([[t, h * merge, w * merge] for t, h, w in video_grids])
        out["pixel_values_videos"] = torch.randn(int(thw.prod(-1).sum()), patch_dim, generator=g)
        out["video_grid_thw"] = thw
    imgs, vids = iter(image_grids or [(2, 3)] * sum(seg == "img" for r in rows for seg in r)), iter(video_grids)
    seqs, types = [], []
    for r in rows:
        s, ty = [BOS_ID], [0]
        for seg in r:
            if seg == "img":
                h, w = next(imgs)
                s += [QWEN_VISION_START_ID] + [IMAGE_TOKEN_ID] * (h * w) + [QWEN_VISION_END_ID]
                ty += [0] + [1] * (h * w) + [0]
            elif seg == "vid":
                t, h, w = next(vids)
                for _ in range(t):  # a timestamp (text), then the frame
                    s += [int(torch.randint(FIRST_TEXT_ID, cfg.text_config.vocab_size, (1,), generator=g))]
                    s += [QWEN_VISION_START_ID] + [QWEN_VIDEO_TOKEN_ID] * (h * w) + [QWEN_VISION_END_ID]
                    ty += [0, 0] + [2] * (h * w) + [0]
            else:
                s += torch.randint(FIRST_TEXT_ID, cfg.text_config.vocab_size, (int(seg),), generator=g).tolist()
                ty += [0] * int(seg)
        seqs.append(s)
        types.append(ty)
    out.update(pad_qwen_rows(seqs, types, padding))
    return out
