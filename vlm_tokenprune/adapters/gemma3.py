"""Hugging Face ``Gemma3ForConditionalGeneration`` (Gemma 3, arXiv 2503.19786): SigLIP, an average-pool
projector to ``mm_tokens_per_image`` (256) tokens per image, and a text model in which 5 of every 6 layers
attend through a sliding window and image tokens attend bidirectionally among themselves in prefill.

Layout: every run of ``image_token_id`` placeholders (one per image or pan-and-scan crop, between
``<start_of_image>`` / ``<end_of_image>``) is cut into images of ``mm_tokens_per_image`` tokens, each its
own ``sqrt(n) x sqrt(n)`` raster grid (the projector pools the SigLIP grid row-major). No newline tokens.

Vision site (``vision_seams``): the projector average-pools each image's square SigLIP patch grid
(``image_size / patch_size`` per side, 64 x 64 on gemma-3-4b) in windows of ``k x k`` patches (4 x 4) into its
``mm_tokens_per_image`` tokens, so a vision stage keeps whole pooling WINDOWS (``VisionSeams.groups``, found by
running the projector's own pooling on one-hot-coded patches: ``pooling_groups``), as on InternVL's pixel-shuffle
groups. SigLIP has no CLS: only criteria with a CLS-free rule (``VisionCriterion.cls_free``: VisPruner's official
SigLIP variant) run; the rest are refused by name. The last encoder layer (what ``get_image_features`` reads,
before ``post_layernorm``) is the feature layer; its reduced output goes back onto the full grid (dropped windows
zero), the model's own pooling, norm and projection run on the full grid, and the kept windows' tokens are taken
from the projector's output (``project_kept_only=False``: they equal the unpruned model's bit for bit; on a
shorter input the RMSNorm's bits differ); the language model receives the kept image tokens through the pre-LLM
path below (``positions=gaps``).

Semantics of pruning here (defined, issue 21):
- the sliding window is a window of ORIGINAL positions: a query at original position ``p`` of a sliding
  layer sees the kept keys at original positions ``p - W < k <= p``; a pruned token leaves a hole, it does
  not pull older tokens into the window;
- the bidirectional image block (prefill, when ``token_type_ids`` is given, as transformers does) covers
  the image's KEPT tokens: kept image tokens of one block see each other, in the sliding layers within the
  window as the model builds it (``AND(window, OR(causal, block))``).
Implementation: the model builds one 4-D mask per layer type over the full prompt (``causal_mask_mapping``)
and hands each layer its type's mask; the engine gathers EACH LAYER'S OWN incoming mask at the kept
original positions (rows and columns in prefill), which is the definition above. While decoding, the
model's masks are built over the cache of layer 0; for them to speak original positions, every cache layer
must hold the whole (kept) prompt: ``install`` turns the cache's sliding layers (``DynamicSlidingWindowLayer``,
which evicts by COUNT, so with holes it would keep the wrong tokens) into full ``DynamicLayer``s at the
start of a patched prefill; the window is then applied by the mask over original positions, not by
eviction (memory: sliding layers keep the whole prompt, as full layers do). When the prefill pruned
nothing (a keep-everything policy), the layers go back to sliding layers holding exactly what the
unpatched cache holds, so decoding is bit-identical. After a pre-LLM reduction the language model's
decode masks are built here (``decode_masks``) from the kept tokens' original positions.

Scoring: a criterion reading attention sees the scoring layer's own rows (``scoring_reads_layer_mask`` ->
``ScoringContext.layer_mask``: that layer's incoming mask over the current tokens, the one it attends with).
Each query row has its own keys: in a sliding layer those inside ITS window of original positions, for an
image-token row also the later kept tokens of its image block, never padding. One text row (FastV's last
token, FEATHER, FlowCut) restricts the valid keys (any backend); several rows (EfficientVLA's instruction
tokens, SparseVLM's raters, ATP's visual rows) score with per-row key sets (``row_keys`` of
``ops.attention_scores``, PyTorch reference and Triton kernel alike), at any prompt length.
Structural ops (``structural``): all of them, as on every family: Gemma 3's sandwich norms make a removed
sublayer (zero output) add nothing (its post-norm of zero is zero); ``skip_layers`` / ``skip_sublayers`` attn
(scope all) are refused at the first sliding and the first full-attention layer, whose caches transformers sizes
the two masks from (``structural.plan.mask_layers``). ``prune_heads`` scope visual (YOPO) masks each cached
key by whether it is visual while decoding, so its patched prefill keeps the cache layers full (below).
Refused: flash-attention-style backends (2-D masks carry neither the window of original positions nor
the image block; transformers itself sets ``_supports_flash_attn = False`` for Gemma 3),
``use_bidirectional_attention`` text models, attention logit soft-capping,
``positions=repack`` (the rotary positions would disagree with the window of original positions).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..compat import attn_implementation, mask_format_for
from ..errors import InputError, UnsupportedModelError
from ..marking import mark_hook
from ..registry import ADAPTERS
from .base import HFAdapter, Seams, VisionSeams, VisualLayout, check_decoder_layers, hf_seams

LAYER_TYPES = ("sliding_attention", "full_attention")
_WINDOW = "_vlm_tokenprune_sliding_window"  # marks a cache layer this library turned from sliding into full


class Gemma3Adapter(HFAdapter):
    """HF Gemma 3 (4B / 12B / 27B vision models): SigLIP + Gemma3 text with sliding-window layers."""

    model_types = ("gemma3",)
    decoder_style = "Gemma"
    supports_pre_llm = True
    pre_llm_positions = ("gaps",)
    pre_llm_positions_why = ("Gemma 3's sliding window is over original positions, so kept tokens keep their "
                             "original rotary positions")
    # LLM-site positions=repack: Gemma 3's rotary embedding is per layer type, and renumbering would disagree
    # with the window of original positions
    llm_positions = ("gaps",)
    llm_positions_why = pre_llm_positions_why
    decode_gates = False  # sliding and full layers get different masks, built from original positions
    supports_structural = True  # every op; the layers the masks are sized from are refused (structural.plan.mask_layers)
    scoring_reads_layer_mask = True  # criteria see each scoring layer's own rows: window, image block, padding
    vision_no_cls = "the SigLIP tower has no CLS token"

    # -- structure ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        cfg = model.config
        text = cfg.text_config
        if text.model_type != "gemma3_text":
            raise UnsupportedModelError("config.text_config.model_type",
                                        f"{text.model_type!r} is not supported; allowed: gemma3_text")
        impl = attn_implementation(text)
        if mask_format_for(impl) == "2d":
            raise UnsupportedModelError(
                "attn_implementation",
                f"{impl!r} receives 2-D padding masks, which carry neither Gemma 3's sliding window of original "
                "positions nor its bidirectional image block (transformers sets _supports_flash_attn=False for "
                "Gemma3ForConditionalGeneration); allowed: eager, sdpa")
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError("config.text_config.use_bidirectional_attention",
                                        "bidirectional Gemma 3 text models are not supported; allowed: False")
        if getattr(text, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError(
                "config.text_config.attn_logit_softcapping",
                "attention logit soft-capping is not supported (criteria score without it); allowed: None")
        bad = sorted({t for t in (text.layer_types or []) if t not in LAYER_TYPES})
        if bad:
            raise UnsupportedModelError("config.text_config.layer_types",
                                        f"{bad} are not supported; allowed: {', '.join(LAYER_TYPES)}")
        check_decoder_layers(self.language_model(model).layers, self.decoder_style)

    def seams(self, model: nn.Module) -> Seams:
        # every cache layer holds the whole prompt while a patched prompt decodes (see install): layer 0 has it all
        return hf_seams(model, self.language_model(model))

    def vision_seams(self, model: nn.Module, where: str = "site") -> VisionSeams:
        """SigLIP for vision-site stages that keep whole pooling windows (module docstring: Vision site)."""
        vc = model.config.vision_config
        tower = model.model.vision_tower
        layers = tuple(getattr(tower, "vision_model", tower).encoder.layers)  # SiglipVisionModel
        proj = model.model.multi_modal_projector
        side = int(vc.image_size) // int(vc.patch_size)
        return VisionSeams(
            tower=tower, layers=layers, feature_layer=len(layers) - 1, select_strategy="default",
            n_patches=side * side, projector=proj, attn_implementation=attn_implementation(vc),
            groups=pooling_groups(model), cls_token=False, pack_point=proj.mm_soft_emb_norm, project_kept_only=False,
            group_kind=("average pooling", "pooling windows"))

    # -- visual tokens -----------------------------------------------------------------------
    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> VisualLayout:
        cfg = model.config
        n = int(cfg.mm_tokens_per_image)
        side = math.isqrt(n)
        is_visual = input_ids == cfg.image_token_id
        B, L = input_ids.shape
        image = torch.full_like(input_ids, -1)
        row, col = image.clone(), image.clone()
        for b in range(B):
            pos = is_visual[b].nonzero().flatten().tolist()
            if len(pos) % n:
                raise InputError("input_ids", f"row {b} has {len(pos)} image tokens, not a multiple of "
                                 f"mm_tokens_per_image={n} (one run of {n} placeholders per image)")
            # images in prompt order: the k-th group of n placeholders is image k (masked_scatter fills in order)
            k = torch.arange(len(pos), device=input_ids.device)
            idx = torch.tensor(pos, dtype=torch.long, device=input_ids.device)
            image[b, idx] = k // n
            row[b, idx] = (k % n) // side
            col[b, idx] = (k % n) % side
        return VisualLayout(is_visual, image, image.clone(), row, col, torch.zeros_like(is_visual))

    # -- seams of this family ------------------------------------------------------------------
    def install(self, handle: Any, model: nn.Module) -> None:
        """Sliding cache layers -> full layers for a patched prefill; back when nothing was pruned (module docstring)."""
        lm = self.language_model(model)

        def lm_pre(module, args, kwargs):
            st = handle.state
            if st is None or st.phase != "prefill":
                return None
            cache = cache_of(kwargs)
            if cache is None:
                use = kwargs.get("use_cache")
                if not (use if use is not None else getattr(module.config, "use_cache", False)):
                    return None
                from transformers.cache_utils import DynamicCache

                cache = DynamicCache(config=module.config)  # what the model would create, converted below
                kwargs = {**kwargs, _cache_kwarg(kwargs, module): cache}
            to_full_layers(cache)
            return args, kwargs

        def lm_post(module, args, kwargs, output):
            st = handle.state
            if st is None or st.phase != "prefill":
                return None
            plan = handle.structural  # YOPO heads mask each cached key by what it is while decoding: keep them all
            if st.prefill.pre_llm is None and all(r.noop for r in st.prefill.records) \
                    and not (plan is not None and plan.heads_visual):
                cache = cache_of(output) if hasattr(output, "get") else None
                if cache is not None:
                    to_sliding_layers(cache)
            return None

        handle.add_hook(f"{type(lm).__name__}: forward pre-hook (sliding cache layers -> full layers: the window is "
                        "applied by masks over original positions)",
                        lm.register_forward_pre_hook(mark_hook(lm_pre), with_kwargs=True))
        handle.add_hook(f"{type(lm).__name__}: forward hook (a prefill that pruned nothing: cache layers back to "
                        "sliding layers, as unpatched)",
                        lm.register_forward_hook(mark_hook(lm_post), with_kwargs=True))

    def decode_masks(self, handle: Any, masks: dict, kept: torch.Tensor, kept_ok: torch.Tensor, prompt_len: int,
                     past: int, q: int, dtype: torch.dtype) -> dict:
        """The language model's masks for ``q`` tokens after a pre-LLM-reduced prompt (its cache: the ``Mp``
        kept prompt tokens at original positions ``kept`` [B, Mp], then ``past - Mp`` decoded tokens), per
        layer type: causal over original positions, sliding layers within the window of original positions."""
        B, Mp = kept.shape
        dev = kept.device
        steps = torch.arange(past - Mp + q, device=dev) + prompt_len
        key_pos = torch.cat([kept, steps[None].expand(B, -1)], 1)  # [B, K]
        key_ok = torch.cat([kept_ok, torch.ones(B, steps.numel(), dtype=torch.bool, device=dev)], 1)
        q_pos = steps[-q:]  # [q]
        causal = (key_pos[:, None, :] <= q_pos[None, :, None]) & key_ok[:, None, :]  # [B, q, K]
        window = int(handle.seams.text_config.sliding_window)
        out = {}
        for name in masks:
            allowed = causal & (key_pos[:, None, :] > q_pos[None, :, None] - window) \
                if name == "sliding_attention" else causal
            allowed = allowed[:, None]
            if handle.seams.mask_format == "float4d":
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
            out[name] = allowed
        return out


class _Pooled(Exception):
    """Carries the projector's pooled tokens out of its forward (``pooling_groups``)."""


def pooling_groups(model: nn.Module) -> torch.Tensor:
    """``[G, g]``: the SigLIP patches (0-based raster index of the image's grid) each LLM token averages, ascending,
    found by running the model's own projector on one-hot-coded patches (patch ``p``: channel ``p`` is 1) up to its
    pooled tokens (a pre-hook on ``mm_soft_emb_norm`` takes them). Raises ``UnsupportedModelError`` unless every
    token is the equal-weight mean of its own disjoint set of patches and every patch is in one."""
    proj = model.model.multi_modal_projector
    vc = model.config.vision_config
    N = (int(vc.image_size) // int(vc.patch_size)) ** 2

    def take(module, args):
        raise _Pooled(args[0])

    hook = proj.mm_soft_emb_norm.register_forward_pre_hook(take)
    try:
        with torch.no_grad():
            proj(torch.eye(N, dtype=torch.float32, device=proj.mm_input_projection_weight.device)[None])
        pooled = None
    except _Pooled as e:
        pooled = e.args[0][0].float().cpu()  # [G, N]: token t's weight on patch p
    finally:
        hook.remove()
    bad = UnsupportedModelError("model.model.multi_modal_projector", "its tokens are not equal-weight means of "
                                "disjoint windows of patches, so whole windows cannot be kept; allowed: Gemma 3's "
                                "average pooling of the SigLIP patch grid")
    if pooled is None or pooled.shape[1] != N:
        raise bad
    member = pooled > 0
    g = int(member[0].sum())
    if g == 0 or N % g or pooled.shape[0] != N // g or not bool((member.sum(1) == g).all()) \
            or not bool((member.sum(0) == 1).all()) or not torch.allclose(pooled[member], torch.full((N,), 1.0 / g)):
        raise bad
    return member.nonzero()[:, 1].view(-1, g)


def cache_of(kwargs: Any) -> Any:
    """The cache in forward kwargs / an output: ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
    cache = kwargs.get("cache")
    # ``keys()``: asking transformers' outputs for the old name logs a deprecation warning
    return cache if cache is not None or "past_key_values" not in kwargs.keys() else kwargs.get("past_key_values")


def _cache_kwarg(kwargs: dict, module: nn.Module) -> str:
    """The name the language model's forward takes its cache under (``cache`` on transformers >= 5.2x)."""
    import inspect

    if "past_key_values" in kwargs:
        return "past_key_values"
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def to_full_layers(cache: Any) -> None:
    """Replace the EMPTY sliding-window layers of ``cache`` by full ``DynamicLayer``s (marked, so that
    ``to_sliding_layers`` can restore them)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    for j, layer in enumerate(layers):
        if isinstance(layer, DynamicSlidingWindowLayer) and layer.get_seq_length() == 0:
            full = DynamicLayer()
            setattr(full, _WINDOW, layer.sliding_window)
            layers[j] = full


def to_sliding_layers(cache: Any) -> None:
    """Undo ``to_full_layers`` after a prefill: each marked layer becomes the ``DynamicSlidingWindowLayer``
    the unpatched prefill would have left (its last ``window - 1`` keys / values, ``cumulative_length`` the
    prompt length)."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    for j, layer in enumerate(cache.layers):
        w = getattr(layer, _WINDOW, None)
        if w is None:
            continue
        sliding = DynamicSlidingWindowLayer(sliding_window=w)
        if layer.is_initialized:
            sliding.lazy_initialization(layer.keys, layer.values)
            sliding.cumulative_length = layer.keys.shape[-2]
            sliding.keys = layer.keys[:, :, -w + 1:, :]
            sliding.values = layer.values[:, :, -w + 1:, :]
        cache.layers[j] = sliding


ADAPTERS.register("gemma3", Gemma3Adapter())
