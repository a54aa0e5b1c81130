"""The interface of a vision-site criterion (a method acting between vision-encoder layers).

A ``VisionCriterion`` is registered like any criterion (``register_criterion``) with
``sites = ("vision",)``. ``patch()`` calls ``check_vision`` before any hook exists; each
tower call then calls ``before_layer`` in the forward pre-hook of every encoder layer up to
the feature layer, with that layer's incoming hidden states; it returns them, possibly
shorter, and updates the ``VisionRun`` (``run.reassign``). Layers whose q/k/v projections a
criterion reads are named by ``capture_layers`` (their outputs land in ``run.captured``).
``after_feature_layer`` is called once per tower call with the feature layer's OUTPUT (what the
projector consumes, CLS first), for methods that select from the last features (VisionZip, VisPruner).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..methods.base import Criterion

if TYPE_CHECKING:
    from ..adapters.base import VisionSeams
    from .state import VisionRun


class VisionCriterion(Criterion):
    sites: ClassVar[tuple[str, ...]] = ("vision",)
    # "layer" of a vision stage: the first encoder layer the method acts at (None: fixed by the method)
    takes_layer: ClassVar[bool] = False
    default_layer: ClassVar[int | None] = None
    # how the method reads the tower's CLS token ("" : it does not); on a tower without CLS (``Adapter.vision_no_cls``)
    # such a method is refused by name, with ``cls_free_note`` saying whether its paper / code defines a CLS-free variant
    needs_cls: ClassVar[str] = ""
    cls_free_note: ClassVar[str] = "its paper defines no CLS-free variant"
    # True: the method runs on a tower without CLS (``VisionSeams.cls_token`` False: SigLIP of Gemma 3) by a rule its
    # paper / official code defines (VisPruner's SigLIP path); False: refused there by name (needs_cls / cls_free_note)
    cls_free: ClassVar[bool] = False
    # True: on a tower whose LLM tokens pack groups of patches (``VisionSeams.groups``, InternVL's pixel shuffle)
    # the method keeps / merges whole groups (``vision.groups``); False: refused there by name
    whole_groups: ClassVar[bool] = False

    def check_vision(self, seams: "VisionSeams", stage: Any, where: str) -> None:
        """Raise ``IncompatiblePolicyError`` naming ``where.<field>`` when the stage cannot run on this tower."""

    def capture_layers(self, seams: "VisionSeams", stage: Any) -> tuple[int, ...]:
        """Encoder layers whose q/k/v projection outputs the criterion reads (default: none)."""
        return ()

    def uses_bias(self, stage: Any) -> bool:
        """True when the criterion may set ``run.bias`` (an additive attention mask for later layers)."""
        return False

    def before_layer(self, run: "VisionRun", j: int, layer: nn.Module, hidden: torch.Tensor,
                     seams: "VisionSeams") -> torch.Tensor:
        """Encoder layer ``j`` is about to run on ``hidden`` ``[n, T, D]``; return its (possibly reduced) input."""
        return hidden

    def after_feature_layer(self, run: "VisionRun", hidden: torch.Tensor, seams: "VisionSeams") -> torch.Tensor:
        """The OUTPUT of encoder layer ``seams.feature_layer`` (HF ``hidden_states[vision_feature_layer]``, before
        the select strategy: token 0 is CLS) ``[n, T, D]``; return it, possibly shorter, recording the change with
        ``run.reassign`` as in ``before_layer``. CLS must stay at index 0. For VisionZip / VisPruner-style methods
        (the feature layer's attention: ask for its q/k/v with ``capture_layers``). Default: unchanged."""
        return hidden


def tower_attention(seams: Any, j: int) -> nn.Module:
    """Encoder layer ``j``'s attention module (``num_heads``, ``scale``): ``seams.attention_name`` of the layer
    (CLIP ``self_attn``; InternViT ``attention``); seams without the field (vLLM's) mean ``self_attn``."""
    return getattr(seams.layers[j], getattr(seams, "attention_name", "self_attn"))


def tower_qk(seams: Any, j: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, k)`` ``[n, T, D]`` of encoder layer ``j`` on its input ``hidden``, as its attention computes them: the
    pre-attention norm (``seams.attention_norm``), ``q_proj`` / ``k_proj``, then the module ``seams.projections``
    names for q / k when it is not the projection itself (InternViT's ``q_norm`` / ``k_norm``)."""
    attn = tower_attention(seams, j)
    h = getattr(seams.layers[j], getattr(seams, "attention_norm", "layer_norm1"))(hidden)
    names = dict(getattr(seams, "projections", ()))
    q, k = attn.q_proj(h), attn.k_proj(h)
    if names.get("q", "q_proj") != "q_proj":
        q = getattr(attn, names["q"])(q)
    if names.get("k", "k_proj") != "k_proj":
        k = getattr(attn, names["k"])(k)
    return q, k


def tower_groups(seams: Any) -> torch.Tensor | None:
    """``seams.groups`` (``[G, g]`` patches per LLM token, ``vision.groups``), None when every patch is a token."""
    return getattr(seams, "groups", None)
