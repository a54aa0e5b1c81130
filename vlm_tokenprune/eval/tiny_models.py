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
    """How many placeholder tokens each image needs (from the model's own feature path)."""
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
