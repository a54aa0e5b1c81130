"""The extension API: everything a new method needs, from one public module (also re-exported by
``vlm_tokenprune``). See CONTRIBUTING.md for each method shape and the files it touches.

- a scoring criterion (LLM site, or ``sites=("pre_llm",)``): subclass ``Criterion``, implement
  ``score(ctx, **params)`` (and optionally ``select``; ``merge`` for ``op = "merge"``; ``bind`` for
  learned weights; ``scoring_flops`` for its FLOPs), declare ``params`` with ``Param``, decorate with
  ``register_criterion``;
- a vision-site criterion: subclass ``VisionCriterion`` (``before_layer`` between encoder layers,
  ``after_feature_layer`` on the feature layer's output; bookkeeping in ``VisionRun``);
- a preset (a named policy, paper settings): ``register_preset(name, stages, description, arxiv)``;
- what a criterion reads: ``ScoringContext``; a pre-LLM merge returns ``Reduction`` chains; what a
  handle reports: ``Trace`` / ``StageTrace`` (``handle.last_trace()``).
"""
from __future__ import annotations

from .methods.base import Criterion, Param, register_criterion
from .policy import register_preset
from .reduction import Reduction
from .scoring import ScoringContext
from .state import StageTrace, Trace
from .vision.base import VisionCriterion
from .vision.state import VisionRun

__all__ = [
    "Criterion", "Param", "Reduction", "ScoringContext", "StageTrace", "Trace", "VisionCriterion", "VisionRun",
    "register_criterion", "register_preset",
]
