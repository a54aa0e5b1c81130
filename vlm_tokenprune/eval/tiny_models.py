"""Tiny random-weight LLaVA / LLaVA-NeXT models built offline from configs (real transformers classes).

Used by the tests, the CLI ``demo`` / ``explain`` and the CPU benchmarks. No download.
"""
from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 3
PAD_ID = 0
BOS_ID = 1


def tiny_llava_config(
    *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
    vocab: int = 128, image_size: int = 48, patch: int = 8, vision_hidden: int = 32, vision_layers: int = 2,
    text_model_type: str = "llama", next: bool = False,
):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig
    from transformers.models.auto import CONFIG_MAPPING

    text = CONFIG_MAPPING[text_model_type](
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=4096,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch, projection_dim=vision_hidden,
    )
    if next:
        s = image_size
        return LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
            image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], vision_feature_layer=-2,
            vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
        )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(image_size // patch) ** 2, tie_word_embeddings=False,
    )


def build_tiny_llava(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32, **config_kwargs):
    """A tiny ``LlavaForConditionalGeneration`` (or NeXT with ``next=True``) with seeded random weights."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cfg = tiny_llava_config(**config_kwargs)
    cls = LlavaNextForConditionalGeneration if config_kwargs.get("next") else LlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def image_tokens_per_image(model, pixel_values, image_sizes=None) -> list[int]:
    """How many placeholder tokens each image needs (from the model's own feature path).

    The pixels may live on the CPU in fp32 (``make_batch`` draws them there): they are moved to the
    model's device and dtype for this count (a CUDA / bf16 model would refuse them otherwise)."""
    pixel_values = pixel_values.to(model.device, model.dtype)
    if image_sizes is not None:
        image_sizes = image_sizes.to(model.device)
    with torch.no_grad():
        if model.config.model_type == "llava_next":
            out = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
        else:
            out = model.model.get_image_features(pixel_values=pixel_values)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return [int(f.shape[0]) for f in feats]


def make_batch(model, rows: list[list], seed: int = 0, padding: str = "left", image_sizes=None) -> dict:
    """Model inputs for rows of segments: an int n = n random text tokens, ``"img"`` = the next image.

    Images are random pixels, one per ``"img"`` in row order. LLaVA-NeXT needs ``image_sizes``
    ([n_images] of (H, W)). Rows are padded with ``PAD_ID`` on ``padding`` side.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img = sum(seg == "img" for r in rows for seg in r)
    vc = cfg.vision_config
    inputs: dict = {}
    counts: list[int] = []
    if n_img:
        if cfg.model_type == "llava_next":
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            sizes = torch.tensor(image_sizes if image_sizes is not None else [[vc.image_size, vc.image_size]] * n_img)
            n_p = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, vc.image_size) for s in sizes]
            pv = torch.randn(n_img, max(n_p), 3, vc.image_size, vc.image_size, generator=g)
            inputs["image_sizes"] = sizes
        else:
            pv = torch.randn(n_img, 3, vc.image_size, vc.image_size, generator=g)
        inputs["pixel_values"] = pv
        counts = image_tokens_per_image(model, pv, inputs.get("image_sizes"))
    seqs, it = [], iter(counts)
    for r in rows:
        s = [BOS_ID]
        for seg in r:
            if seg == "img":
                s += [IMAGE_TOKEN_ID] * next(it)
            else:
                s += torch.randint(4, cfg.text_config.vocab_size, (int(seg),), generator=g).tolist()
        seqs.append(s)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(L - len(s), L) if padding == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    inputs["input_ids"] = ids
    inputs["attention_mask"] = mask
    return inputs


# ------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# ------------------------------------------------------------------------------------------------
QWEN_VIDEO_TOKEN_ID = 4
QWEN_VISION_START_ID = 5
QWEN_VISION_END_ID = 6
QWEN_FIRST_TEXT_ID = 7  # random text tokens are drawn from [7, vocab): never a special token


def tiny_qwen2_vl_config(
    version: str = "2", *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
    intermediate: int = 128, vocab: int = 128, mrope_section=(2, 3, 3), patch: int = 4, merge: int = 2,
    temporal_patch: int = 2, vision_hidden: int = 32, vision_layers: int = 2, tokens_per_second: int = 2,
    use_sliding_window: bool = False, sliding_window: int = 8, max_window_layers: int = 2,
):
    """A tiny ``Qwen2VLConfig`` (``version="2"``) or ``Qwen2_5_VLConfig`` (``"2.5"``).

    ``mrope_section`` must sum to ``hidden // heads // 2`` (the rotary half-dimension). Qwen2.5-VL's
    vision tower gets one windowed and one full-attention block (window = 2 merged tokens).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    if sum(mrope_section) * 2 != hidden // heads:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {hidden // heads // 2}")
    text = dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2, tie_word_embeddings=False,
        use_sliding_window=use_sliding_window, sliding_window=sliding_window, max_window_layers=max_window_layers,
    )
    common = dict(patch_size=patch, spatial_merge_size=merge, temporal_patch_size=temporal_patch, in_channels=3,
                  num_heads=4, depth=vision_layers)
    ids = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=QWEN_VIDEO_TOKEN_ID,
               vision_start_token_id=QWEN_VISION_START_ID, vision_end_token_id=QWEN_VISION_END_ID,
               tie_word_embeddings=False)
    if version == "2":
        vision = dict(common, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(common, hidden_size=vision_hidden, out_hidden_size=hidden, intermediate_size=2 * vision_hidden,
                  window_size=2 * merge * patch, fullatt_block_indexes=[vision_layers - 1],
                  tokens_per_second=tokens_per_second)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def build_tiny_qwen2_vl(attn_implementation: str = "sdpa", version: str = "2", seed: int = 0, dtype=torch.float32,
                        **config_kwargs):
    """A tiny ``Qwen2VLForConditionalGeneration`` (``version="2"``) or ``Qwen2_5_VLForConditionalGeneration``
    (``"2.5"``) with seeded random weights, built offline."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cfg = tiny_qwen2_vl_config(version, **config_kwargs)
    cls = Qwen2VLForConditionalGeneration if version == "2" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()



def pad_qwen_rows(seqs: list[list[int]], types: list[list[int]], padding: str) -> dict:
    """``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` of token rows padded to one length
    (``padding`` ``"left"`` or ``"right"``) with ``PAD_ID``."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    tt = torch.zeros((len(seqs), L), dtype=torch.int)
    for b, (s, ty) in enumerate(zip(seqs, types)):
        sl = slice(L - len(s), L) if padding == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl], tt[b, sl] = torch.tensor(s), 1, torch.tensor(ty, dtype=torch.int)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": tt}

def make_qwen_batch(model, rows: list[list], seed: int = 0, padding: str = "left", image_grids=None,
                    video_grids=None, seconds_per_grid=None) -> dict:
    """Qwen2-VL / 2.5-VL inputs built by hand (the Qwen processor needs torchvision).

    ``rows``: segments per row: an int n = n random text tokens, ``"img"`` = the next image,
    ``"vid"`` = the next video; each is wrapped in vision start / end tokens like the processor does.
    ``image_grids``: per image ``(h, w)`` in LLM tokens (after the spatial merge; default 2x3);
    ``video_grids``: per video ``(t, h, w)`` (t frames after temporal patching; default 2x2x2).
    Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and, when present,
    ``pixel_values`` ``[sum(t*H*W), C*tp*p*p]`` with ``image_grid_thw`` (H = h*merge...),
    ``pixel_values_videos`` with ``video_grid_thw`` and, for Qwen2.5-VL, ``second_per_grid_ts``.
    Positions are left to the model (``get_rope_index``).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vc = cfg.vision_config
    merge = vc.spatial_merge_size
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
    n_img = sum(seg == "img" for r in rows for seg in r)
    n_vid = sum(seg == "vid" for r in rows for seg in r)
    image_grids = [tuple(x) for x in (image_grids or [(2, 3)] * n_img)]
    video_grids = [tuple(x) for x in (video_grids or [(2, 2, 2)] * n_vid)]
    if len(image_grids) != n_img or len(video_grids) != n_vid:
        raise ValueError(f"{n_img} images / {n_vid} videos but {len(image_grids)} image / {len(video_grids)} video grids")
    inputs: dict = {}
    if n_img:
        thw = torch.tensor([[1, h * merge, w * merge] for h, w in image_grids])
        inputs["pixel_values"] = torch.randn(int(thw.prod(-1).sum()), patch_dim, generator=g)
        inputs["image_grid_thw"] = thw
    if n_vid:
        thw = torch.tensor([[t, h * merge, w * merge] for t, h, w in video_grids])
        inputs["pixel_values_videos"] = torch.randn(int(thw.prod(-1).sum()), patch_dim, generator=g)
        inputs["video_grid_thw"] = thw
        if cfg.model_type == "qwen2_5_vl":
            sec = seconds_per_grid if seconds_per_grid is not None else [1.0] * n_vid
            inputs["second_per_grid_ts"] = torch.tensor(sec, dtype=torch.float)
    seqs, types = [], []
    imgs, vids = iter(image_grids), iter(video_grids)
    for r in rows:
        s, ty = [BOS_ID], [0]
        for seg in r:
            if seg in ("img", "vid"):
                n = (lambda h, w: h * w)(*next(imgs)) if seg == "img" else (lambda t, h, w: t * h * w)(*next(vids))
                tok, kind = (IMAGE_TOKEN_ID, 1) if seg == "img" else (QWEN_VIDEO_TOKEN_ID, 2)
                s += [QWEN_VISION_START_ID] + [tok] * n + [QWEN_VISION_END_ID]
                ty += [0] + [kind] * n + [0]
            else:
                s += torch.randint(QWEN_FIRST_TEXT_ID, cfg.text_config.vocab_size, (int(seg),), generator=g).tolist()
                ty += [0] * int(seg)
        seqs.append(s)
        types.append(ty)
    inputs.update(pad_qwen_rows(seqs, types, padding))
    return inputs
