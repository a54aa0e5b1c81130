"""Every method module registers its criterion and preset on import."""
from . import aim, efficientvla  # noqa: F401  (aim_schedule lives in methods.aim)
from . import baselines, fastv, feather, flowcut_llm, pdrop  # noqa: F401
from .base import Criterion, Param, register_criterion

__all__ = ["Criterion", "Param", "register_criterion"]
