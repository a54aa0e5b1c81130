"""Prefill profiler: measured latency, time to first token and peak memory of patched vs unpatched prefills.

    from vlm_tokenprune.eval import profiler
    report = profiler.profile("llava-1.5-7b", ["fastv:layer=2,keep=0.25"], layers=2, vision_layers=1)
    profiler.print_report(report)

Models (``load_model``): the shipped trained tiny LLaVA (``"tiny"``), a known geometry built with
random weights from its config (``KNOWN_GEOMETRIES``: no download; ``layers`` / ``vision_layers``
shrink it to fit a CPU), or a local Hugging Face checkpoint directory (``AutoModelForImageTextToText``).
Inputs are one prompt row repeated ``batch`` times: ``n_text`` random text tokens around the image
placeholders (random pixels) for built or local models; synthetic test-split questions for ``"tiny"``.

Protocol (per policy, on one model): warm-up, then ``iters`` iterations, each running one baseline and
one patched call, order alternating every iteration (drift cancels); ``patch()`` / ``unpatch()`` stay
outside the timer; one ``gc.collect()`` before the loop and the cyclic collector off during it (as
``timeit`` does). Three things are timed, each interleaved that way:

- ``prefill``: the language-model prefill. Image features are computed once and passed as
  ``mm_encoder_outputs`` (what ``generate()`` does), so a call runs the embedding, the feature scatter,
  every decoder layer and the LM head on the last token (``logits_to_keep=1``). The patch's own work
  (layout, scoring, selection, gathers) is inside the timer. FLOPs refer to this call.
- ``ttft``: time to first token, ``generate(max_new_tokens=1)`` from pixels (vision tower included).
- ``forward`` (``parts=True``): one forward from pixels, split by forward hooks (``PartsCall``) into
  ``vision`` (vision tower + projector), ``llm`` (the language model, a pre-LLM reduction included)
  and ``other`` (embedding, feature scatter, patch bookkeeping, LM head), each with its ratio vs the
  baseline: vision-site methods shrink ``vision``, LLM-site ones ``llm``.

Timers: CUDA events (after a synchronize) on GPU, ``time.perf_counter`` on CPU. Peak memory:
``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak resident set size (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` before each measured prefill, with glibc's mmap
threshold fixed at 64 KiB during the measurement so freed tensors leave the RSS); ``tracemalloc`` is
not used because it does not see PyTorch's allocator. Both are reported above the memory in use
just before the call (``peak_memory_bytes``) and in absolute terms.
"""
from __future__ import annotations

import gc
import inspect
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import compat
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
        dev = _cpu_name()
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


def _cpu_name() -> str:
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
    if g["family"] in ("llava_onevision", "internvl", "qwen3_vl"):
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
                                  f"qwen2_5_vl, qwen3_vl, qwen3_vl_moe; got {cfg.model_type!r}")
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


# -- timing and memory ---------------------------------------------------------------------------
def make_timer(device: torch.device) -> tuple[Callable[[Callable[[], Any]], float], str]:
    """``(time(fn) -> seconds, name)``: CUDA events on GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        return cuda_time, "cuda_events"

    def cpu_time(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return cpu_time, "perf_counter"


def summary(seconds: Sequence[float]) -> dict:
    """Median and spread of a list of durations, in milliseconds."""
    ms = sorted(1e3 * s for s in seconds)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median": statistics.median(ms), "p25": q[0], "p75": q[2], "min": ms[0], "max": ms[-1],
            "mean": statistics.fmean(ms), "stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0, "n": len(ms),
            "samples": [1e3 * s for s in seconds]}


def interleaved(model, policy, calls: dict[str, Callable[[], Any]], *, iters: int, warmup: int, device,
                backend: str = "auto") -> dict:
    """Time each of ``calls`` (name -> zero-argument callable) unpatched and patched with ``policy``,
    interleaved: per iteration and call, one baseline and one patched run, order alternating.

    Returns ``{name: {"baseline": [s...], "patched": [s...]}, "trace": last prefill trace of the
    first call, "stage_seconds": [per patched run of the first call: sum of trace stage seconds]}``;
    a ``PartsCall`` also gives ``"baseline_parts"`` / ``"patched_parts"``: ``{part: [s...]}``.
    """
    from .. import patch

    timer, _ = make_timer(resolve_device(device))
    pol = Policy.parse(policy)
    out: dict = {name: {"baseline": [], "patched": []} for name in calls}
    first = next(iter(calls))
    stage_seconds: list[float] = []
    trace = None

    def timed(fn, patched):
        if isinstance(fn, LMPrefillCall):
            fn.prepare(pol if patched else None)  # outside the timer: image features from the (patched) tower
        if not isinstance(fn, PartsCall):
            return timer(fn), None
        fn.install()  # after patch(): its pre-hooks run first and its hooks last, around the patch's own
        try:
            return timer(fn), fn.parts()
        finally:
            fn.remove()

    def run(name, patched, record):
        nonlocal trace
        fn = calls[name]
        if not patched:
            dt, parts = timed(fn, False)
        else:
            handle = patch(model, pol, backend=backend)
            try:
                dt, parts = timed(fn, True)
                if name == first:
                    tr = handle.last_trace()
                    if record:
                        stage_seconds.append(sum(s.seconds for s in tr.stages))
                    trace = tr
            finally:
                handle.unpatch()
        if record:
            kind = "patched" if patched else "baseline"
            out[name][kind].append(dt)
            for part, seconds in (parts or {}).items():
                out[name].setdefault(f"{kind}_parts", {}).setdefault(part, []).append(seconds)

    gc.collect()  # once: a full collection costs ~0.1-0.3 s with transformers loaded; none inside the loop
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad():
            for _ in range(warmup):
                for name in calls:
                    run(name, False, False), run(name, True, False)
            for i in range(iters):
                for name in calls:
                    for patched in ((False, True) if i % 2 == 0 else (True, False)):
                        run(name, patched, True)
    finally:
        if was_enabled:
            gc.enable()
    out["trace"] = trace
    out["stage_seconds"] = stage_seconds
    return out


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated (reset before each call)"
    if _status_bytes("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK):
        return ("process peak RSS: Linux VmHWM reset via /proc/self/clear_refs before each call, glibc mmap "
                "threshold fixed at 64 KiB during the measurement (tracemalloc does not see PyTorch's allocator)")
    return "unavailable (needs CUDA, or Linux /proc/self/clear_refs)"


def peak_memory(fn: Callable[[], Any], device) -> tuple[int | None, int | None]:
    """``(peak above the memory in use before the call, absolute peak)`` in bytes, or ``(None, None)``."""
    device = resolve_device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak - before, peak
    if "unavailable" in memory_method(device):
        return None, None
    with _small_mmap_threshold():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        fn()
        peak = _status_bytes("VmHWM")
    return peak - before, peak


class _small_mmap_threshold:
    """glibc: serve allocations >= 64 KiB by mmap (returned to the OS on free) while measuring, so the RSS
    follows live tensors; afterwards the thresholds go to the large values glibc's own heuristic settles on."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __enter__(self):
        import ctypes

        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)
            self.libc.malloc_trim(0)
        except (OSError, AttributeError):
            self.libc = None
        return self

    def __exit__(self, *exc):
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 64 * 1024 * 1024)


class LMPrefillCall:
    """The language-model prefill: ``model(**lm_inputs, logits_to_keep=1)`` on precomputed image features.

    ``prepare()`` (outside the timer) encodes the pixels again when the model is patched with a
    vision-site stage (its features and kept slots come from the patched tower, as in ``generate()``);
    otherwise the features computed once by the unpatched tower are reused.
    """

    def __init__(self, model, inputs: dict, lm_inputs: dict):
        self.model, self.inputs, self.base, self.lm_inputs = model, inputs, lm_inputs, lm_inputs

    def prepare(self, policy: "Policy | None") -> None:
        """``policy``: the one the model is patched with now (None: unpatched)."""
        vision = policy is not None and any(s.site == "vision" for s in policy.stages)
        self.lm_inputs = encode_images(self.model, self.inputs) if vision else self.base

    def __call__(self):
        return self.model(**self.lm_inputs, logits_to_keep=1)


# -- vision tower vs language model -------------------------------------------------------------
def part_modules(model) -> dict[str, tuple[Any, Any]]:
    """``{part: (first module, last module)}``: ``vision`` = the vision tower up to the projector (LLaVA,
    LLaVA-NeXT: ``vision_tower`` .. ``multi_modal_projector``; Qwen2-VL: ``visual``, its merger included),
    ``llm`` = the language model (decoder layers and final norm; not the LM head)."""
    inner = getattr(model, "model", model)
    parts = {}
    tower = getattr(inner, "vision_tower", None)
    tower = tower if tower is not None else getattr(inner, "visual", None)
    if tower is not None:
        proj = getattr(inner, "multi_modal_projector", None)
        parts["vision"] = (tower, proj if proj is not None else tower)
    lm = getattr(inner, "language_model", None)
    if lm is not None:
        parts["llm"] = (lm, lm)
    return parts


class PartsCall:
    """A zero-argument call whose parts are timed by forward hooks: each part from its first module's
    forward pre-hook (prepended: before any other pre-hook, e.g. a pre-LLM reduction) to its last
    module's forward hook (registered last), summed over the invocations in one call (Qwen2-VL encodes
    images and videos separately); ``other`` = the whole call minus the parts. CUDA events on GPU (read
    after the call's synchronize), ``perf_counter`` on CPU. ``install()`` / ``remove()`` around each call
    (outside the timer), after ``patch()`` so the patch's own hooks lie inside the spans.
    """

    def __init__(self, model, fn: Callable[[], Any], device):
        self.model, self.fn = model, fn
        self.cuda = resolve_device(device).type == "cuda"
        self.modules = part_modules(model)
        self._hooks: list = []
        self._open: dict = {}
        self._spans: dict[str, list] = {}

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def install(self) -> None:
        self._open, self._spans = {}, {name: [] for name in self.modules}
        for name, (first, last) in self.modules.items():
            def start(module, args, name=name):
                self._open.setdefault(name, self._now())  # nested / repeated entries: the outermost start

            def stop(module, args, output, name=name):
                if name in self._open:
                    self._spans[name].append((self._open.pop(name), self._now()))

            self._hooks.append(first.register_forward_pre_hook(start, prepend=True))
            self._hooks.append(last.register_forward_hook(stop))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __call__(self):
        self._t0 = self._now()
        out = self.fn()
        self._t1 = self._now()
        return out

    def parts(self) -> dict[str, float]:
        """Seconds per part of the last call, and ``other``."""
        if self.cuda:
            torch.cuda.synchronize()
            span = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731
        else:
            span = lambda a, b: b - a  # noqa: E731
        out = {name: sum(span(a, b) for a, b in spans) for name, spans in self._spans.items()}
        out["other"] = max(0.0, span(self._t0, self._t1) - sum(out.values()))
        return out


# -- the profile ---------------------------------------------------------------------------------
def profile(model: "str | Any" = "tiny", policies: Sequence[Any] = ("fastv:layer=2,keep=0.25",), *, inputs: dict | None = None,
            iters: int = 20, warmup: int = 2, layers: int | None = None, vision_layers: int | None = None, dtype=None,
            attn_implementation: str = "sdpa", device=None, batch: int = 1, n_text: int = 64, seed: int = 0,
            backend: str = "auto", ttft: bool = True, parts: bool = True,
            json_path: "str | os.PathLike | None" = None) -> dict:
    """Profile ``policies`` against the unpatched model (see the module docstring); returns the report dict.

    ``model``: a spec for :func:`load_model` or an already built model (then pass ``inputs``).
    ``parts``: also time one forward from pixels split into vision tower (+ projector), language
    model and the rest (``PartsCall``), with per-part ratios vs the baseline.
    """
    from .. import patch
    from ..errors import InputError
    from .flops import trace_flops

    if iters < 1 or warmup < 0:
        raise InputError("--iters", f"need iters >= 1 and warmup >= 0, got {iters}, {warmup}")
    if not policies:
        raise InputError("--policy", "give at least one policy")

    pols = parse_all(policies, "--policy")  # every bad policy reported at once, before any model is built
    device = resolve_device(device)
    if isinstance(model, str):
        spec = model
        model, inputs, desc = load_model(spec, layers=layers, vision_layers=vision_layers, dtype=dtype,
                                         attn_implementation=attn_implementation, device=device, seed=seed,
                                         batch=batch, n_text=n_text)
    else:
        if inputs is None:
            raise InputError("inputs", "are required when a model object is given")
        spec, desc = type(model).__name__, type(model).__name__
        inputs = to_device(inputs, model)
    device = model.device
    from ..errors import IncompatiblePolicyError, PolicyError

    fitting, skipped = [], []
    for p in pols:  # validate every policy against the model before timing anything; one that does not fit is
        try:        # reported (report["skipped"]) and the others run
            h = patch(model, p, backend=backend)
        except PolicyError as e:
            skipped.append({"policy": p.to_string(), "error": str(e)})
            continue
        fitting.append(h.policy)  # resolved for this model (a preset's paper layers mapped: Policy.at_depth)
        h.unpatch()
    if not fitting:
        raise IncompatiblePolicyError("--policy", "no policy fits this model: " + "; ".join(s["error"] for s in skipped))
    pols = fitting

    lm_inputs = encode_images(model, inputs)
    ids = inputs["input_ids"]
    tok = getattr(model.config, "image_token_id", None)
    vis_ids = {tok, getattr(model.config, "video_token_id", None)} - {None}
    n_visual = int(sum((ids[0] == t).sum() for t in vis_ids))
    prompt_len = int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else ids.shape[1]
    calls: dict[str, Callable[[], Any]] = {"prefill": LMPrefillCall(model, inputs, lm_inputs)}
    if ttft:
        gen = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=model.config.text_config.pad_token_id)
        calls["ttft"] = lambda: model.generate(**inputs, **gen)
    if parts:
        calls["forward"] = PartsCall(model, lambda: model(**inputs, logits_to_keep=1), device)
    tc = model.config.text_config

    def prefill_memory(patched_policy):
        h = patch(model, patched_policy, backend=backend) if patched_policy is not None else None
        try:
            with torch.no_grad():
                calls["prefill"].prepare(patched_policy)
                return peak_memory(calls["prefill"], device)
        finally:
            if h is not None:
                h.unpatch()

    base_mem = prefill_memory(None)
    rows = []
    for pol in pols:
        r = interleaved(model, pol, calls, iters=iters, warmup=warmup, device=device, backend=backend)
        tr = r["trace"]
        fl = trace_flops(model.config, tr, policy=pol)
        pre_b, pre_p = summary(r["prefill"]["baseline"]), summary(r["prefill"]["patched"])
        measured = pre_p["median"] / pre_b["median"]
        mem = prefill_memory(pol)
        row = {
            "policy": pol.to_string(), "policy_dict": pol.to_dict(),
            "tokens_per_layer": tr.tokens_per_layer,
            "kept_visual_per_stage": [s.visual_after for s in tr.stages],
            "baseline_prefill_ms": pre_b, "prefill_ms": pre_p,
            "measured_ratio": measured,
            "measured_ratio_paired_median": statistics.median(
                p / b for p, b in zip(r["prefill"]["patched"], r["prefill"]["baseline"])),
            "predicted_ratio": fl["ratio"], "quotient": fl["ratio"] / measured,
            "flops": fl["flops"], "baseline_flops": fl["baseline_flops"], "scoring_flops": fl["scoring_flops"],
            "scoring_selection_ms": summary(r["stage_seconds"]),
            "overhead_pct_of_baseline": 100 * statistics.median(r["stage_seconds"]) / (pre_b["median"] / 1e3),
            "peak_memory_bytes": mem[0], "peak_memory_abs_bytes": mem[1],
            "baseline_peak_memory_bytes": base_mem[0], "baseline_peak_memory_abs_bytes": base_mem[1],
            "memory_ratio": (mem[0] / base_mem[0]) if mem[0] is not None and base_mem[0] else None,
        }
        if ttft:
            tb, tp = summary(r["ttft"]["baseline"]), summary(r["ttft"]["patched"])
            row.update(baseline_ttft_ms=tb, ttft_ms=tp, ttft_ratio=tp["median"] / tb["median"])
        if parts:
            fb, fp = summary(r["forward"]["baseline"]), summary(r["forward"]["patched"])
            row.update(baseline_forward_ms=fb, forward_ms=fp, forward_ratio=fp["median"] / fb["median"], parts={})
            for part, base_s in r["forward"]["baseline_parts"].items():
                pb, pp = summary(base_s), summary(r["forward"]["patched_parts"][part])
                row["parts"][part] = {"baseline_ms": pb, "patched_ms": pp,
                                      "ratio": pp["median"] / pb["median"] if pb["median"] > 0 else None}
        rows.append(row)

    _, timer_name = make_timer(device)
    report = {
        "model": {"spec": spec, "description": desc, "model_type": model.config.model_type,
                  "text_layers": tc.num_hidden_layers, "hidden_size": tc.hidden_size,
                  "attn_implementation": compat.attn_implementation(tc), "dtype": str(model.dtype).replace("torch.", "")},
        "prompt": {"batch": int(ids.shape[0]), "length": prompt_len, "n_visual": n_visual, "n_text": prompt_len - n_visual},
        "protocol": {"iters": iters, "warmup": warmup, "timer": timer_name, "interleaved": True,
                     "prefill": "LM prefill, image features precomputed (mm_encoder_outputs), logits_to_keep=1",
                     "ttft": "generate(max_new_tokens=1) from pixels" if ttft else None,
                     "forward": ("one forward from pixels (logits_to_keep=1), split by forward hooks: vision = vision "
                                 "tower pre-hook .. projector hook, llm = language-model pre-hook .. hook (pre-LLM "
                                 "reduction included, LM head not), other = the rest (embedding, feature scatter, "
                                 "patch bookkeeping, LM head)") if parts else None,
                     "memory": memory_method(device), "backend": backend},
        "environment": environment(device),
        "policies": rows,
        "skipped": skipped,  # policies that do not fit this model: {"policy", "error"}
    }
    if json_path is not None:
        import json

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def format_report(report: dict) -> str:
    """The printed table of a :func:`profile` report."""
    m, p, pr = report["model"], report["prompt"], report["protocol"]
    lines = [
        f"model: {m['description']}",
        f"  {m['model_type']}, {m['text_layers']} text layers, hidden {m['hidden_size']}, {m['attn_implementation']}, {m['dtype']}",
        f"prompt: batch {p['batch']} x ({p['n_text']} text + {p['n_visual']} visual = {p['length']} tokens)",
        f"protocol: warm-up {pr['warmup']}, {pr['iters']} interleaved runs each, timer {pr['timer']}; "
        f"device {report['environment']['device']} ({report['environment']['device_name']})",
        f"memory: {pr['memory']}",
        "",
    ]
    header = ["policy", "base ms", "patched ms (p25-p75)", "measured", "predicted", "quotient", "overhead %",
              "TTFT ratio", "peak MB (base)", "tokens/layer"]
    rows = []
    for r in report["policies"]:
        pre = r["prefill_ms"]
        tpl = r["tokens_per_layer"]
        rows.append([
            r["policy"], f"{r['baseline_prefill_ms']['median']:.2f}",
            f"{pre['median']:.2f} ({pre['p25']:.2f}-{pre['p75']:.2f})", f"{r['measured_ratio']:.3f}",
            f"{r['predicted_ratio']:.3f}", f"{r['quotient']:.3f}", f"{r['overhead_pct_of_baseline']:.2f}",
            f"{r['ttft_ratio']:.3f}" if "ttft_ratio" in r else "-",
            f"{_mb(r['peak_memory_bytes'])} ({_mb(r['baseline_peak_memory_bytes'])})",
            f"{tpl[0]} -> {tpl[-1]}",
        ])
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines += [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    lines += [f"skipped (does not fit this model): {s['policy']}: {s['error']}" for s in report.get("skipped", [])]
    lines += ["", "measured = median patched / median baseline LM prefill; predicted = FLOPs ratio (eval/flops.py, "
              "this run's tokens per layer); quotient = predicted / measured (1.0: as fast as the FLOPs say); "
              "overhead = scoring + selection (trace stage seconds) as % of the baseline prefill"]
    if any("parts" in r for r in report["policies"]):
        lines += ["", *format_parts(report)]
    return "\n".join(lines)


def format_parts(report: dict) -> list[str]:
    """Lines of the per-part table (one forward from pixels): median ms baseline -> patched (ratio)."""
    names = [n for n in ("vision", "llm", "other") if any(n in r.get("parts", {}) for r in report["policies"])]
    header = ["policy", "forward ms (ratio)", *[f"{n} ms (ratio)" for n in names]]
    rows = []
    for r in report["policies"]:
        if "parts" not in r:
            continue
        cells = [r["policy"], f"{r['baseline_forward_ms']['median']:.2f} -> {r['forward_ms']['median']:.2f} "
                              f"({r['forward_ratio']:.3f})"]
        for n in names:
            p = r["parts"].get(n)
            cells.append("-" if p is None else f"{p['baseline_ms']['median']:.2f} -> {p['patched_ms']['median']:.2f} "
                                               f"({'n/a' if p['ratio'] is None else format(p['ratio'], '.3f')})")
        rows.append(cells)
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return ["parts of one forward from pixels (median ms, baseline -> patched, ratio):", fmt(header),
            fmt(["-" * w for w in widths]), *map(fmt, rows),
            "vision = vision tower + projector; llm = language model (pre-LLM reduction included); "
            "other = embedding, feature scatter, patch bookkeeping, LM head"]
