"""Every method module registers its criterion and preset on import."""
from . import aim, aim_merge, efficientvla  # noqa: F401  (aim_schedule lives in methods.aim)
from . import baselines, fastv, feather, flowcut_llm, pdrop  # noqa: F401
from . import efficientvla_layers  # noqa: F401  (a structural preset: skip_layers from a calibration file)
from . import finercut  # noqa: F401  (a structural preset: skip_sublayers from a calibration file)
from . import yopo  # noqa: F401  (structural presets: neighbour attention, visual FFN cut, visual heads, visual drop)
from . import covipal  # noqa: F401  (learned, pre_llm: weights from `vlm-tokenprune train covipal`)
from . import atp  # noqa: F401  (learned, LLM: weights from `vlm-tokenprune train atp`)
from . import flowcut_vit, mctf  # noqa: F401  (site vision: between CLIP-tower layers)
from . import divprune, dart  # noqa: F401  (methods-3: DivPrune before the LLM, DART in the LLM)
from . import vispruner, visionzip  # noqa: F401  (methods-3: site vision, at the feature layer)
from . import sparsevlm  # noqa: F401  (methods-3: text raters + recycling, an LLM-site merge)
from .base import Criterion, Param, register_criterion

__all__ = ["Criterion", "Param", "register_criterion"]
