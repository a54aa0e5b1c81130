"""Every use of transformers internals (private attributes, registries) in one place.

A transformers upgrade that renames one of these touches this file only. Public transformers
API (``AttentionInterface.register``, ``ALL_ATTENTION_FUNCTIONS.get_interface``, the mask
functions) is used where needed; what is private is read or written only here:

- ``config._attn_implementation`` (read) and ``config._attn_implementation_internal`` (the
  attribute behind it, swapped on one model's text config by structural ops);
- ``AttentionInterface._global_mapping`` / ``AttentionMaskInterface._global_mapping`` (looking up
  a backend's mask function; removing a name this library registered — transformers offers no
  ``unregister``).
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

from .errors import UnsupportedModelError


def attn_implementation(config: Any, default: str | None = None) -> str:
    """The attention backend a (sub-)config selects (``eager``, ``sdpa``, ``flash_attention_2``, a registered name);
    ``default`` when the config has none (transformers 4.3x configs may lack it)."""
    return getattr(config, "_attn_implementation", default) if default is not None else config._attn_implementation


def mask_function(attn_implementation: str) -> Callable | None:
    """The mask function transformers builds masks with for this backend (None: not registered)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(attn_implementation)


LEGACY_MASK_FORMATS = {"eager": "float4d", "sdpa": "float4d", "flash_attention_2": "2d"}


def mask_format_for(attn_impl: str) -> str:
    """Which mask layout a registered attention backend receives (see transformers ``masking_utils``).

    transformers 4.3x (no ``masking_utils``; the original LLaVA code base's 4.36): eager and sdpa
    modules take additive float 4-D masks, flash-attention-2 a 2-D padding mask."""
    try:
        from transformers.masking_utils import eager_mask, flash_attention_mask, sdpa_mask
    except ImportError:  # transformers 4.3x
        if attn_impl not in LEGACY_MASK_FORMATS:
            raise UnsupportedModelError(
                "attn_implementation", f"{attn_impl!r} is not supported on this transformers version; allowed: "
                f"{', '.join(LEGACY_MASK_FORMATS)}") from None
        return LEGACY_MASK_FORMATS[attn_impl]

    fn = mask_function(attn_impl)
    formats = {sdpa_mask: "bool4d", eager_mask: "float4d", flash_attention_mask: "2d"}
    if fn not in formats:
        raise UnsupportedModelError(
            "attn_implementation",
            f"{attn_impl!r} is not supported; allowed: eager, sdpa, flash_attention_2/3/4, "
            "or a registered backend whose mask function is sdpa_mask, eager_mask or flash_attention_mask",
        )
    return formats[fn]


def eager_attention(layer_attention: nn.Module) -> Callable | None:
    """The ``eager_attention_forward`` of the module that defines this attention class (None: none)."""
    return getattr(sys.modules.get(type(layer_attention).__module__), "eager_attention_forward", None)


def attention_function(attn_implementation: str, eager: Callable | None) -> Callable | None:
    """The function the backend ``attn_implementation`` runs (``eager``: the model's own eager function)."""
    if attn_implementation == "eager":
        return eager
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager)


def attention_names() -> list[str]:
    """Every attention backend name transformers knows here (``eager``, ``sdpa`` and the registered ones)."""
    from transformers import AttentionInterface

    return sorted({"eager", "sdpa", *AttentionInterface._global_mapping})


def attention_bases(seams: Any) -> dict | None:
    """``{layer: the attention function its backend runs}`` over ``seams.decoder_layers`` (what a wrapping
    attention delegates to), or None when some layer has none or no ``layer_idx`` matching its position."""
    orig = attn_implementation(seams.text_config)
    bases = {}
    for j, layer in enumerate(seams.decoder_layers):
        bases[j] = attention_function(orig, eager_attention(layer.self_attn))
        if bases[j] is None or getattr(layer.self_attn, "layer_idx", None) != j:
            return None
    return bases


def register_attention(name: str, fn: Callable, masks_like: str) -> Callable[[], None]:
    """Register attention backend ``name`` (function ``fn``, the mask function of ``masks_like``);
    returns the call that unregisters both again (no existing entry is changed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[masks_like])

    def unregister() -> None:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)

    return unregister


ATTN_IMPLEMENTATION_ATTR = "_attn_implementation_internal"  # what ``config._attn_implementation`` reads


def vision_window_index(visual: nn.Module, grid_thw: Any) -> Any:
    """Qwen2.5-VL: ``window_index`` ``[units]`` of its ViT for ``grid_thw``, the raster (placeholder) index of the
    LLM token each merge unit of the windowed row order is (transformers' ``get_vision_window_index``)."""
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    return window_index
