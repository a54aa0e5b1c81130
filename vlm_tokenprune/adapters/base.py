"""What an adapter tells the engine about one model family.

An adapter answers three questions and holds all model-specific knowledge:
``seams(model)`` (where the decoder layers are, what they expect), ``check(model)``
(is this configuration supported), and ``visual_layout(...)`` (which tokens of a
prompt are visual, and where on which patch grid each one sits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class Seams:
    """The modules and facts the engine hooks into.

    ``top``: the module whose forward starts a request (kwargs carry input_ids, cache...).
    ``decoder_layers``: the LLM decoder layers in call order.
    ``first_full_attention_layer``: index of the first full-attention layer (cache
    lengths are read there); pruning must happen strictly above it.
    ``mask_format``: how this attention backend receives masks: ``"bool4d"`` (sdpa),
    ``"float4d"`` (eager) or ``"2d"`` (flash-attention style padding masks).
    """

    top: nn.Module
    decoder_layers: tuple[nn.Module, ...]
    first_full_attention_layer: int
    mask_format: str
    attn_implementation: str
    text_config: Any

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)


@dataclass
class VisualLayout:
    """Where the visual tokens of a batch sit.

    All tensors are ``[B, L]`` over the prompt as given to the LLM.
    ``is_visual``: visual token. ``image``: image index within the row (-1: not visual).
    ``segment``: index of the 2-D patch grid the token belongs to within the row (LLaVA-NeXT
    has a base grid and an anyres grid per image; Qwen2-VL counts images and videos as items in
    ``image`` and makes every video frame a grid of its own; -1: not visual).
    ``row``/``col``: position on that grid (-1 for CLS and ``image_newline`` tokens).
    ``is_newline``: LLaVA-NeXT ``image_newline`` token. ``coords_known`` is False when the
    grid could not be derived (e.g. LLaVA-NeXT without ``image_sizes``): spatial criteria
    then refuse to run.
    """

    is_visual: torch.Tensor
    image: torch.Tensor
    segment: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    is_newline: torch.Tensor
    coords_known: bool = True


class Adapter(Protocol):
    model_types: tuple[str, ...]
    # forward kwargs that carry new pixels (refused in a chunk appended to an existing cache);
    # the engine assumes ("pixel_values",) when an adapter does not say
    pixel_inputs: tuple[str, ...]

    def check(self, model: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` when this configuration cannot be patched."""

    def seams(self, model: nn.Module) -> Seams: ...

    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> VisualLayout: ...
