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

Vision site (``vision.groups``): the pixel shuffle after the tower needs every tile's full square patch
grid, and each LLM token packs a GROUP of ``(1 / downsample_ratio)^2`` patches (2 x 2; which ones, and in
which channel order, is found by running the model's own ``pixel_shuffle`` on index-coded features:
``shuffle_groups``). So a vision stage here selects whole groups: a group's score is the SUM of its
patches' scores under the method's criterion (CLS attention: InternViT has a CLS token), its feature / key
the concatenation of its patches' (the shuffled token); a budget (``tokens`` / ``keep``) counts LLM tokens
(groups) per tile, every tile (the thumbnail included) a crop of its own. The reduced feature-layer output
goes back onto the full grid (dropped groups zero), the model's own shuffle packs it, the projector's
pre-hook keeps the kept groups' tokens, and the language model receives only those (placeholders of
dropped groups removed, positions per the stage's ``positions``). FlowCut's ViT stage prunes and MCTF fuses
whole groups inside the tower (later InternViT layers run on the kept groups' patches; MCTF's proportional
attention reaches each layer's ``attention`` module, InternViT layers taking no mask: ``bias_in_attention``);
a criterion without ``VisionCriterion.whole_groups`` is refused by name.
InternViT's layers are read through the seams: ``attention`` (not ``self_attn``), q / k after its
``q_norm`` / ``k_norm``.
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

SUPPORTED_TEXT_MODELS = ("qwen2", "qwen3", "llama")


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def shuffle_groups(model: nn.Module, side: int) -> torch.Tensor:
    """``[G, g]``: the patches (0-based raster index in the tile's ``side x side`` grid) each LLM token packs, in
    channel-block order, found by running the model's own ``pixel_shuffle`` (with ``get_image_features``'
    reshapes) on index-coded features: patch ``p``'s channel ``c`` holds ``(p, c)``. Raises
    ``UnsupportedModelError`` unless every output token is whole channel blocks of single patches."""
    D = 2  # two channels: an interleaving of channels across patches would show
    p = torch.arange(side * side, dtype=torch.float64)
    feats = torch.stack([p * D + c for c in range(D)], dim=-1)[None]  # [1, N, D]: code = p * D + c
    with torch.no_grad():
        out = model.model.pixel_shuffle(feats.reshape(1, side, side, D), scale_factor=model.config.downsample_ratio)
    out = out.reshape(-1, out.shape[-1]).round().long()  # [G, g * D]
    g = out.shape[1] // D
    blocks = out.view(out.shape[0], g, D)
    groups = blocks[..., 0] // D
    whole = torch.equal(blocks % D, torch.arange(D).expand_as(blocks)) and torch.equal(
        blocks // D, groups[..., None].expand_as(blocks))
    if not (whole and sorted(groups.flatten().tolist()) == list(range(side * side))):
        raise UnsupportedModelError("model.model.pixel_shuffle", "its output tokens are not whole channel blocks of "
                                    "single patches, so whole groups of patches cannot be kept; allowed: InternVL's "
                                    "pixel shuffle (each LLM token concatenates the features of a block of patches)")
    return groups


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

    def vision_seams(self, model: nn.Module, where: str = "site") -> VisionSeams:
        """InternViT for vision-site stages that keep whole pixel-shuffle groups (see the module docstring)."""
        cfg = model.config
        vc = cfg.vision_config
        tower = model.model.vision_tower
        layers = tuple(tower.encoder.layer)
        n = len(layers)
        layer = cfg.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer <= n or layer in (0, -n - 1):
            raise IncompatiblePolicyError(
                where, f"config.vision_feature_layer={layer!r} is not supported at site vision; allowed: one integer "
                f"layer in 1..{n} or -{n}..-1")
        (h, w), (ph, pw) = _pair(vc.image_size), _pair(vc.patch_size)
        if h != w or ph != pw:
            raise IncompatiblePolicyError(
                where, f"site vision needs square tiles of square patches, got image_size {vc.image_size} and "
                f"patch_size {vc.patch_size}; allowed: equal sides (the released InternVL checkpoints)")
        attn = layers[0].attention
        return VisionSeams(
            tower=tower, layers=layers, feature_layer=n + layer if layer < 0 else layer - 1,
            select_strategy=cfg.vision_feature_select_strategy, n_patches=(h // ph) ** 2,
            projector=model.model.multi_modal_projector, attn_implementation=attn_implementation(vc),
            attention_name="attention",
            # the q / k the attention multiplies are the outputs of q_norm / k_norm (nn.Identity without qk norm)
            projections=(("q", "q_norm" if hasattr(attn, "q_norm") else "q_proj"),
                         ("k", "k_norm" if hasattr(attn, "k_norm") else "k_proj"), ("v", "v_proj")),
            groups=shuffle_groups(model, h // ph), attention_norm="layernorm_before", bias_in_attention=True)

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
