"""A tiny *trained* LLaVA (CLIP-style tower + Llama LM) shipped with the package, for pruning accuracy numbers.

Trained from scratch on :mod:`vlm_tokenprune.eval.synthetic` by ``scripts/train_tiny_vlm.py`` and stored
in ``vlm_tokenprune/assets/tiny_vlm/`` (safetensors + word-level tokenizer + LlavaProcessor). Everything
loads offline::

    model, processor = load_tiny_vlm()
    answers = answer(model, processor, images, questions)
    acc = evaluate(model, processor, make_split("test", 500))   # {qtype: accuracy}
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..assets import TINY_VLM

ASSET_DIR = TINY_VLM  # the shipped model (vlm_tokenprune.assets)
PROMPT = "USER: <image>\n{question} ASSISTANT:"

SPECIALS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_TOKEN_ID, UNK_ID = range(5)
VOCAB_SIZE = 64  # padded text vocabulary (all ids, specials included, are below it)

PATCH = 8
IMAGE_SIZE = 96  # the from-scratch phases of scripts/train_tiny_vlm.py: 12 x 12 = 144 visual tokens
GRID_TOKENS = (IMAGE_SIZE // PATCH) ** 2
SHIPPED_IMAGE_SIZE = 128  # the shipped model, warm-started from those to 16 x 16 = 256 visual tokens
SHIPPED_GRID_TOKENS = (SHIPPED_IMAGE_SIZE // PATCH) ** 2


def build_vocab() -> dict[str, int]:
    from .synthetic import vocabulary

    words = list(SPECIALS) + vocabulary()
    if len(words) > VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(words)} entries, more than VOCAB_SIZE={VOCAB_SIZE}")
    return {w: i for i, w in enumerate(words)}


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over the closed synthetic vocabulary (lower-cased, BOS prepended)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = build_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=1024,
    )
    return fast


def build_image_processor():
    """PIL-backend CLIP image processor (no torchvision needed): 96x96 RGB, rescale + CLIP mean/std."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=False, resample=2,  # bilinear (a no-op at the native 96 px)
    )


def build_processor():
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )


def tiny_vlm_config(*, text_hidden: int = 128, text_layers: int = 4, text_heads: int = 4, text_kv_heads: int = 2,
                    text_intermediate: int = 384, vision_hidden: int = 128, vision_layers: int = 4,
                    vision_heads: int = 4, vision_intermediate: int = 512):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        hidden_size=text_hidden, num_hidden_layers=text_layers, num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads, intermediate_size=text_intermediate, vocab_size=VOCAB_SIZE,
        max_position_embeddings=1024, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        tie_word_embeddings=False, rope_theta=10000.0,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_intermediate, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=GRID_TOKENS,
        tie_word_embeddings=False, pad_token_id=PAD_ID,
    )


def load_tiny_vlm(attn_implementation: str = "sdpa", path: str | os.PathLike | None = None, dtype=torch.float32):
    """(model, processor) of the shipped trained tiny LLaVA, loaded offline with ``from_pretrained``."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path) if path is not None else ASSET_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no trained tiny VLM at {path}; run scripts/train_tiny_vlm.py")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True,
    )
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def prompts(questions: list[str]) -> list[str]:
    return [PROMPT.format(question=q) for q in questions]


@torch.no_grad()
def answer(model, processor, images, questions: list[str], batch_size: int = 8, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers (decoded, special tokens stripped) for (image, question) pairs; left-padded batches."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    tok = processor.tokenizer
    tok.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        ims, qs = list(images[i : i + batch_size]), questions[i : i + batch_size]
        inputs = processor(images=ims, text=prompts(qs), return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        gen = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        )
        new = gen[:, inputs["input_ids"].shape[1]:]
        out += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def evaluate(model, processor, examples: list[dict], batch_size: int = 8) -> dict[str, float]:
    """Exact-match accuracy of :func:`answer` per question type (plus ``"all"``)."""
    preds = answer(model, processor, [e["image"] for e in examples], [e["question"] for e in examples], batch_size)
    hits: dict[str, list[int]] = {}
    for e, p in zip(examples, preds):
        hits.setdefault(e["qtype"], []).append(int(p == e["answer"]))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["all"] = sum(int(p == e["answer"]) for e, p in zip(examples, preds)) / max(len(examples), 1)
    return acc
