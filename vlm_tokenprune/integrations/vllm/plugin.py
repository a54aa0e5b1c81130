"""The ``vllm.general_plugins`` entry point (setup.py): vLLM calls ``register()`` in each of its processes.

It replaces vLLM's LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL architectures by the subclasses of
``models_*`` (``ModelRegistry.register_model``; lazy ``"module:Class"`` strings, nothing imported until the
engine builds the model). Without a policy the subclasses behave exactly as stock vLLM. A policy given in
``$VTP_POLICY`` is checked here (vLLM lets an exception in ``register()`` propagate, so ``LLM(...)`` fails
before any engine process starts); the model-specific check (positions convention) runs when the
processor and the model are built, again before any request is served.
"""
from __future__ import annotations

import logging

from .policy_source import parse_spec, policy_spec

logger = logging.getLogger("vlm_tokenprune.vllm")

_PKG = "vlm_tokenprune.integrations.vllm"
# vLLM architecture name -> our subclass (vLLM imports it when it builds that model)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": f"{_PKG}.models_llava:VTPLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": f"{_PKG}.models_llava:VTPLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": f"{_PKG}.qwen2_vl:VTPQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": f"{_PKG}.qwen2_vl:VTPQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Register the model subclasses; check a ``$VTP_POLICY`` policy and say loudly which one applies."""
    from vllm import ModelRegistry

    from .servable import check_servable

    spec, source = policy_spec(None)
    if spec is not None:
        plan = check_servable(parse_spec(spec), None)  # raises: LLM(...) fails before the engine starts
        logger.warning("vlm_tokenprune vLLM plugin: policy from %s: %s; serving %s with it",
                       source, plan.describe(), ", ".join(ARCHITECTURES))
    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    from .qwen2_vl import install_runner_switch

    install_runner_switch()  # Qwen: the model runners' M-RoPE fix-up for reduced images (see qwen2_vl)
