"""Tiny random-weight Qwen2-VL / Qwen2.5-VL checkpoints that both transformers and vLLM load (tests/vllm only).

Built from ``eval.tiny_models.tiny_qwen2_vl_config`` with a text head_dim of 64 (vLLM's CPU attention
refuses 16), saved by transformers with a word-level tokenizer (Qwen's special tokens at the ids the
tiny config uses) and a ``Qwen2VLProcessor`` (patch 4, merge 2: one LLM token per 8 x 8 pixels).
transformers 5.x writes ``model.language_model.*`` / ``model.visual.*``: vLLM's Qwen loaders map these.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlm_tokenprune.eval.tiny_models import QWEN_FIRST_TEXT_ID, tiny_qwen2_vl_config

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
            "<|vision_end|>")  # ids 0..6, as eval.tiny_models (pad 0, eos 2, image 3, video 4, start 5, end 6)
VOCAB = 128
WORDS = [f"w{i}" for i in range(QWEN_FIRST_TEXT_ID, VOCAB)]
PIXELS = 8  # pixels per merged LLM token side (patch 4 x merge 2)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIALS) + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=4096)


def processor():
    from transformers import Qwen2VLProcessor

    try:
        from transformers import Qwen2VLImageProcessor as IP
        import torchvision  # noqa: F401  (the default backend of transformers 5.x needs it)
    except ImportError:
        from transformers import Qwen2VLImageProcessorPil as IP
    ip = IP(patch_size=4, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": 4 * PIXELS * PIXELS, "longest_edge": 256 * PIXELS * PIXELS})
    video = None
    try:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 4 * PIXELS * PIXELS, "longest_edge": 256 * PIXELS * PIXELS})
    except Exception:  # needs torchvision; vLLM builds its video processor only for video inputs
        pass
    return Qwen2VLProcessor(image_processor=ip, tokenizer=tokenizer(), video_processor=video)


def build(version: str = "2", seed: int = 0):
    """The tiny model (float32, seeded; head_dim 64). Made position-sensitive, so a wrong M-RoPE id shows in the
    logits: rope_theta 100 and query / key weights x3 (moving an image's positions changes the next-token
    log-probs by ~0.2, against ~0.004 with the default init); LM head x8 so greedy tokens are well apart."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cfg = tiny_qwen2_vl_config(version, layers=2, hidden=128, heads=2, kv_heads=1, intermediate=256, vocab=VOCAB,
                               mrope_section=(8, 12, 12))
    cfg.text_config.rope_parameters["rope_theta"] = 100.0
    cls = Qwen2VLForConditionalGeneration if version == "2" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    return model


def save_tiny_qwen(path: Path, version: str = "2", seed: int = 0) -> Path:
    """Write the tiny checkpoint + processor to ``path``."""
    model = build(version, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor().save_pretrained(path)
    return path


def image(width: int, height: int, seed: int):
    """A random RGB image whose sides are multiples of 8 px (so the processor does not resize it)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(px.numpy())


def prompt(n_images: int, words: list[int]) -> str:
    """Images first, then text words ``w<id>`` (ids in [7, 128))."""
    return IMAGE * n_images + " " + " ".join(f"w{i}" for i in words)
