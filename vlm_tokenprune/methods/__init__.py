"""Every method module registers its criterion and preset on import."""
from . import baselines, fastv  # noqa: F401
from .base import Criterion, Param, register_criterion

__all__ = ["Criterion", "Param", "register_criterion"]
