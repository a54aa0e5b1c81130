"""CoViPAL: "Layer-wise Contextualized Visual Token Pruning for Large Vision-Language Models"
(Tang et al., EMNLP 2025 Findings), arXiv 2508.17243.

A learned Plug-and-Play Pruning Module (:class:`~vlm_tokenprune.learned.covipal.PPM`) scores each
visual token from the visual tokens and the instruction text before the language model runs,
``S = p_theta(H_v, H_t)``; the stage keeps ``TopK(S, r * n_v)`` (``keep=r``, ties to the lower
position). Site ``pre_llm``: every decoder layer sees only the kept tokens.

Parameters:
* ``weights``: a weight file from ``vlm-tokenprune train covipal`` (kind ``"covipal"``, bound to the
  base model's geometry; another model's file is an ``IncompatiblePolicyError``), or ``"shipped"``
  (default): the module trained on the shipped tiny VLM (``assets/tiny_vlm/covipal.safetensors``).

Preset ``covipal``: keep 25 % (the paper's reserve ratio r is a free budget), ``positions=repack``
(the paper removes the tokens from the LVLM's input sequence, so the kept ones are numbered
contiguously).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from ..assets import tiny_vlm_file
from ..learned.artifact import load_weights
from ..learned.covipal import KIND, PPM, score_context
from ..policy import register_preset
from ..scoring import ScoringContext
from .base import Criterion, Param, register_criterion

SHIPPED = tiny_vlm_file("covipal.safetensors")


def resolve_weights(weights: str) -> str:
    """``"shipped"`` -> the packaged file for the tiny VLM; anything else is a path."""
    return str(SHIPPED) if weights == "shipped" else os.path.expanduser(weights)


@register_criterion
class CoViPALCriterion(Criterion):
    name = "covipal"
    paper = "CoViPAL: a learned pruning module scores visual tokens from visual + instruction tokens before the LLM"
    arxiv = "2508.17243"
    sites = ("pre_llm",)
    params = {
        "weights": Param("shipped", str, "weight file from `vlm-tokenprune train covipal`, or 'shipped' (the tiny VLM's)"),
    }

    ppm: PPM | None = None  # the loaded plug-and-play module (set on the copy bind() returns)

    def bind(self, model: nn.Module, params: Mapping[str, Any], where: str, seams: Any) -> "CoViPALCriterion":
        path = resolve_weights(params.get("weights", "shipped"))
        tensors, hparams = load_weights(path, KIND, model, f"{where}.weights")
        # moved to the hidden states' device on first use
        return self.bound(ppm=PPM.from_state(tensors, hparams, f"{where}.weights"))

    def score(self, ctx: ScoringContext, **params: Any) -> torch.Tensor:
        if self.ppm is None:
            raise RuntimeError("covipal scores with the weights bind() loads (patch() binds it)")
        p = next(self.ppm.parameters(), None)
        if p is not None and p.device != ctx.hidden.device:  # first use, or an accelerate-dispatched model
            self.ppm = self.ppm.to(ctx.hidden.device)
        return score_context(self.ppm, ctx.hidden, ctx.seq_valid, ctx.visual_idx, ctx.visual_ok)


register_preset(
    "covipal", [{"criterion": "covipal", "site": "pre_llm", "keep": 0.25, "positions": "repack"}],
    "CoViPAL: learned pruning module (visual + instruction tokens) keeps the top 25 % before the LLM; "
    "weights=FILE from `vlm-tokenprune train covipal` (default: the shipped tiny VLM's)", "2508.17243",
)
