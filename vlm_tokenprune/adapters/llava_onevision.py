"""Hugging Face ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision, arXiv 2408.03326).

Same family as LLaVA-NeXT: a SigLIP tower, a base grid per image, then the anyres crops as one
unpadded grid whose rows each end in an ``image_newline`` token. OneVision differs in three ways
that the layout follows by running the model's OWN ``pack_image_features`` on a one-channel
marker tensor (0 = patch, 1 = newline), so every size rule comes from transformers itself:

- ``anyres_max_N``: an unpadded grid larger than N crops is bilinearly resized (fewer rows / cols);
- an image that is not tiled (several images in one sample, ``batch_num_images``, or an image that
  fits one crop) is its base grid followed by ONE ``image_newline`` token;
- a video is its frames, each pooled to a ``ceil(side / 2) x ceil(side / 2)`` grid, then one
  ``image_newline`` token; placeholders are ``video_token_id``.

``generate()`` on transformers >= 5.2x passes precomputed ``mm_encoder_outputs`` instead of pixels:
then the newline tokens are the feature rows equal to the model's ``image_newline`` vector.

Layout (``VisualLayout``): ``image`` numbers the visual items (images and videos) of a row in
prompt order; segments: an image's base grid, its anyres grid (when tiled), each video frame;
newline tokens have row / col -1 and ``is_newline``. The LLM (Qwen2) has 1-D positions and full
attention: LLM-site and pre-LLM stages work as on LLaVA-NeXT. The vision site runs CLS-free rules only
(VisPruner's SigLIP variant; SigLIP has no CLS, so VisionZip / FlowCut's ViT stage are refused by name, and
MCTF too), per crop; an image that ``anyres_max_N`` resizes after the tower keeps all its tokens (its packed
tokens mix neighbouring patches): see ``vision_seams``. Videos are refused at the vision site.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..compat import attn_implementation
from ..errors import IncompatiblePolicyError, InputError, UnsupportedModelError
from ..registry import ADAPTERS
from .base import (HFAdapter, Seams, VisionSeams, VisualLayout, check_decoder_layers, hf_seams, mask_format_for,
                   uses_sliding_window)

SUPPORTED_TEXT_MODELS = ("qwen2", "llama", "mistral")

# coords columns of one item's tokens: segment within the item, row, col (newline: row -1, col -2)
_NEWLINE = (-1, -2)


class LlavaOnevisionAdapter(HFAdapter):
    """HF LLaVA-OneVision (SigLIP + Qwen2): images (anyres_max) and videos (pooled frames)."""

    model_types = ("llava_onevision",)
    # inputs that carry new pixels or precomputed visual features: refused in a chunk appended to a cache
    pixel_inputs = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")
    supports_pre_llm = True  # 1-D position ids: pre_llm stages reduce the language model's input

    # -- structure ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        text = model.config.text_config
        if text.model_type not in SUPPORTED_TEXT_MODELS:
            raise UnsupportedModelError(
                "config.text_config.model_type",
                f"{text.model_type!r} is not supported; supported text backbones: {', '.join(SUPPORTED_TEXT_MODELS)}",
            )
        if uses_sliding_window(text):
            raise UnsupportedModelError(
                "config.text_config.use_sliding_window",
                "sliding-window attention layers are not supported; allowed: full attention in every layer "
                "(as in the released LLaVA-OneVision checkpoints)",
            )
        check_decoder_layers(model.model.language_model.layers, "Qwen2")
        mask_format_for(attn_implementation(text))

    def seams(self, model: nn.Module) -> Seams:
        return hf_seams(model, model.model.language_model)

    vision_no_cls = "the SigLIP tower has no CLS token"

    def vision_seams(self, model: nn.Module, where: str = "site") -> VisionSeams:
        """SigLIP for vision-site stages with a CLS-free rule (VisPruner's official SigLIP variant), per crop (the
        base image and each anyres crop); the model's own ``pack_image_features`` maps kept patches to placeholders
        (as on LLaVA-NeXT). The stage marks dropped patches (``VisionSeams.mask_only``): an image whose unpadded grid
        ``pack_image_features`` bilinearly resizes (``anyres_max_N``: its packed tokens mix patches, found by packing
        index features) keeps all its tokens, the row is relaxed (``kept_all`` in the trace; ``strict=True``:
        ``InputError``). Videos (frames pooled after the tower) are refused by name at call time."""
        cfg = model.config
        vc = cfg.vision_config
        if vc.model_type != "siglip_vision_model":
            raise IncompatiblePolicyError(
                where, f"site vision on 'llava_onevision' needs its SigLIP tower, got {vc.model_type!r}; "
                "allowed: siglip_vision_model")
        if cfg.vision_feature_select_strategy != "full":
            raise IncompatiblePolicyError(
                where, f"config.vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} drops a SigLIP "
                "patch (the tower has no CLS); allowed at site vision: 'full'")
        tower = model.model.vision_tower
        layers = tuple(getattr(tower, "vision_model", tower).encoder.layers)
        layer, n = cfg.vision_feature_layer, len(layers)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer <= n or layer in (0, -n - 1):
            raise IncompatiblePolicyError(
                where, f"config.vision_feature_layer={layer!r} is not supported at site vision; allowed: one integer "
                f"layer in 1..{n} or -{n}..-1")
        side = vc.image_size // vc.patch_size
        return VisionSeams(
            tower=tower, layers=layers, feature_layer=n + layer if layer < 0 else layer - 1,
            select_strategy="default",  # the hooks' virtual CLS row is dropped before the projector
            n_patches=side * side, projector=model.model.multi_modal_projector,
            attn_implementation=attn_implementation(vc), pack_owner=model.model, cls_token=False, mask_only=True,
            refuse_calls=(("get_video_features", "pixel_values_videos", "video",
                           "a video's frames are pooled (bilinear 2x) after the tower, a layout no vision-site stage "
                           "maps; allowed: images with a site-vision policy, videos with site llm or pre_llm"),))

    # -- visual tokens -----------------------------------------------------------------------
    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> VisualLayout:
        cfg = model.config
        device = input_ids.device
        ids = input_ids.cpu()
        B, L = ids.shape
        kinds = (("image", cfg.image_token_id), ("video", cfg.video_token_id))
        is_visual = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
        item = torch.full((B, L), -1, dtype=torch.long)
        segment, row, col = item.clone(), item.clone(), item.clone()
        coords_known = True
        if bool(is_visual.any()):
            per_row: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in range(B)]  # (first, n_segments, pos)
            for kind, tok in kinds:
                mask = ids == tok
                n_tokens = int(mask.sum())
                if n_tokens == 0:
                    continue
                items = _image_items(model, kwargs) if kind == "image" else _video_items(model, kwargs)
                if items is None:  # no pixels and no features: only the token order is known
                    coords_known = False
                    items_per_row = [c for c in (int(mask[b].sum()) for b in range(B)) if c]
                    items = [torch.tensor([[0, -1, -1]] * c) for c in items_per_row]
                total = sum(int(c.shape[0]) for c in items)
                if total != n_tokens:
                    raise InputError(
                        "input_ids",
                        f"{n_tokens} {kind} placeholder tokens but the {kind}s give {total} features; "
                        "the prompt must hold exactly one placeholder per feature",
                    )
                j = 0  # features fill the placeholders in batch order, row by row, left to right (masked_scatter)
                for b in range(B):
                    pos = torch.nonzero(mask[b]).flatten()
                    i = 0
                    while i < len(pos):
                        c = items[j]
                        n = int(c.shape[0])
                        if i + n > len(pos):
                            raise InputError(
                                "input_ids",
                                f"{kind} {j} needs {n} placeholder tokens but row {b} holds only {len(pos) - i} more; "
                                f"every {kind} must lie within one row",
                            )
                        p = pos[i:i + n]
                        segment[b, p], row[b, p], col[b, p] = c[:, 0], c[:, 1], c[:, 2]
                        per_row[b].append((int(p[0]), int(c[:, 0].max()) + 1, p))
                        i += n
                        j += 1
            for b in range(B):  # number items and segments per row in prompt order (images and videos together)
                base = 0
                for n_item, (_, n_seg, p) in enumerate(sorted(per_row[b], key=lambda x: x[0])):
                    item[b, p] = n_item
                    segment[b, p] += base
                    base += n_seg
        is_newline = is_visual & (col == _NEWLINE[1])
        row = torch.where(is_newline, torch.full_like(row, -1), row)
        col = torch.where(is_newline, torch.full_like(col, -1), col)
        if not coords_known:
            row, col = torch.full_like(row, -1), torch.full_like(col, -1)
            is_newline = torch.zeros_like(is_visual)
        return VisualLayout(is_visual.to(device), item.to(device), segment.to(device), row.to(device), col.to(device),
                            is_newline.to(device), coords_known)


def _coords_from_marks(is_nl: list[bool], side: int) -> torch.Tensor:
    """``[n, 3]`` (segment, row, col) of one image's packed tokens: the base ``side x side`` grid first
    (segment 0), then the anyres grid (segment 1) whose rows end at newline tokens; a newline right after
    the base grid (an image that is not tiled) belongs to segment 0."""
    n = len(is_nl)
    c = torch.full((n, 3), -1, dtype=torch.long)
    base = min(side * side, n)
    k = torch.arange(base)
    c[:base, 0], c[:base, 1], c[:base, 2] = 0, k // side, k % side
    tiled = any(not m for m in is_nl[base:])
    r = cc = 0
    for t in range(base, n):
        c[t, 0] = 1 if tiled else 0
        if is_nl[t]:
            c[t, 1], c[t, 2] = _NEWLINE
            r, cc = r + 1, 0
        else:
            c[t, 1], c[t, 2] = r, cc
            cc += 1
    return c


def _image_items(model: nn.Module, kwargs: dict) -> list[torch.Tensor] | None:
    """Per image of the batch, in order: its tokens' (segment, row, col); None when unknown."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    pixels, sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
    if pixels is not None and sizes is not None:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        per_sample = kwargs.get("batch_num_images")
        sizes_list = torch.as_tensor(sizes).cpu().tolist()
        if per_sample is None:
            tile = [True] * len(sizes_list)
        else:
            tile = [int(n) == 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(int(n))]
        n_patches = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                               patch_size=cfg.vision_config.image_size) if t else 1
                     for s, t in zip(sizes_list, tile)]
        marks = [torch.zeros(n, side * side, 1) for n in n_patches]
        aspect = kwargs.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
        packed, _ = model.model.pack_image_features(marks, torch.as_tensor(sizes).cpu(), image_newline=torch.ones(1),
                                                    vision_aspect_ratio=aspect)
        return [_coords_from_marks((p[:, 0] == 1).tolist(), side) for p in packed]
    enc = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    feats = getattr(enc, "pooler_output", None)
    if feats is None:
        return None
    newline = model.model.image_newline
    return [_coords_from_marks((f == newline.to(f.device, f.dtype)).all(-1).tolist(), side) for f in feats]


def _video_items(model: nn.Module, kwargs: dict) -> list[torch.Tensor] | None:
    """Per video of the batch: frames of ``g x g`` pooled tokens (one segment each), then one newline."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    g = math.ceil(side / 2)
    videos = kwargs.get("pixel_values_videos")
    if videos is not None:
        frames = [int(videos.shape[1])] * int(videos.shape[0])
    else:
        enc = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        feats = getattr(enc, "pooler_output", None)
        if feats is None:
            return None
        frames = [(int(f.shape[0]) - 1) // (g * g) for f in feats]
    out = []
    for t in frames:
        k = torch.arange(t * g * g)
        c = torch.stack([k // (g * g), (k % (g * g)) // g, k % g], dim=1)
        out.append(torch.cat([c, torch.tensor([[t - 1, *_NEWLINE]])]))
    return out


ADAPTERS.register("llava_onevision", LlavaOnevisionAdapter())
