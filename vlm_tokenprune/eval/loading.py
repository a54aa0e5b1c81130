"""Models and prompts for the evaluation tools (profiler, bench, viz, the lmms-eval wrapper, the CLI):
known geometries built with random weights, the shipped tiny VLM, local checkpoints, prompts and
random / synthetic inputs, devices and dtypes, the run environment."""
from __future__ import annotations

import inspect
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import PolicyError
from ..policy import Policy

# random-weight geometries: text config, vision config, prompt layout (n_text total, image kwargs)
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064)
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)
KNOWN_GEOMETRIES: dict[str, dict] = {
    "llava-1.5-7b": dict(
        family="llava", text=_VICUNA_7B, vision=_CLIP_L_336,
        description="LLaVA-1.5-7B geometry: Vicuna-7B (32 x 4096, MHA), CLIP ViT-L/14-336 -> 24x24 = 576 visual tokens",
    ),
    "llava-next-7b": dict(
        family="llava_next", text=_VICUNA_7B, vision=_CLIP_L_336, image_size=(672, 672),
        pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        description="LLaVA-NeXT-7B geometry (Vicuna-7B), one 672x672 image: 576 base + 2304 anyres + 48 newline tokens",
    ),
    "llava-small": dict(
        family="llava",
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32064),
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                    image_size=224, patch_size=14, projection_dim=512),
        description="a small LLaVA-1.5-shaped geometry for CPU profiling: Llama 6 x 512, CLIP ViT 6 x 384 at "
                    "224/14 -> 16x16 = 256 visual tokens",
    ),
    "qwen2-vl-7b": dict(
        family="qwen2_vl",
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, in_channels=3),
        grid=(24, 24), mrope_section=[16, 24, 24], rope_theta=1e6,
        description="Qwen2-VL-7B geometry: Qwen2-7B (28 x 3584, GQA 28/4), ViT 32 x 1280, one 672x672 image -> 24x24 = 576 tokens",
    ),
}
_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4)
# Checked against published configs (issue 21): InternVL3's vocab 151674 (the InternVL3-8B-hf config quoted in a
# vLLM issue; InternVL3-2B-hf 28 x 1536, 12/2 heads x 128 in NVIDIA's TensorRT InternVL config test); Qwen3-VL's
# towers (2B: depth 24 x 1024, out 2048, DeepStack 5/11/17 as sgl-jax's Qwen3VLVisionConfig defaults; 4B/8B-style
# 27 x 1152 / 4304, DeepStack 8/16/24 as transformers' Qwen3VLVisionConfig defaults) and Qwen3-8B's text numbers
# (4096 / 12288 / 36 / 32-8 x 128 / vocab 151936); LLaVA-OneVision's SigLIP with 26 layers as in transformers'
# LlavaOnevisionConfig default (llava-hf/llava-onevision-qwen2-7b-ov-hf). No number needed a change.
KNOWN_GEOMETRIES.update({
    "llava-onevision-7b": dict(
        family="llava_onevision", text=dict(_QWEN2_7B, vocab_size=152128),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                    image_size=384, patch_size=14),
        image_size=(768, 768),
        description="LLaVA-OneVision-7B geometry: Qwen2-7B (28 x 3584, GQA 28/4), SigLIP-so400m 26 x 1152 at 384/14, "
                    "one 768x768 image: 729 base + 54x54 anyres + 54 newline tokens",
    ),
    "internvl3-8b": dict(
        family="internvl", text=dict(_QWEN2_7B, vocab_size=151674),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=[448, 448], patch_size=[14, 14]),
        tiles=7,
        description="InternVL3-8B geometry: Qwen2.5-7B (28 x 3584, GQA 28/4), InternViT-300M 24 x 1024 at 448/14 + "
                    "0.5 pixel shuffle: 6 tiles + thumbnail = 7 x 256 = 1792 visual tokens",
    ),
    "qwen3-vl-8b": dict(
        family="qwen3_vl",
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24]),
        grid=(32, 32), mrope_section=[24, 20, 20], rope_theta=5e6,
        description="Qwen3-VL-8B geometry: 36 x 4096 LLM (GQA 32/8 x 128), ViT 27 x 1152 patch 16, DeepStack from "
                    "vision layers 8/16/24, one 1024x1024 image -> 32x32 = 1024 tokens",
    ),
})
# Gemma 3: numbers of the released google/gemma-3-{4b,12b,27b}-it config.json (SigLIP 27 x 1152 at 896/14, 4x4
# average pool -> 256 tokens per image; text layers / width / heads / MLP / head_dim / window as in Google's MaxText
# configs AI-Hypercomputer/maxtext MaxText/configs/models/gemma3-{4b,12b,27b}.yml; vocab 262208, 4B's
# query_pre_attn_scalar 256 and 27B's 168 = 5376 / 32 as in the HF config.json)
_SIGLIP_GEMMA3 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=896, patch_size=14)
_GEMMA3 = {
    "4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "27b": dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168),
}
for _size, _text in _GEMMA3.items():
    KNOWN_GEOMETRIES[f"gemma-3-{_size}"] = dict(
        family="gemma3", text=dict(_text, vocab_size=262208, sliding_window=1024, sliding_window_pattern=6),
        vision=_SIGLIP_GEMMA3,
        tokens_per_image=256,
        description=f"Gemma 3 {_size.upper()} geometry: {_text['num_hidden_layers']} x {_text['hidden_size']} LLM (GQA "
                    f"{_text['num_attention_heads']}/{_text['num_key_value_heads']} x {_text['head_dim']}; 5 of 6 layers "
                    "slide over 1024 positions), SigLIP 27 x 1152 at 896/14 pooled 4x4 -> 256 visual tokens per image",
    )
MODEL_CHOICES = ("tiny", *KNOWN_GEOMETRIES)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# placeholder ids of the built geometries (those of vlm_tokenprune.eval.tiny_models, so its batch builders apply)
_IMAGE_ID, _VIDEO_ID, _VSTART_ID, _VEND_ID = 3, 4, 5, 6


# -- small helpers shared with bench / visualize / the lmms-eval wrapper --------------------------------
def resolve_device(device: "str | torch.device | None") -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: "str | torch.dtype | None", device: torch.device) -> torch.dtype:
    from ..errors import InputError

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError("--dtype", f"{dtype!r}; allowed: {', '.join(DTYPES)}, auto")
    return DTYPES[dtype]


def parse_all(policies: Sequence[Any], field: str) -> list[Policy]:
    """Every policy parsed; the bad ones reported together (one ``PolicyError`` naming each), before any model."""
    out, bad = [], []
    for i, spec in enumerate(policies):
        try:
            out.append(Policy.parse(spec))
        except PolicyError as e:
            bad.append(f"policy {i + 1} ({spec!r}): {e}" if isinstance(spec, str) else f"policy {i + 1}: {e}")
    if bad:
        raise PolicyError(field, f"{len(bad)} of {len(policies)} policies are malformed (nothing was run): "
                          + "; ".join(bad))
    return out


def environment(device: "torch.device | str | None" = None) -> dict:
    """Versions, device and git commit (if the package sits in a git checkout) for result files."""
    import transformers

    from .. import __version__

    device = resolve_device(device)
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = cpu_name()
    return {
        "package": "vlm_tokenprune", "version": __version__, "git_commit": git_commit(),
        "device": str(device), "device_name": dev, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (read from ``.git``; no git process), else None."""
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        if git.is_file():  # a worktree / submodule: "gitdir: <path>"
            git = (git.parent / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        if (git / ref).is_file():
            return (git / ref).read_text().strip() or None
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except (OSError, IndexError):
        return None
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else ``"cpu"``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def load_vlm(path: "str | os.PathLike", *, dtype: "str | torch.dtype | None" = None, attn_implementation: str | None = None,
             device: "str | torch.device | None" = None, layers: int | None = None, trust_remote_code: bool = False,
             **kwargs):
    """(model, processor) of a Hugging Face VLM checkpoint (a local folder or a hub id), any family.

    ``"tiny"`` is the shipped trained tiny LLaVA. ``layers`` keeps only the first decoder layers
    (the config is edited before loading; the other layers' weights are not loaded).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .tiny_vlm import ASSET_DIR

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = ASSET_DIR if str(path) == "tiny" else path
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if layers is not None:
        text = getattr(cfg, "text_config", cfg)
        _check_layers(layers, text.num_hidden_layers)
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:layers]
    model = AutoModelForImageTextToText.from_pretrained(
        path, config=cfg, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
        **kwargs,
    )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval(), processor


PLAIN_PROMPT = "USER: {context} ASSISTANT:"
"""Prompt for processors without a chat template (LLaVA-1.5's llava-hf format; the shipped tiny model's)."""


def build_prompt(processor, text: str, n_images: int = 1, *, chat_template: str | None = None,
                 plain_format: str = PLAIN_PROMPT) -> str:
    """One user turn with ``n_images`` images and ``text``, ready for ``processor(images=..., text=...)``.

    With a chat template (``chat_template`` or the processor's own) the images are content items and the
    template places the image tokens; without one, ``plain_format`` wraps ``"<image>\n" * n + text``
    (``<image>`` = the processor's image token; not added again when ``text`` already holds it).
    """
    image_token = getattr(processor, "image_token", None) or "<image>"
    if image_token in text:  # the task wrote the placeholders itself
        n_images = 0
    template = chat_template or getattr(processor, "chat_template", None)
    if template is not None:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                             add_generation_prompt=True, tokenize=False)
    text = f"{image_token}\n" * n_images + text
    return plain_format.format(context=text)


def _check_layers(layers: int, available: int) -> None:
    from ..errors import InputError

    if not 2 <= layers <= available:
        raise InputError("--layers", f"{layers}; allowed: 2..{available} (layer 0 cannot be pruned, so keep at least 2)")


def build_geometry(name: str, *, layers: int | None = None, vision_layers: int | None = None, dtype=None,
                   attn_implementation: str = "sdpa", device=None, seed: int = 0):
    """A random-weight model of a known geometry (``KNOWN_GEOMETRIES``), built from its config on ``device``."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    from ..errors import InputError

    if name not in KNOWN_GEOMETRIES:
        raise InputError("--model", f"{name!r} is not a known geometry; allowed: {', '.join(KNOWN_GEOMETRIES)}")
    g = KNOWN_GEOMETRIES[name]
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    text = dict(g["text"])
    if layers is not None:
        _check_layers(layers, text["num_hidden_layers"])
        text["num_hidden_layers"] = layers
    vision = dict(g["vision"])
    depth_key = "depth" if g["family"] in ("qwen2_vl", "qwen3_vl") else "num_hidden_layers"
    if vision_layers is not None:
        if not 1 <= vision_layers <= vision[depth_key]:
            raise InputError("--vision-layers", f"{vision_layers}; allowed: 1..{vision[depth_key]}")
        vision[depth_key] = vision_layers
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if g["family"] in ("llava_onevision", "internvl", "qwen3_vl", "gemma3"):
        cfg, cls = _newer_family_config(g, text, vision, ids)
    elif g["family"] == "qwen2_vl":
        text_cfg = dict(text, max_position_embeddings=32768, tie_word_embeddings=False, **ids,
                        rope_parameters={"rope_type": "default", "rope_theta": g["rope_theta"],
                                         "mrope_section": g["mrope_section"]})
        cfg = Qwen2VLConfig(text_config=text_cfg, vision_config=dict(vision, hidden_size=text["hidden_size"]),
                            image_token_id=_IMAGE_ID, video_token_id=_VIDEO_ID, vision_start_token_id=_VSTART_ID,
                            vision_end_token_id=_VEND_ID, tie_word_embeddings=False)
        cls = Qwen2VLForConditionalGeneration
    else:
        text_cfg = LlamaConfig(**text, max_position_embeddings=4096, tie_word_embeddings=False, **ids)
        vision_cfg = CLIPVisionConfig(**vision)
        common = dict(vision_config=vision_cfg, text_config=text_cfg, image_token_index=_IMAGE_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
        if g["family"] == "llava_next":
            cfg, cls = LlavaNextConfig(**common, image_grid_pinpoints=g["pinpoints"]), LlavaNextForConditionalGeneration
        else:
            side = vision["image_size"] // vision["patch_size"]
            cfg, cls = LlavaConfig(**common, image_seq_length=side * side), LlavaForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def _newer_family_config(g: dict, text: dict, vision: dict, ids: dict):
    """(config, class) of a LLaVA-OneVision / InternVL / Qwen3-VL geometry (placeholder ids of ``tiny_families``)."""
    import transformers as tf

    from .tiny_families import VIDEO_TOKEN_ID

    family = g["family"]
    if family == "gemma3":  # placeholder ids of tiny_gemma3 (image 3, <start_of_image> 4, <end_of_image> 5)
        from .tiny_gemma3 import BOI_TOKEN_ID, EOI_TOKEN_ID

        text_cfg = tf.Gemma3TextConfig(**text, max_position_embeddings=32768, tie_word_embeddings=False, **ids)
        return (tf.Gemma3Config(text_config=text_cfg, vision_config=tf.SiglipVisionConfig(**vision, vision_use_head=False),
                                mm_tokens_per_image=g["tokens_per_image"], image_token_index=_IMAGE_ID,
                                boi_token_index=BOI_TOKEN_ID, eoi_token_index=EOI_TOKEN_ID, tie_word_embeddings=False),
                tf.Gemma3ForConditionalGeneration)
    if family == "qwen3_vl":
        depth = vision["depth"]
        text_cfg = dict(text, max_position_embeddings=32768, tie_word_embeddings=False, **ids,
                        rope_parameters={"rope_type": "default", "rope_theta": g["rope_theta"],
                                         "mrope_section": g["mrope_section"], "mrope_interleaved": True})
        vis = dict(vision, out_hidden_size=text["hidden_size"],  # --vision-layers: DeepStack from the layers left
                   deepstack_visual_indexes=sorted({min(i, depth - 1) for i in vision["deepstack_visual_indexes"]}))
        return (tf.Qwen3VLConfig(text_config=text_cfg, vision_config=vis, image_token_id=_IMAGE_ID,
                                 video_token_id=_VIDEO_ID, vision_start_token_id=_VSTART_ID,
                                 vision_end_token_id=_VEND_ID, tie_word_embeddings=False),
                tf.Qwen3VLForConditionalGeneration)
    text_cfg = tf.Qwen2Config(**text, max_position_embeddings=32768, tie_word_embeddings=False, **ids)
    if family == "llava_onevision":
        s = vision["image_size"]
        pins = [[s * a, s * b] for a in range(1, 4) for b in range(1, 4)]
        return (tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**vision, vision_use_head=False),
                                        text_config=text_cfg, image_token_index=_IMAGE_ID,
                                        video_token_index=VIDEO_TOKEN_ID, image_grid_pinpoints=pins,
                                        vision_feature_layer=-1, vision_feature_select_strategy="full",
                                        tie_word_embeddings=False),
                tf.LlavaOnevisionForConditionalGeneration)
    side = vision["image_size"][0] // vision["patch_size"][0] // 2
    return (tf.InternVLConfig(vision_config=tf.InternVLVisionConfig(**vision), text_config=text_cfg,
                              image_token_id=_IMAGE_ID, downsample_ratio=0.5, vision_feature_layer=-1,
                              vision_feature_select_strategy="default", image_seq_length=side * side,
                              tie_word_embeddings=False),
            tf.InternVLForConditionalGeneration)


def random_inputs(model, *, n_text: int = 64, batch: int = 1, seed: int = 0, image_size=None, grid=None,
                  tiles=None) -> dict:
    """One prompt row (BOS + text + image placeholders + text, ``n_text`` text tokens in all, 55 % of them
    before the image as in a system prompt + question layout) repeated ``batch`` times, random pixels.

    Works for LLaVA, LLaVA-NeXT (``image_size`` = (H, W) of the image) and Qwen2-VL / 2.5-VL (``grid`` =
    (h, w) in LLM tokens), whatever the checkpoint's special token ids are.
    """
    from ..errors import InputError
    from .tiny_models import make_batch, make_qwen_batch

    if n_text < 2:
        raise InputError("--n-text", f"{n_text}; need at least 2 (BOS and one question token)")
    before = max(0, (n_text * 35) // 64 - 1)
    row = [before, "img", n_text - 1 - before]
    cfg = model.config
    if cfg.model_type in ("llava_onevision", "internvl"):  # ids of tiny_families (image 3, OneVision video 4)
        from .tiny_families import make_internvl_batch, make_onevision_batch

        if cfg.model_type == "internvl":
            batch_inputs = make_internvl_batch(model, [row] * batch, seed=seed, tiles=[tiles or 1] * batch)
            mapping = {_IMAGE_ID: cfg.image_token_id}
        else:
            side = cfg.vision_config.image_size
            batch_inputs = make_onevision_batch(model, [row] * batch, seed=seed,
                                                image_sizes=[list(image_size or (side, side))] * batch)
            mapping = {_IMAGE_ID: cfg.image_token_id, _VIDEO_ID: cfg.video_token_id}
    elif cfg.model_type == "gemma3":  # ids of tiny_gemma3 (image 3, <start_of_image> 4, <end_of_image> 5)
        from .tiny_gemma3 import BOI_TOKEN_ID, EOI_TOKEN_ID, make_gemma3_batch

        batch_inputs = make_gemma3_batch(model, [row] * batch, seed=seed)
        # its placeholders are already the checkpoint's image id; <start/end_of_image> become the checkpoint's own
        mapping = {cfg.image_token_id: cfg.image_token_id, BOI_TOKEN_ID: cfg.boi_token_index,
                   EOI_TOKEN_ID: cfg.eoi_token_index}
    elif cfg.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        batch_inputs = make_qwen_batch(model, [row] * batch, seed=seed, image_grids=[tuple(grid or (24, 24))] * batch)
        mapping = {_IMAGE_ID: cfg.image_token_id, _VIDEO_ID: cfg.video_token_id,
                   _VSTART_ID: cfg.vision_start_token_id, _VEND_ID: cfg.vision_end_token_id}
    elif cfg.model_type in ("llava", "llava_next"):
        sizes = None
        if cfg.model_type == "llava_next":
            side = cfg.vision_config.image_size
            sizes = [list(image_size or (2 * side, 2 * side))] * batch
        batch_inputs = make_batch(model, [row] * batch, seed=seed, image_sizes=sizes)
        mapping = {_IMAGE_ID: cfg.image_token_id}
    else:
        raise InputError("model", "random inputs are built for llava, llava_next, llava_onevision, internvl, qwen2_vl, "
                                  f"qwen2_5_vl, qwen3_vl, qwen3_vl_moe, gemma3; got {cfg.model_type!r}")
    ids = batch_inputs["input_ids"]
    placeholder = torch.zeros_like(ids, dtype=torch.bool)
    for src in mapping:
        placeholder |= ids == src
    # a random text id that equals one of this checkpoint's placeholder ids becomes a harmless text id
    safe = next(i for i in range(7, 1000) if i not in mapping.values())
    out = ids.clone()
    for dst in mapping.values():
        out = torch.where(~placeholder & (ids == dst), safe, out)
    for src, dst in mapping.items():
        out = torch.where(ids == src, dst, out)
    batch_inputs["input_ids"] = out
    if "token_type_ids" in batch_inputs:  # Gemma 3: 1 exactly at the image placeholders
        batch_inputs["token_type_ids"] = (out == cfg.image_token_id).long()
    return batch_inputs


def tiny_inputs(processor, batch: int = 1, start: int = 0) -> dict:
    """Processor inputs for ``batch`` synthetic test-split questions (the shipped tiny model's format)."""
    from .synthetic import make_split
    from .tiny_vlm import prompts

    ex = make_split("test", start + batch)[start:]
    return dict(processor(images=[e["image"] for e in ex], text=prompts([e["question"] for e in ex]),
                          return_tensors="pt", padding=True))


def to_device(inputs: dict, model) -> dict:
    """Inputs on the model's device; floating tensors (pixels) in the model's dtype."""
    dev, dt = model.device, model.dtype
    return {k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


def encode_images(model, inputs: dict) -> dict:
    """``inputs`` with pixels replaced by precomputed ``mm_encoder_outputs`` (what ``generate()`` passes).

    Mirrors transformers' ``_prepare_multimodal_encoder_kwargs_for_generation``: each modality's
    ``get_<modality>_features`` consumes its pixel and grid arguments, which are then dropped, except
    the ``*_grid_thw`` grids (Qwen2-VL family): the language model's M-RoPE positions and the patch
    layout are computed from them (``generate()`` computes the positions before it drops them), so
    without them this prefill would not be the one ``generate()`` runs.

    transformers releases without ``mm_encoder_outputs`` (5.17) ignore it and embed the placeholders
    as text: check :func:`encoder_outputs_honoured` before timing this call as the LM prefill.
    """
    out = dict(inputs)
    encoded: dict = {}
    used: set = set()
    with torch.no_grad():
        for modality in ("image", "video"):
            fn = getattr(model.model, f"get_{modality}_features", None)
            if fn is None:
                continue
            kw = {k: inputs[k] for k in inspect.signature(fn).parameters if k != "kwargs" and k in inputs}
            if not any(k.startswith("pixel_values") for k in kw):
                continue
            used |= set(kw)
            encoded[modality] = fn(**kw, return_dict=True)
    for k in used:
        if not k.endswith("_grid_thw"):
            out.pop(k, None)
    out["mm_encoder_outputs"] = encoded
    return out


def encoder_outputs_honoured(model, inputs: dict, lm_inputs: dict | None = None, rtol: float = 1e-3) -> bool:
    """Whether the model's forward uses precomputed ``mm_encoder_outputs`` (``encode_images``): the
    last-token logits from them equal those of a forward from pixels (unpatched model), to ``rtol``
    of the largest logit. False on transformers releases that silently ignore the argument."""
    lm_inputs = encode_images(model, inputs) if lm_inputs is None else lm_inputs
    with torch.no_grad():
        a = model(**inputs, logits_to_keep=1).logits.float()
        b = model(**lm_inputs, logits_to_keep=1).logits.float()
    return bool((a - b).abs().max() <= rtol * a.abs().max().clamp(min=1e-6))


def load_model(spec: str, *, layers: int | None = None, vision_layers: int | None = None, dtype=None,
               attn_implementation: str = "sdpa", device=None, seed: int = 0, batch: int = 1, n_text: int = 64):
    """``(model, inputs, description)`` for a profiler model spec: ``"tiny"``, a known geometry or a local path."""
    from ..errors import InputError

    device = resolve_device(device)
    if spec == "tiny":
        from .tiny_vlm import ASSET_DIR, load_tiny_vlm

        if vision_layers is not None:
            raise InputError("--vision-layers", "applies to built geometries only (the tiny model is loaded as trained)")
        dt = resolve_dtype(dtype, device)
        if layers is not None:
            model, processor = load_vlm(ASSET_DIR, dtype=dt, attn_implementation=attn_implementation, device=device, layers=layers)
        else:
            model, processor = load_tiny_vlm(attn_implementation=attn_implementation, dtype=dt)
            model.to(device)
        desc = f"the shipped trained tiny LLaVA ({ASSET_DIR}), synthetic test-split questions"
        return model, to_device(tiny_inputs(processor, batch), model), desc
    if spec in KNOWN_GEOMETRIES:
        model = build_geometry(spec, layers=layers, vision_layers=vision_layers, dtype=dtype,
                               attn_implementation=attn_implementation, device=device, seed=seed)
        g = KNOWN_GEOMETRIES[spec]
        inputs = random_inputs(model, n_text=n_text, batch=batch, seed=seed, image_size=g.get("image_size"), grid=g.get("grid"),
                               tiles=g.get("tiles"))
        return model, to_device(inputs, model), g["description"] + " (random weights)"
    if not os.path.isdir(spec):
        raise InputError("--model", f"{spec!r} is neither a known model ({', '.join(MODEL_CHOICES)}) nor a local checkpoint folder")
    if vision_layers is not None:
        raise InputError("--vision-layers", "applies to built geometries only")
    model, _ = load_vlm(spec, dtype=dtype, attn_implementation=attn_implementation, device=device, layers=layers)
    inputs = random_inputs(model, n_text=n_text, batch=batch, seed=seed)
    return model, to_device(inputs, model), f"{spec} ({model.config.model_type}, random text and pixels)"
