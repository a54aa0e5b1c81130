"""vLLM's Qwen2-VL / Qwen2.5-VL with a served ``site=pre_llm`` policy (registered by ``plugin.register``).

Each image is reduced on its own, right after vLLM's vision tower and merger, by the library's own
criterion code (``servable.ServePlan.reduce``), so an image's kept set is ``patch()``'s for a one-image
prompt. Three pieces of vLLM 0.32 are overridden:

- the processor's ``_get_prompt_updates``: an image gets ``plan.kept_count`` placeholders (a function of
  its grid alone), so vLLM sizes the prompt and its KV blocks for the kept tokens;
- ``embed_multimodal``: the merged features of each image are reduced and three position channels are
  appended to each kept row: its original ``(t, h, w)`` on the image's grid (a merged token takes its
  representative's), as vLLM's own Efficient Video Sampling (EVS) does for videos;
- M-RoPE positions: ``get_mrope_input_positions`` numbers the prompt at request time as
  ``transformers``' ``get_rope_index`` numbers the UNREDUCED prompt (text after an image continues at
  ``base + max(t, h, w)``, HF's convention; vLLM's EVS helper would put it at ``base + grid_w``), with a
  stand-in for each image's own tokens; ``recompute_mrope_positions`` (protocol
  ``SupportsMultiModalPruning``, called by the model runner once the encoder has run) writes each kept
  token's original ``(t, h, w)`` over its stand-in. This is ``patch()``'s ``positions=gaps``: every kept
  token keeps its 3-D position, text positions do not move, decoding continues after the largest one.

The runner's fix-up: vLLM's GPU model runners (V1 ``GPUModelRunner`` and the V2 default's
``MultiModalPruner``) switch it on only when the multimodal config has ``video_pruning_rate > 0``, read
after the model is built: the model sets a tiny rate on its own worker's config when a policy is active
(videos are refused then, so no video is pruned). vLLM's CPU runner never reads it:
``install_runner_switch`` wraps its ``load_model`` so a model that asks (``vtp_recomputes_mrope``) gets
the fix-up. The GPU paths are written from vLLM 0.32's source and NOT run here (no GPU vLLM in CI).
Videos are refused while a policy is active (patch() reduces them with the images of a row; per-item
video reduction is not served).
"""
from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any, Iterable, Mapping, Sequence

import torch

from ...adapters.qwen2_vl import Qwen2VLAdapter
from . import policy_source
from .servable import ImageLayout, ServePlan, check_servable

logger = logging.getLogger("vlm_tokenprune.vllm")
POSITION_CHANNELS = 3  # (t, h, w) appended to each kept feature row
GPU_RUNNER_SWITCH_RATE = 1e-6  # a video-pruning rate > 0: how vLLM's GPU runners learn a model prunes (see _ModelMixin)


# -- pure helpers (no vLLM) ----------------------------------------------------------------------------------
def serve_plan(hf_config: Any) -> ServePlan | None:
    """The engine's plan for this Qwen config (``hf_overrides`` / ``$VTP_POLICY``); None when no policy is set
    or it keeps every token (the model then runs as stock vLLM's). Raises when vLLM cannot serve the policy."""
    spec, source = policy_source.policy_spec(hf_config)
    if spec is None:
        return None
    plan = _plan(spec, source, hf_config.model_type)
    return plan if plan.active else None


@functools.lru_cache(maxsize=16)
def _plan(spec: str, source: str, family: str) -> ServePlan:
    plan = check_servable(policy_source.parse_spec(spec), family)
    logger.warning("vlm_tokenprune vLLM plugin ACTIVE (policy from %s): %s", source, plan.describe())
    return plan


def qwen_image_layout(hf_config: Any, grid_thw: Sequence[int]) -> ImageLayout:
    """One image's visual tokens as ``patch()`` sees them: ``Qwen2VLAdapter.visual_layout`` of a prompt made of
    the image's placeholders alone (raster order on the merged ``h x w`` grid)."""
    t, h, w = (int(x) for x in grid_thw)
    merge = hf_config.vision_config.spatial_merge_size
    n = t * (h // merge) * (w // merge)
    ids = torch.full((1, n), hf_config.image_token_id)
    layout = Qwen2VLAdapter().visual_layout(SimpleNamespace(config=hf_config), ids,
                                            {"image_grid_thw": torch.tensor([[t, h, w]])})
    return ImageLayout.from_visual_layout(layout)


def grid_positions(t: int, h: int, w: int) -> torch.Tensor:
    """``[t*h*w, 3]`` (t, h, w) of each token of a ``t x h x w`` block of LLM tokens, raster order (an image: t=1)."""
    return torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3)


def prompt_mrope_positions(n_tokens: int, items: Iterable[tuple[int, int, int, int, int, float]]) -> tuple[torch.Tensor, int]:
    """M-RoPE ids ``[3, n_tokens]`` and the decode delta, numbering the prompt as ``get_rope_index`` numbers the
    UNREDUCED prompt.

    ``items``: ``(offset, placeholders, t, h, w, t_factor)`` per image / video in prompt order (grid in merged
    LLM tokens). Text runs count up on all three axes; an item's block starts at ``base`` (the next text
    position) and the text after it continues at ``base + max(t', h, w)`` (``t'`` = the largest scaled frame
    index + 1), whatever its placeholder count. An item with every token kept gets its grid positions; a
    reduced one gets the first ``placeholders`` grid positions as stand-ins, overwritten by
    ``write_kept_positions`` once its features exist (the text positions are already final).
    """
    pos = torch.empty(3, n_tokens, dtype=torch.long)
    st, nxt = 0, 0
    for offset, k, t, h, w, t_factor in items:
        pos[:, st:offset] = torch.arange(offset - st) + nxt
        base = nxt + offset - st
        grid = grid_positions(t, h, w)
        if t_factor != 1.0:
            grid[:, 0] = (grid[:, 0] * t_factor).long()
        pos[:, offset:offset + k] = grid[:k].T + base
        nxt = base + int(grid.max()) + 1
        st = offset + k
    pos[:, st:] = torch.arange(n_tokens - st) + nxt
    delta = int(pos.max()) + 1 - n_tokens if n_tokens else 0
    return pos, delta


def write_kept_positions(input_ids: torch.Tensor, chunk_embeds: Sequence[torch.Tensor], positions: torch.Tensor,
                         num_computed: int, media_ids: Sequence[int], vision_start_id: int) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """The runner's fix-up for one request's prefill chunk: ``chunk_embeds`` (the slices of its items' encoder
    outputs this step feeds, in prompt order, each ``[m, d + 3]``) fill the media placeholders from the first one
    at or after ``num_computed`` on; each gets its item's ``base`` (position after the item's vision-start token)
    plus its own ``(t, h, w)`` channels. Returns the features without the channels, the positions and the decode
    delta (``max + 1 - prompt length``; text positions never move, so it is final from the request's start)."""
    positions = positions.clone()
    n = input_ids.numel()
    feats = [e[:, :-POSITION_CHANNELS] for e in chunk_embeds]
    total = sum(int(e.shape[0]) for e in chunk_embeds)
    if total:
        ids = input_ids.to(torch.long).cpu()
        is_media = torch.zeros(n, dtype=torch.bool)
        for m in media_ids:
            is_media |= ids == m
        slots = torch.nonzero(is_media[num_computed:]).flatten() + num_computed
        if slots.numel() < total:
            raise ValueError(f"{total} multimodal features for {slots.numel()} remaining placeholders")
        slots = slots[:total]
        starts = torch.nonzero(ids == vision_start_id).flatten()
        # each placeholder's item begins after the last vision-start token before it
        owner = starts[torch.searchsorted(starts, slots) - 1]
        base = positions[0, owner.to(positions.device)] + 1  # the vision-start token is text: same id on every axis
        thw = torch.cat([e[:, -POSITION_CHANNELS:] for e in chunk_embeds]).round().long().T.to(positions.device)
        positions[:, slots.to(positions.device)] = thw + base
    delta = int(positions.max()) + 1 - n if n else 0
    return feats, positions, delta


# -- vLLM classes (built on import of vllm) -------------------------------------------------------------------
def _build() -> dict[str, type]:
    from vllm.model_executor.models import qwen2_5_vl as q25
    from vllm.model_executor.models import qwen2_vl as q2
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import PromptReplacement

    from ...errors import InputError

    class _ProcessorMixin:
        """``_get_prompt_updates``: each image's placeholder count is the plan's kept count."""

        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
            policy_source.refuse_request_policy(hf_processor_mm_kwargs)
            updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
            hf_config = self.info.get_hf_config()
            plan = serve_plan(hf_config)
            if plan is None:
                return updates
            image_token = hf_config.image_token_id

            def image_replacement(item_idx: int):
                grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
                return [image_token] * plan.kept_count(qwen_image_layout(hf_config, grid.tolist()))

            def video_refused(item_idx: int):
                raise InputError("multi_modal_data.video", f"the vLLM plugin's policy ({plan.describe()}) reduces "
                                 "images only; videos are not served while a policy is active; allowed: images")

            out = []
            for u in updates:
                if u.modality == "image":
                    u = PromptReplacement(modality="image", target=u.target, replacement=image_replacement)
                elif u.modality == "video":
                    u = PromptReplacement(modality="video", target=u.target, replacement=video_refused)
                out.append(u)
            return out

    class _ModelMixin:
        """Reduce each image after the merger; positions as ``patch()`` with ``positions=gaps``."""

        supports_multimodal_pruning = True  # vLLM's SupportsMultiModalPruning: recompute_mrope_positions below

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.vtp_plan = serve_plan(self.config)  # an unservable policy fails the engine here
            # asks the model runner for the fix-up (install_runner_switch); False: stock vLLM behaviour
            self.vtp_recomputes_mrope = self.vtp_plan is not None
            if self.vtp_recomputes_mrope:
                self.is_multimodal_pruning_enabled = True  # Qwen2.5-VL: keeps the encoder CUDA graphs off
                mm = vllm_config.model_config.multimodal_config
                if mm is not None and not mm.is_multimodal_pruning_enabled():
                    # vLLM's GPU model runners (V1 and V2) switch the M-RoPE fix-up on from this config, after the
                    # model is built; videos are refused while a policy is active, so this prunes no video
                    mm.video_pruning_rate = GPU_RUNNER_SWITCH_RATE

        def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
            if self.vtp_plan is None:
                return super().get_mrope_input_positions(input_tokens, mm_features)
            items = []
            feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
            for f, (offset, t, h, w, t_factor) in zip(feats, self.iter_mm_grid_thw(feats)):
                items.append((offset, f.mm_position.length, t, h, w, t_factor))
            return prompt_mrope_positions(len(input_tokens), items)

        def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
            if not isinstance(input_ids, torch.Tensor):
                input_ids = torch.tensor(input_ids, dtype=torch.long)
            cfg = self.config
            return write_kept_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens,
                                        (cfg.image_token_id, cfg.video_token_id), cfg.vision_start_token_id)

        def embed_multimodal(self, **kwargs: object):
            if self.vtp_plan is None:
                return super().embed_multimodal(**kwargs)
            inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
            out: tuple[torch.Tensor, ...] = ()
            for modality, item in inputs.items():
                if item is None:
                    continue
                if not modality.startswith("image"):
                    raise InputError("multi_modal_data.video", "videos are not served while a vLLM plugin policy is "
                                     "active; allowed: images")
                embeds = self._process_image_input(item)
                for emb, grid in zip(embeds, item["image_grid_thw"].tolist()):
                    out += (self._vtp_reduce(emb, grid),)
            return out

        def _vtp_reduce(self, emb: torch.Tensor, grid: list[int]) -> torch.Tensor:
            merge = self.config.vision_config.spatial_merge_size
            t, h, w = grid[0], grid[1] // merge, grid[2] // merge
            red = self.vtp_plan.reduce(emb, qwen_image_layout(self.config, grid))
            thw = grid_positions(t, h, w).to(emb.device)[red.kept]
            return torch.cat([red.features, thw.to(red.features.dtype)], dim=1)

        def get_encoder_cudagraph_config(self):
            cfg = super().get_encoder_cudagraph_config()
            if self.vtp_plan is not None and getattr(cfg, "modalities", None):
                import dataclasses

                cfg = dataclasses.replace(cfg, modalities=[])  # the graphs bypass embed_multimodal's reduction
            return cfg

    class VTPQwen2VLMultiModalProcessor(_ProcessorMixin, q2.Qwen2VLMultiModalProcessor):
        pass

    class VTPQwen2_5_VLMultiModalProcessor(_ProcessorMixin, q25.Qwen2_5_VLMultiModalProcessor):
        pass

    @MULTIMODAL_REGISTRY.register_processor(VTPQwen2VLMultiModalProcessor, info=q2.Qwen2VLProcessingInfo,
                                            dummy_inputs=q2.Qwen2VLDummyInputsBuilder)
    class VTPQwen2VLForConditionalGeneration(_ModelMixin, q2.Qwen2VLForConditionalGeneration):
        pass

    @MULTIMODAL_REGISTRY.register_processor(VTPQwen2_5_VLMultiModalProcessor, info=q25.Qwen2_5_VLProcessingInfo,
                                            dummy_inputs=q25.Qwen2_5_VLDummyInputsBuilder)
    class VTPQwen2_5_VLForConditionalGeneration(_ModelMixin, q25.Qwen2_5_VLForConditionalGeneration):
        pass

    classes = (VTPQwen2VLMultiModalProcessor, VTPQwen2_5_VLMultiModalProcessor,
               VTPQwen2VLForConditionalGeneration, VTPQwen2_5_VLForConditionalGeneration)
    for c in classes:  # importable by name from this module (vLLM resolves "module:Class"; pickling)
        c.__module__, c.__qualname__ = __name__, c.__name__
    return {c.__name__: c for c in classes}


def __getattr__(name: str):
    """The vLLM classes, built on first access (``ModelRegistry`` resolves ``"module:Class"`` lazily)."""
    classes = _built() if name.startswith("VTPQwen") else {}
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=1)
def _built() -> dict[str, type]:
    return _build()


# -- the model runners' switch (plugin.register installs it) ------------------------------------------------
def install_runner_switch() -> None:
    """Wrap vLLM's CPU model runner's ``load_model`` so that a loaded model with ``vtp_recomputes_mrope`` gets the
    runner's multimodal-pruning fix-up (``recompute_mrope_positions`` before each prefill chunk).

    The CPU runner overrides ``load_model`` without the GPU runner's ``is_multimodal_pruning_enabled`` line, so it
    never enables the fix-up (the GPU runners read the config the model sets, see ``_ModelMixin``). Models
    without the attribute are untouched. Idempotent.
    """
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # pragma: no cover - a vLLM build without the CPU runner: nothing to switch
        return
    load = CPUModelRunner.__dict__.get("load_model")
    if load is None or getattr(load, "_vtp_switch", False):
        return

    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        if getattr(self.get_model(), "vtp_recomputes_mrope", False):
            self.is_multimodal_pruning_enabled = True
        return out

    load_model._vtp_switch = True
    CPUModelRunner.load_model = load_model
