"""vLLM 0.32 LLaVA-1.5 and LLaVA-NeXT with a pre-LLM token reduction (imported by ``plugin.register`` only).

Two overrides per family: the processing info's ``get_num_image_tokens`` returns the kept count (so the
prompt holds that many placeholders and the KV cache is sized for them), and the model's
``_process_image_input`` reduces each image's projected features with ``ServePlan.reduce`` (the
library's criterion code). vLLM numbers the prompt's tokens by index, so the kept tokens sit contiguously:
``patch()`` with ``positions=repack``. Without a policy both overrides return the stock values.
LLaVA-1.5 with a feature-layer vision stage (VisionZip, VisPruner): ``_image_pixels_to_features`` hooks the
tower's last (= feature) layer for that call only and reduces its output with ``vision_site.reduce_feature_layer``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...errors import IncompatiblePolicyError

from .policy_source import parse_spec, policy_spec, refuse_request_policy
from .servable import ServePlan, check_servable, llava_layout, llava_next_layout
from .vision_site import FeatureLayerSeams, reduce_feature_layer

logger = logging.getLogger("vlm_tokenprune.vllm")


def plan_for(hf_config: Any) -> ServePlan | None:
    """The engine's plan for this model config (None: no policy set); raises when vLLM cannot serve the policy."""
    spec, source = policy_spec(hf_config)
    if spec is None:
        return None
    return _plan(spec, source, hf_config.model_type)


@functools.lru_cache(maxsize=None)
def _plan(spec: str, source: str, family: str) -> ServePlan:
    plan = check_servable(parse_spec(spec), family)
    logger.warning("vlm_tokenprune vLLM plugin ACTIVE (policy from %s): %s", source, plan.describe())
    return plan


# -- LLaVA-1.5 ----------------------------------------------------------------------------------------------
class VTPLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        cfg = self.get_hf_config()
        plan = plan_for(cfg)
        return n if plan is None else plan.kept_count(llava_layout(cfg, n))


class VTPLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        refuse_request_policy(hf_processor_mm_kwargs)
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


@MULTIMODAL_REGISTRY.register_processor(VTPLlavaMultiModalProcessor, info=VTPLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VTPLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose image features are reduced per image after the projector."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtp_plan = plan_for(self.config)  # an unservable policy fails the engine here, before it serves
        if self.vtp_plan is not None and self.vtp_plan.vision:
            self.vtp_plan.criterion.check_vision(_feature_seams(self), self.vtp_plan.stage,
                                                 f"stages[{self.vtp_plan.stage_index}]")

    def _image_pixels_to_features(self, vision_tower: Any, pixel_values: Any):
        if self.vtp_plan is None or not self.vtp_plan.vision or vision_tower is not self.vision_tower:
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        with _feature_layer_cut(self.vtp_plan, _feature_seams(self)):  # hooks for this call only
            return super()._image_pixels_to_features(vision_tower, pixel_values)

    def _process_image_input(self, image_input: Any):
        out = super()._process_image_input(image_input)
        if self.vtp_plan is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return out  # precomputed embeddings: their count is the caller's
        if self.vtp_plan.vision:
            return out  # reduced inside the tower (_image_pixels_to_features)
        feats = list(out) if isinstance(out, (tuple, list)) else list(out.unbind(0))
        return [self.vtp_plan.reduce(f, llava_layout(self.config, f.shape[0])).features for f in feats]


def _feature_seams(model: Any) -> FeatureLayerSeams:
    """vLLM's CLIP tower for LLaVA is built up to the feature layer (``num_hidden_layers_override``): its last
    encoder layer is ``patch()``'s feature layer."""
    tower = model.vision_tower
    if not isinstance(tower, CLIPVisionModel):
        raise IncompatiblePolicyError(
            f"stages[{model.vtp_plan.stage_index}].site", f"a vision stage is served on a CLIP tower only, this model's "
            f"is {type(tower).__name__}; allowed: one site=pre_llm stage")
    layers = tower.vision_model.encoder.layers
    attn = layers[-1].self_attn
    if getattr(attn, "num_heads_per_partition", attn.num_heads) != attn.num_heads:
        raise IncompatiblePolicyError(
            f"stages[{model.vtp_plan.stage_index}].site", "the vision tower's attention is split over tensor-parallel "
            "ranks, so one rank does not see every head's q/k; allowed: tensor_parallel_size=1 or "
            "mm_encoder_tp_mode='data'")
    return FeatureLayerSeams(len(layers) - 1, layers, model.config.vision_feature_select_strategy)


@contextlib.contextmanager
def _feature_layer_cut(plan: ServePlan, seams: FeatureLayerSeams):
    """For one tower call: capture the feature layer's q / k (from its fused ``qkv_proj``) and replace the layer's
    output by ``reduce_feature_layer``'s (the library's ``after_feature_layer``, raster order). Hooks are removed
    on exit, whatever happens."""
    layer = seams.layers[seams.feature_layer]
    qk: dict = {}

    def capture(module, args, output):
        qkv = output[0] if isinstance(output, tuple) else output
        qk["q"], qk["k"], _ = qkv.chunk(3, dim=-1)

    def cut(module, args, output):
        return reduce_feature_layer(plan, output, qk.pop("q"), qk.pop("k"), seams)

    hooks = [layer.self_attn.qkv_proj.register_forward_hook(capture), layer.register_forward_hook(cut)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# -- LLaVA-NeXT ---------------------------------------------------------------------------------------------
class VTPLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        cfg = self.get_hf_config()
        plan = plan_for(cfg)
        return n if plan is None else plan.kept_count(llava_next_layout(cfg, (image_height, image_width), n))


class VTPLlavaNextMultiModalProcessor(LlavaNextMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        refuse_request_policy(hf_processor_mm_kwargs)
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


@MULTIMODAL_REGISTRY.register_processor(VTPLlavaNextMultiModalProcessor, info=VTPLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VTPLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` reducing each image's packed features (base grid, unpadded anyres
    grid, ``image_newline`` tokens) after the projector."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtp_plan = plan_for(self.config)

    def _process_image_input(self, image_input: Any):
        out = super()._process_image_input(image_input)
        if self.vtp_plan is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return out
        sizes = image_input.get("image_sizes")
        side = self.config.vision_config.image_size
        reduced = []
        for i, f in enumerate(out):
            hw = tuple(int(v) for v in sizes[i].tolist()) if sizes is not None else (side, side)
            reduced.append(self.vtp_plan.reduce(f, llava_next_layout(self.config, hw, f.shape[0])).features)
        return reduced
