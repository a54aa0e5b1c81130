"""ATP-LLaVA: "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models" (Ye et al.,
CVPR 2025), arXiv 2412.00447.

A learned ATP module (:class:`~vlm_tokenprune.learned.atp.ATPModule`) between decoder layers
K-1 and K scores each visual token by redundancy (self-modal + cross-modal attention in layer
K-1) and by its place on uniform spatial grids (SAP), predicts two per-instance thresholds, and
keeps the tokens above either threshold (the hard mask); the others are dropped before layer K.
Rows keep different numbers of tokens (padded and masked by the engine).

Parameters:
* ``weights``: a weight file from ``vlm-tokenprune train atp`` (kind ``"atp"``, bound to the base
  model's geometry and to the layer it was trained for; another model's file is an
  ``IncompatiblePolicyError`` at ``patch()``, a stage at another layer one at the first forward),
  or ``"shipped"`` (default): the module trained on the shipped tiny VLM
  (``assets/tiny_vlm/atp.safetensors``, layer 1).

Budget: ATP's kept count is learned per instance, so the stage's budget does NOT choose it; it
states the training target (the preset's ``keep=0.25``, what ``explain`` predicts on average).
``keep=1`` keeps everything (the engine skips the stage). The measured average is in
``handle.last_trace()``.

Preset ``atp``: layer 1 (the shipped weights'), keep 0.25 (the paper's 75 % average reduction).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from ..assets import tiny_vlm_file
from ..errors import IncompatiblePolicyError, InputError
from ..learned.artifact import load_weights
from ..learned.atp import KIND, ATPModule, ATPOutput, atp_from_context
from ..policy import register_preset
from ..scoring import ScoringContext
from ..selection import right_packed
from .base import Criterion, Param, register_criterion

SHIPPED = tiny_vlm_file("atp.safetensors")


def resolve_weights(weights: str) -> str:
    """``"shipped"`` -> the packaged file for the tiny VLM; anything else is a path."""
    return str(SHIPPED) if weights == "shipped" else os.path.expanduser(weights)


@register_criterion
class ATPCriterion(Criterion):
    """``bind`` loads the module (a copy of the criterion carrying it, ``Criterion.bound``). ``score`` returns the
    margin ``tau * max(S_red - theta_r, S_sp - theta_s)`` (soft mask = sigmoid(score)); ``select`` keeps the hard
    mask ``score > 0``."""

    name = "atp"
    paper = "ATP-LLaVA: learned per-instance thresholds on redundancy (self/cross-modal attention) + spatial scores"
    arxiv = "2412.00447"
    params = {
        "weights": Param("shipped", str, "weight file from `vlm-tokenprune train atp`, or 'shipped' (the tiny VLM's)"),
    }
    # the kept count varies per sample; the budget is the training target (what explain predicts, on average)
    budget_predicts_count = True

    # set on the copy bind() returns
    module: ATPModule | None = None
    scoring_layer: nn.Module | None = None  # decoder layer K-1, whose attention the module reads
    where: str = "stages[?]"

    def bind(self, model: nn.Module, params: Mapping[str, Any], where: str, seams: Any) -> "ATPCriterion":
        path = resolve_weights(params.get("weights", "shipped"))
        tensors, hparams = load_weights(path, KIND, model, f"{where}.weights")
        module = ATPModule.from_state(tensors, hparams, f"{where}.weights")
        layers = seams.decoder_layers
        if not 1 <= module.layer < len(layers):
            raise IncompatiblePolicyError(f"{where}.weights", f"{path!r} was trained for layer {module.layer}, "
                                                              f"beyond this model's 1..{len(layers) - 1}")
        # the module moves to the hidden states' device on use
        return self.bound(module=module, scoring_layer=layers[module.layer - 1], where=where)

    def outputs(self, ctx: ScoringContext) -> ATPOutput:
        """The module's scores, thresholds and masks for this context (what ``score``/``select`` use)."""
        if self.module is None:
            raise RuntimeError("atp scores through the object bind() returns (patch() binds it)")
        if ctx.layer is not self.scoring_layer:
            raise IncompatiblePolicyError(
                f"{self.where}.layer",
                f"these ATP weights were trained between decoder layers {self.module.layer - 1} and {self.module.layer}; "
                f"allowed: layer={self.module.layer}",
            )
        if self.module.strides and not ctx.coords_known:
            raise InputError(f"{self.where}.weights", "ATP's spatial score needs the patch grid of every image "
                                                      "(LLaVA-NeXT: pass image_sizes and pixel_values)")
        if _device_of(self.module) != ctx.hidden.device:  # first use, or an accelerate-dispatched model
            self.module = self.module.to(ctx.hidden.device)
        with torch.no_grad():
            return atp_from_context(self.module, ctx)

    def score(self, ctx: ScoringContext, **params: Any) -> torch.Tensor:
        return self.outputs(ctx).margin

    def select(self, ctx: ScoringContext, scores: torch.Tensor, **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ok = ctx.visual_ok
        hard = (scores > 0) & ok
        empty = ~hard.any(1) & ok.any(1)
        if bool(empty.any()):  # one-token floor, as ATPModule.forward
            best = scores.masked_fill(~ok, float("-inf")).argmax(1)
            hard = hard | (torch.nn.functional.one_hot(best, ok.shape[1]).bool() & empty[:, None])
        return right_packed(hard)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


register_preset(
    "atp", [{"criterion": "atp", "layer": 1, "keep": 0.25}],
    "ATP-LLaVA: learned per-instance thresholds on redundancy + spatial (SAP) scores, kept count varies per "
    "sample (budget = training target); weights=FILE from `vlm-tokenprune train atp` (default: the shipped "
    "tiny VLM's, layer 1)", "2412.00447",
)
