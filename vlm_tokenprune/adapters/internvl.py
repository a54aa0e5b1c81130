"""Hugging Face ``InternVLForConditionalGeneration`` (InternVL 3 / 3.5, arXiv 2504.10479, 2508.18265).

An image is a run of ``image_token_id`` placeholders between ``<img>`` / ``</img>``: its dynamic tiles
(448 px crops) and, when there is more than one, a thumbnail of the whole image, each tile
``(side * downsample_ratio)^2`` tokens (256 for InternViT-300M at 448 px / 14 with the 0.5 pixel
shuffle). The model flattens every tile of the batch in order (``pixel_values [n_tiles, 3, H, W]``)
and ``masked_scatter`` fills the placeholders with them, so tile ``k`` of a run is tokens
``k*t .. (k+1)*t - 1``, in raster order of its ``h' x w'`` grid (``pixel_shuffle`` then ``reshape``).

Layout (``VisualLayout``): ``image`` numbers the runs of placeholders of a row (one per image);
every tile, the thumbnail included, is its own ``segment`` (own grid) for spatial criteria; no
newline tokens. The text model (Qwen2 / Qwen2.5 for InternVL 3, Qwen3 for 3.5, Llama) has 1-D
positions and full attention: LLM-site and pre-LLM stages work as on LLaVA.

The vision site is refused: the pixel shuffle after the tower needs every tile's full square patch
grid (it reshapes ``n`` patches to ``sqrt(n) x sqrt(n)``), so tokens cannot leave inside InternViT
without redefining the shuffle; InternViT's layers (``layernorm_before``, ``attention``) also differ
from the CLIP layers the vision-site hooks read.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..compat import attn_implementation
from ..errors import IncompatiblePolicyError, InputError, UnsupportedModelError
from ..registry import ADAPTERS
from .base import (HFAdapter, Seams, VisualLayout, check_decoder_layers, hf_seams, mask_format_for,
                   uses_sliding_window)

SUPPORTED_TEXT_MODELS = ("qwen2", "qwen3", "llama")


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


class InternVLAdapter(HFAdapter):
    """HF InternVL 3 / 3.5 (InternViT + pixel shuffle + Qwen2 / Qwen3 / Llama, full attention)."""

    model_types = ("internvl",)
    # inputs that carry new pixels or precomputed visual features: refused in a chunk appended to a cache
    pixel_inputs = ("pixel_values", "mm_encoder_outputs")
    supports_pre_llm = True  # 1-D position ids: pre_llm stages reduce the language model's input

    # -- structure ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        cfg = model.config
        text = cfg.text_config
        if text.model_type not in SUPPORTED_TEXT_MODELS:
            raise UnsupportedModelError(
                "config.text_config.model_type",
                f"{text.model_type!r} is not supported; supported text backbones: {', '.join(SUPPORTED_TEXT_MODELS)} "
                "(dense decoder layers with full attention)",
            )
        if uses_sliding_window(text):
            raise UnsupportedModelError(
                "config.text_config.use_sliding_window",
                "sliding-window attention layers are not supported; allowed: full attention in every layer "
                "(as in the released InternVL 3 / 3.5 checkpoints)",
            )
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                "config.vision_feature_select_strategy",
                f"{cfg.vision_feature_select_strategy!r} is not supported; allowed: 'default' (CLS dropped before "
                "the pixel shuffle, as in the released checkpoints)",
            )
        check_decoder_layers(model.model.language_model.layers, "Qwen2")
        mask_format_for(attn_implementation(text))

    def seams(self, model: nn.Module) -> Seams:
        return hf_seams(model, model.model.language_model)

    def vision_seams(self, model: nn.Module, where: str = "site"):
        """Refused: see the module docstring."""
        raise IncompatiblePolicyError(
            where,
            "site vision is not supported for 'internvl': the pixel shuffle after InternViT needs every tile's full "
            "square patch grid, so tokens cannot leave inside the tower; allowed: site llm or pre_llm on this model, "
            "site vision on llava / llava_next",
        )

    # -- visual tokens -----------------------------------------------------------------------
    @staticmethod
    def tile_shape(model: nn.Module, kwargs: dict) -> tuple[int, int]:
        """(h', w') LLM tokens of one tile: from ``pixel_values`` (or the precomputed features), else the config."""
        cfg = model.config
        ph, pw = _pair(cfg.vision_config.patch_size)
        enc = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        feats = getattr(enc, "pooler_output", None)
        pixels = kwargs.get("pixel_values")
        if pixels is None and feats is not None:
            side = math.isqrt(int(feats.shape[1]))
            return side, side
        H, W = (int(pixels.shape[-2]), int(pixels.shape[-1])) if pixels is not None else _pair(cfg.vision_config.image_size)
        r = cfg.downsample_ratio
        return int(H // ph * r), int(W // pw * r)

    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> VisualLayout:
        device = input_ids.device
        ids = input_ids.cpu()
        B, L = ids.shape
        is_visual = ids == model.config.image_token_id
        item = torch.full((B, L), -1, dtype=torch.long)
        segment, row, col = item.clone(), item.clone(), item.clone()
        if bool(is_visual.any()):
            h, w = self.tile_shape(model, kwargs)
            t = h * w
            for b in range(B):
                pos = torch.nonzero(is_visual[b]).flatten()
                # runs of consecutive placeholders: one image each (its tiles and thumbnail)
                starts = [0] + [i for i in range(1, len(pos)) if int(pos[i]) != int(pos[i - 1]) + 1]
                bounds = list(zip(starts, starts[1:] + [len(pos)]))
                seg = 0
                for n_img, (a, e) in enumerate(bounds):
                    if (e - a) % t:
                        raise InputError(
                            "input_ids",
                            f"row {b}: a run of {e - a} image placeholder tokens is not a whole number of tiles of "
                            f"{t} tokens ({h} x {w} after the pixel shuffle); every image needs {t} placeholders per tile",
                        )
                    p = pos[a:e]
                    k = torch.arange(e - a)
                    item[b, p] = n_img
                    segment[b, p] = seg + k // t
                    row[b, p] = (k % t) // w
                    col[b, p] = k % w
                    seg += (e - a) // t
        return VisualLayout(is_visual.to(device), item.to(device), segment.to(device), row.to(device), col.to(device),
                            torch.zeros_like(is_visual, device=device), True)


ADAPTERS.register("internvl", InternVLAdapter())
