"""A tiny random-weight Gemma 3 (``Gemma3ForConditionalGeneration``: SigLIP + avg-pool projector + Gemma3 text
model with sliding-window and full-attention layers) built offline from a config, and hand-built inputs
(``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``) laid out as Gemma 3's processor lays
them out: ``<start_of_image>`` + ``mm_tokens_per_image`` placeholders + ``<end_of_image>`` per image. Used by
the tests."""
from __future__ import annotations

import torch

from .tiny_models import BOS_ID, IMAGE_TOKEN_ID, PAD_ID

BOI_TOKEN_ID = 4  # <start_of_image>
EOI_TOKEN_ID = 5  # <end_of_image>
FIRST_TEXT_ID = 7  # random text tokens are drawn from [7, vocab)


def tiny_gemma3_config(*, layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                       intermediate: int = 128, vocab: int = 128, sliding_window: int = 8, image_size: int = 32,
                       patch: int = 4, tokens_per_image: int = 16, vision_hidden: int = 32, vision_layers: int = 2):
    """A tiny ``Gemma3Config``: layers 0-4 slide over ``sliding_window`` positions, layer 5 is full attention
    (Gemma 3's 5:1 pattern); an ``image_size/patch`` SigLIP grid pooled to ``tokens_per_image`` (4 x 4) tokens."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab, sliding_window=sliding_window,
        query_pre_attn_scalar=head_dim, max_position_embeddings=4096, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=2, tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                                patch_size=patch, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                        image_token_index=IMAGE_TOKEN_ID, boi_token_index=BOI_TOKEN_ID, eoi_token_index=EOI_TOKEN_ID,
                        tie_word_embeddings=False)


def build_tiny_gemma3(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32, **config_kwargs):
    """A tiny ``Gemma3ForConditionalGeneration`` with seeded random weights. The projector weight, which
    transformers initialises to zeros (every image token would embed to the same vector), is drawn at random,
    and the query projections are scaled so attention is peaked as in a trained model."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(
        tiny_gemma3_config(**config_kwargs), attn_implementation=attn_implementation, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(torch.randn(w.shape, generator=g).to(w.dtype) * 0.5)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model.eval()


def make_gemma3_batch(model, rows: list[list], seed: int = 0, padding: str = "left") -> dict:
    """Inputs for rows of segments: int n = n random text tokens, ``"img"`` = the next image
    (``<start_of_image>``, ``mm_tokens_per_image`` placeholders, ``<end_of_image>``). ``token_type_ids`` is 1
    at the placeholders (what the processor returns; it turns on the bidirectional image block)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    s = cfg.vision_config.image_size
    n_img = sum(seg == "img" for r in rows for seg in r)
    seqs = []
    for r in rows:
        seq = [BOS_ID]
        for seg in r:
            if seg == "img":
                seq += [BOI_TOKEN_ID] + [cfg.image_token_id] * cfg.mm_tokens_per_image + [EOI_TOKEN_ID]
            else:
                seq += torch.randint(FIRST_TEXT_ID, vocab, (int(seg),), generator=g).tolist()
        seqs.append(seq)
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, seq in enumerate(seqs):
        sl = slice(L - len(seq), L) if padding == "left" else slice(0, len(seq))
        ids[b, sl] = torch.tensor(seq)
        mask[b, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == cfg.image_token_id).long()}
    if n_img:
        out["pixel_values"] = torch.randn(n_img, 3, s, s, generator=g)
    return out
