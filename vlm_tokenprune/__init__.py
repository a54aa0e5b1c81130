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
from .calibrate import calibrate
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
]
