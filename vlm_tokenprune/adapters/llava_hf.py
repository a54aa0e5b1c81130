"""Hugging Face ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration``.

Visual tokens are the ``image_token_id`` placeholders of ``input_ids`` (never fixed
offsets). Their grid coordinates come from the vision config (LLaVA-1.5) or, for
LLaVA-NeXT anyres, from running the model's own ``pack_image_features`` on a tensor of
coordinates instead of features, so base grid, unpadded crops and ``image_newline``
tokens line up with the real features by construction.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import IncompatiblePolicyError, InputError, UnsupportedModelError
from ..registry import ADAPTERS
from ..compat import attn_implementation
from .base import HFAdapter, VisionSeams, VisualLayout, uses_sliding_window

SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")


class LlavaHFAdapter(HFAdapter):
    """HF LLaVA-1.5 and LLaVA-NeXT with Llama / Mistral / Vicuna / Qwen2 text backbones."""

    model_types = ("llava", "llava_next")

    # -- structure ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        cfg = model.config
        text = cfg.text_config
        if text.model_type not in SUPPORTED_TEXT_MODELS:
            raise UnsupportedModelError(
                "config.text_config.model_type",
                f"{text.model_type!r} is not supported; supported text backbones: {', '.join(SUPPORTED_TEXT_MODELS)}",
            )
        if uses_sliding_window(text):
            raise UnsupportedModelError(
                "config.text_config.sliding_window",
                "sliding-window attention layers are not supported yet; allowed: full attention in every layer",
            )
        if cfg.model_type == "llava_next" and cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                "config.vision_feature_select_strategy",
                f"LLaVA-NeXT with {cfg.vision_feature_select_strategy!r} is not supported; allowed: 'default'",
            )
        self.check_text_layers(model)

    def vision_seams(self, model: nn.Module, where: str = "site") -> VisionSeams:
        """The CLIP tower for vision-site stages; ``IncompatiblePolicyError`` naming ``where`` otherwise."""
        cfg = model.config
        tower = model.model.vision_tower
        vc = cfg.vision_config
        if vc.model_type != "clip_vision_model":
            raise IncompatiblePolicyError(
                where, f"vision-site stages need a CLIP vision tower (CLS token, q/k/v projections), got {vc.model_type!r}; "
                "allowed: clip_vision_model")
        layer = cfg.vision_feature_layer
        n = vc.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer <= n or layer in (0, -n - 1):
            raise IncompatiblePolicyError(
                where, f"config.vision_feature_layer={layer!r} is not supported at site vision; allowed: one integer "
                f"layer in 1..{n} or -{n}..-1")
        feature = n + layer if layer < 0 else layer - 1  # hidden_states[i] is the output of encoder layer i - 1
        return VisionSeams(
            tower=tower, layers=tuple(getattr(tower, "vision_model", tower).encoder.layers), feature_layer=feature,
            select_strategy=cfg.vision_feature_select_strategy, n_patches=(vc.image_size // vc.patch_size) ** 2,
            projector=model.model.multi_modal_projector, attn_implementation=attn_implementation(vc),
            pack_owner=model.model if cfg.model_type == "llava_next" else None,
        )

    # -- visual tokens -----------------------------------------------------------------------
    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> VisualLayout:
        cfg = model.config
        is_visual = input_ids == cfg.image_token_id
        n_visual = int(is_visual.sum())
        if n_visual == 0:
            empty = torch.full_like(input_ids, -1)
            return VisualLayout(is_visual, empty, empty, empty, empty.clone(), torch.zeros_like(is_visual))
        if cfg.model_type == "llava_next":
            coords = self._next_coords(model, kwargs)
        else:
            coords = self._llava_coords(cfg, n_visual, input_ids.device)
        coords_known = coords is not None
        if coords is None:  # unknown grid: only the token order is known
            coords = torch.full((n_visual, 4), -1, dtype=torch.long, device=input_ids.device)
            coords[:, 0] = 0
        if coords.shape[0] != n_visual:
            raise InputError(
                "input_ids",
                f"{n_visual} image tokens but the images give {coords.shape[0]} features; "
                "the prompt must hold exactly one placeholder per visual feature",
            )
        # coords columns: image (global, in batch order), segment (within image), row, col
        flat = torch.full((*input_ids.shape, 4), -1, dtype=torch.long, device=input_ids.device)
        flat[is_visual] = coords.to(input_ids.device)
        image = flat[..., 0]
        # images are filled in batch order; renumber per row so row b's first image is 0
        first = torch.where(is_visual, image, torch.full_like(image, 1 << 30)).min(dim=1, keepdim=True).values
        image = torch.where(is_visual, image - first, image)
        n_seg = 2 if cfg.model_type == "llava_next" else 1
        segment = torch.where(is_visual, image * n_seg + flat[..., 1], flat[..., 1])
        row, col = flat[..., 2], flat[..., 3]
        is_newline = is_visual & (col == -2)
        col = torch.where(is_newline, torch.full_like(col, -1), col)
        row = torch.where(is_newline, torch.full_like(row, -1), row)
        return VisualLayout(is_visual, image, segment, row, col, is_newline, coords_known)

    @staticmethod
    def _llava_coords(cfg, n_visual: int, device) -> torch.Tensor:
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        cls = 1 if cfg.vision_feature_select_strategy == "full" else 0
        per_image = side * side + cls
        if n_visual % per_image:
            raise InputError(
                "input_ids",
                f"{n_visual} image tokens is not a multiple of {per_image} tokens per image "
                f"({side}x{side} patches{' + CLS' if cls else ''})",
            )
        k = torch.arange(n_visual, device=device)
        within = k % per_image - cls
        coords = torch.stack([k // per_image, torch.zeros_like(k), within // side, within % side], dim=1)
        coords[within < 0, 2:] = -1  # CLS token
        return coords

    @staticmethod
    def _next_coords(model: nn.Module, kwargs: dict) -> torch.Tensor | None:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        image_sizes = kwargs.get("image_sizes")
        pixel_values = kwargs.get("pixel_values")
        if image_sizes is None or pixel_values is None:
            return _next_coords_from_features(model, kwargs)
        cfg = model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        per_image = []
        for i, size in enumerate(image_sizes):
            n_patches = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            npw = None
            r = torch.arange(side).view(side, 1).expand(side, side)
            c = torch.arange(side).view(1, side).expand(side, side)
            feats = torch.zeros(n_patches, side * side, 4)
            feats[:, :, 0] = i
            feats[0, :, 1] = 0
            feats[0, :, 2] = r.reshape(-1)
            feats[0, :, 3] = c.reshape(-1)
            if n_patches > 1:
                from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

                _, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for p in range(1, n_patches):
                    ph, pw = divmod(p - 1, npw)
                    feats[p, :, 1] = 1
                    feats[p, :, 2] = (ph * side + r).reshape(-1)
                    feats[p, :, 3] = (pw * side + c).reshape(-1)
            per_image.append(feats)
        newline = torch.tensor([-1.0, 1.0, -1.0, -2.0])  # col == -2 marks image_newline
        packed, _ = model.model.pack_image_features(
            per_image, image_sizes, vision_feature_select_strategy="default", image_newline=newline
        )
        # unpadding drops border rows/cols of the anyres grid: count rows/cols from the first kept one
        packed = [p.round().long() for p in packed]
        for p in packed:
            hires = (p[:, 1] == 1) & (p[:, 3] >= 0)
            if hires.any():
                p[hires, 2] -= p[hires, 2].min()
                p[hires, 3] -= p[hires, 3].min()
        coords = torch.cat(packed, dim=0)
        # the newline token's image index is the image it closes
        img = coords[:, 0].clone()
        nl = coords[:, 3] == -2
        if nl.any():
            owner = torch.cummax(torch.where(nl, torch.zeros_like(img), img), dim=0).values
            coords[nl, 0] = owner[nl]
        return coords


def _next_coords_from_features(model: nn.Module, kwargs: dict) -> torch.Tensor | None:
    """Grid coordinates from packed LLaVA-NeXT features (``generate()`` passes ``mm_encoder_outputs``
    instead of ``pixel_values``/``image_sizes``). The ``image_newline`` rows are the model's own
    newline vector, so they mark the ends of the unpadded anyres rows; the base grid comes first."""
    enc = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    feats = getattr(enc, "pooler_output", None)
    newline = getattr(model.model, "image_newline", None)
    if feats is None or newline is None:
        return None
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    out = []
    for i, f in enumerate(feats):
        is_nl = (f == newline.to(f.device, f.dtype)).all(-1).tolist()
        n = len(is_nl)
        c = torch.full((n, 4), -1, dtype=torch.long)
        c[:, 0] = i
        base = min(side * side, n)
        k = torch.arange(base)
        c[:base, 1], c[:base, 2], c[:base, 3] = 0, k // side, k % side
        r = col = 0
        for t in range(base, n):
            c[t, 1] = 1
            if is_nl[t]:
                c[t, 2], c[t, 3] = -1, -2
                r, col = r + 1, 0
            else:
                c[t, 2], c[t, 3] = r, col
                col += 1
        out.append(c)
    return torch.cat(out).to(kwargs["mm_encoder_outputs"]["image"].pooler_output[0].device) if out else None


ADAPTERS.register("llava", LlavaHFAdapter())
ADAPTERS.register("llava_next", LlavaHFAdapter())
