"""Model-family adapters, resolved from ``config.model_type``."""
from ..errors import UnsupportedModelError
from ..registry import ADAPTERS
from .base import Adapter, Seams, VisualLayout
from . import llava_hf  # noqa: F401  (registers the LLaVA adapters)
from . import qwen2_vl  # noqa: F401  (registers the Qwen2-VL / Qwen2.5-VL adapters)
from . import llava_onevision  # noqa: F401  (registers the LLaVA-OneVision adapter)
from . import internvl  # noqa: F401  (registers the InternVL 3 / 3.5 adapter)
from . import qwen3_vl  # noqa: F401  (registers the Qwen3-VL / Qwen3-VL-MoE adapter)
from . import gemma3  # noqa: F401  (registers the Gemma 3 adapter)
from . import llava_original  # noqa: F401  (the original LLaVA code base, llava-torch; imports no llava itself)

# Known model types that are deliberately not supported, and why (no adapter is registered for them).
KNOWN_UNSUPPORTED = {
    **{t: "the original LLaVA code base (llava-torch) is supported for LlavaLlamaForCausalLM (llava_llama) only; "
          "its Mistral and MPT variants have no adapter yet" for t in ("llava_mistral", "llava_mpt")},
    "internvl_chat": "InternVL (remote code) is not supported: its modeling code is not part of transformers, "
                     "so its seams cannot be checked",
}


def resolve_adapter(model) -> Adapter:
    """The registered adapter for ``model.config.model_type``; a clear error when there is none."""
    if getattr(model, "config", None) is None:
        raise UnsupportedModelError("model", f"expected a Hugging Face VLM (a module with a .config), got "
                                    f"{type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        why = KNOWN_UNSUPPORTED.get(model_type)
        raise UnsupportedModelError(
            "model.config.model_type",
            f"{model_type!r} is not supported{': ' + why if why else ''}; "
            f"supported model types: {', '.join(ADAPTERS.names())}",
        )
    if getattr(model, "lm_head", None) is None and hasattr(model, "get_output_embeddings") \
            and model.get_output_embeddings() is None:
        # e.g. patch(model.model): the inner LlavaModel / Qwen2VLModel shares the config but not the layout
        raise UnsupportedModelError(
            "model", f"{type(model).__name__} is an inner module of a {model_type!r} model (no language-model head); "
            "allowed: the top-level model, e.g. LlavaForConditionalGeneration / Qwen2VLForConditionalGeneration "
            "(patch(model), not patch(model.model))")
    return ADAPTERS.get(model_type)


__all__ = ["Adapter", "Seams", "VisualLayout", "resolve_adapter"]
