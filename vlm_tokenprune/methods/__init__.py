"""Every method module registers its criterion and preset on import."""
from . import aim, aim_merge, efficientvla  # noqa: F401  (aim_schedule lives in methods.aim)
from . import baselines, fastv, feather, flowcut_llm, pdrop  # noqa: F401
from . import efficientvla_layers  # noqa: F401  (a structural preset: skip_layers from a calibration file)
from .base import Criterion, Param, register_criterion

__all__ = ["Criterion", "Param", "register_criterion"]
