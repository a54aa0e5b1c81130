"""The LLM site: token stages between decoder layers (``site="llm"``: prune, visual_drop).

``check`` validates each token stage's layer against the model; ``install`` registers the
top-level hooks that open and close the calling thread's forward state (plus the forward
wrapper that releases it on any exit) and k/v capture hooks on the layers a criterion scores
from. The decoder layers whose input a stage changes are
reached through ``RoutedLayers`` (``sites.routed_layers``), not torch hooks, so a decode step that changes
nothing there runs no library code per layer. The hook bodies are in ``engine``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .. import engine
from ..adapters.base import uses_sliding_window
from ..errors import IncompatiblePolicyError, UnsupportedModelError
from ..handle import PatchHandle
from ..marking import mark_hook
from .routed_layers import RoutedLayers

if TYPE_CHECKING:
    from . import PatchTarget


@dataclass(frozen=True)
class LLMPlan:
    """``stage_after``: decoder layer j -> the prune stage whose criterion runs on layer j's input
    (``stage.layer == j + 1``); ``stage_at``: layer j -> the token stage (prune, visual_drop) applied before it."""

    stage_after: dict
    stage_at: dict


def check(target: "PatchTarget") -> LLMPlan:
    seams = target.seams
    for i, st in enumerate(target.policy.stages):
        if not st.changes_tokens:
            continue
        if st.layer >= seams.num_layers:
            raise IncompatiblePolicyError(
                f"stages[{i}].layer", f"{st.layer} is beyond the model; allowed: 1..{seams.num_layers - 1}"
            )
        if st.layer <= seams.first_full_attention_layer:
            raise IncompatiblePolicyError(
                f"stages[{i}].layer",
                f"{st.layer} is at or below the first full-attention layer ({seams.first_full_attention_layer}); "
                f"allowed: {seams.first_full_attention_layer + 1}..{seams.num_layers - 1}",
            )
        if st.params.get("positions", "gaps") != "gaps":
            _check_positions(target, i, st)
    stages = target.policy.stages
    return LLMPlan(
        stage_after={st.layer - 1: i for i, st in enumerate(stages) if st.scores_on_llm_layer},
        stage_at={st.layer: i for i, st in enumerate(stages) if st.changes_tokens},
    )


def _check_positions(target: "PatchTarget", i: int, st) -> None:
    """``positions=repack`` on an LLM stage: defined where the model's rotary embedding takes 1-D position ids."""
    model, adapter, seams = target.model, target.adapter, target.seams
    positions = st.params["positions"]
    if positions not in adapter.llm_positions:
        raise IncompatiblePolicyError(
            f"stages[{i}].positions", f"{positions!r} is not defined for {model.config.model_type!r} "
            f"({adapter.llm_positions_why}); allowed: {', '.join(adapter.llm_positions)}")
    rope_type = str(getattr(seams.rotary_emb, "rope_type", "default"))
    if seams.rotary_emb is None or "dynamic" in rope_type:
        why = (f"rope_type {rope_type!r}: its rotary frequencies depend on the longest position, which renumbering "
               "changes" if seams.rotary_emb is not None else
               "its language model has no model-level rotary_emb(x, position_ids) to build renumbered rotary tables "
               "with (e.g. the original LLaVA code base, whose attention builds them per layer)")
        raise IncompatiblePolicyError(f"stages[{i}].positions", f"{positions!r} is not defined for "
                                      f"{model.config.model_type!r} ({why}); allowed: gaps")


def install(handle: PatchHandle, plan: LLMPlan) -> None:
    handle.stage_after, handle.stage_at = plan.stage_after, plan.stage_at
    # an LLM stage renumbers positions: prefill tracks the kept tokens' position ids from there on
    handle.repacks_llm = any(st.changes_tokens and st.params.get("positions") == "repack" for st in handle.policy.stages)
    seams, pol = handle.seams, handle.policy
    top = seams.top
    handle.add_hook(
        f"{type(top).__name__}: forward pre-hook (find visual tokens, open this thread's forward state)",
        top.register_forward_pre_hook(mark_hook(functools.partial(engine.top_pre_hook, handle)), with_kwargs=True),
    )
    handle.add_hook(
        f"{type(top).__name__}: forward hook, always called (close this thread's forward state)",
        top.register_forward_hook(
            mark_hook(functools.partial(engine.top_post_hook, handle)), with_kwargs=True, always_call=True
        ),
    )
    handle.swap_attr(top, "forward", engine.guard_forward(handle, top.forward))
    handle.add_hook(f"{type(top).__name__}.forward: instance wrapper (releases the forward state on any exit, "
                    "KeyboardInterrupt included; undone by unpatch)")
    hooked = hooked_layers(handle, plan)
    calls = {}
    for j, layer in enumerate(seams.decoder_layers):
        if j not in hooked:  # the policy never changes this layer's input: never routed through library code
            continue
        roles = []
        if j in plan.stage_at:
            roles.append(f"score stage {plan.stage_at[j]} and drop tokens")
        if any(st.changes_tokens and st.layer <= j for st in pol.stages):
            roles.append("shrink mask/positions")
        if j == 0 and _reads_embeds(handle):
            roles.append("keep its input for the criteria (ScoringContext.embeds)")
        if j in plan.stage_after:
            roles.append(f"keep input for stage {plan.stage_after[j]}'s criterion")
            for what in ("k", "v"):
                handle.add_hook(
                    f"decoder layer {j}: self_attn.{what}_proj forward hook (capture for stage {plan.stage_after[j]})",
                    getattr(layer.self_attn, f"{what}_proj").register_forward_hook(
                        mark_hook(functools.partial(engine.capture_hook, handle, j, what))
                    ),
                )
        calls[j] = functools.partial(engine.layer_pre_hook, handle, j)
        handle.add_hook(f"decoder layer {j}: input change before the layer, routed call "
                        f"({', '.join(roles) or 'position ids for the reduced input'})")
    if calls:
        _route_layers(handle, plan, calls)


def _route_layers(handle: PatchHandle, plan: LLMPlan, calls: dict) -> None:
    """Put ``RoutedLayers`` in place of the text model's ``layers`` (same modules, same names; undone by unpatch)."""
    seams = handle.seams
    owner = seams.language_model
    layers = getattr(owner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or tuple(layers) != tuple(seams.decoder_layers):
        raise UnsupportedModelError("model", f"{type(owner).__name__}.layers is not the ModuleList of its decoder "
                                    "layers; allowed: text models that run their decoder layers from self.layers")
    # gated decode steps (library code once per token stage, not per layer): one mask object reaches every layer,
    # no per-layer position-id rule (flash ``2d`` after a pre-LLM stage), no structural op reading the mask
    no_pid = seams.mask_format == "2d" and any(st.reduces_input for st in handle.policy.stages)
    handle.decode_gates = (not uses_sliding_window(seams.text_config) and handle.adapter.decode_gates
                           and not no_pid and handle.structural is None and bool(plan.stage_at))
    handle.swap_attr(owner, "layers", RoutedLayers(layers, handle, calls, tuple(plan.stage_at)))
    handle.add_hook(f"{type(owner).__name__}.layers: RoutedLayers (the same decoder layers; inside a patched "
                    "forward it routes the hooked layers' calls through the library; undone by unpatch)")


def hooked_layers(handle: PatchHandle, plan: LLMPlan) -> frozenset:
    """The decoder layers routed through ``engine.layer_pre_hook`` (``RoutedLayers``): every layer from the first
    one whose input a token stage changes or a criterion scores on (``stage_after``, ``stage_at``); layer 0 when a
    criterion reads its input (``Criterion.reads_embeds``: ``ScoringContext.embeds``); every layer when a pre-LLM /
    vision stage runs under a ``2d`` mask (flash attention: position ids dropped). The layers before the first
    stage are never routed, so a decode step runs no library code there (issue reliability-2 item 8);
    ``ForwardState.tokens_per_layer`` is filled without them (``engine``)."""
    n = handle.seams.num_layers
    if handle.seams.mask_format == "2d" and any(st.reduces_input for st in handle.policy.stages):
        return frozenset(range(n))
    starts = [*plan.stage_after, *plan.stage_at]
    if not starts:
        return frozenset()
    return frozenset(range(min(starts), n)) | (frozenset({0}) if _reads_embeds(handle) else frozenset())


def _reads_embeds(handle: PatchHandle) -> bool:
    return any(getattr(c, "reads_embeds", False) for c in handle.criteria if c is not None)
