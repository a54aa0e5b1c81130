"""vlm_tokenprune: inference-time visual-token reduction for vision-language models.

``patch(model, policy)`` hooks a Hugging Face VLM and returns a handle that undoes itself.
Importing this package registers our own methods and changes nothing else.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import methods as _methods  # noqa: F401  (registers criteria and presets)
from .errors import (
    IncompatiblePolicyError,
    InputError,
    PolicyError,
    UnknownNameError,
    UnsupportedModelError,
    VTPError,
)
from .builders import (
    AIM, ATP, FEATHER, MCTF, YOPO, AIMMerge, CoViPAL, EfficientVLA, FastV, FFNCut, FlowCutLLM, FlowCutViT,
    NeighborAttention, PruneHeads, PyramidDrop, Random, SkipLayers, Uniform, VisualDrop,
)
from .calibrate import calibrate
from .extend import (
    Criterion,
    Param,
    Reduction,
    ScoringContext,
    StageTrace,
    Trace,
    VisionCriterion,
    VisionRun,
    register_criterion,
    register_preset,
)
from .handle import PatchHandle
from .patching import patch
from .policy import Budget, Policy, Stage
from .registry import ADAPTERS, CRITERIA, PRESETS


def list_methods() -> list[str]:
    """Names of the registered methods (presets usable as the first word of a policy string)."""
    return PRESETS.names()


__all__ = [
    "patch", "calibrate", "PatchHandle", "Policy", "Stage", "Budget", "list_methods",
    "VTPError", "PolicyError", "UnknownNameError", "IncompatiblePolicyError", "UnsupportedModelError", "InputError",
    "CRITERIA", "PRESETS", "ADAPTERS", "__version__",
    # the extension API (vlm_tokenprune.extend)
    "Criterion", "Param", "Reduction", "ScoringContext", "StageTrace", "Trace", "VisionCriterion", "VisionRun",
    "register_criterion", "register_preset",
    # typed policy builders (vlm_tokenprune.builders): vtp.FastV(layer=2, keep=0.25) + vtp.FFNCut(ratio=2)
    "FastV", "FEATHER", "PyramidDrop", "AIM", "FlowCutLLM", "EfficientVLA", "Random", "Uniform", "ATP", "AIMMerge",
    "CoViPAL", "FlowCutViT", "MCTF", "FFNCut", "SkipLayers", "PruneHeads", "NeighborAttention", "VisualDrop", "YOPO",
]
