"""Model-family adapters, resolved from ``config.model_type``."""
from ..errors import UnsupportedModelError
from ..registry import ADAPTERS
from .base import Adapter, Seams, VisualLayout
from . import llava_hf  # noqa: F401  (registers the LLaVA adapters)


def resolve_adapter(model) -> Adapter:
    """The registered adapter for ``model.config.model_type``; a clear error when there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            "model.config.model_type",
            f"{model_type!r} is not supported; supported model types: {', '.join(ADAPTERS.names())}",
        )
    return ADAPTERS.get(model_type)


__all__ = ["Adapter", "Seams", "VisualLayout", "resolve_adapter"]
