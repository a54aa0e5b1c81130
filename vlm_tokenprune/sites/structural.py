"""The structural site: weight- and layer-level ops (skip_layers, prune_heads, ffn_cut,
neighbor_attention, skip_sublayers; ``visual_drop`` is a token stage of the LLM site).

``check`` resolves the policy's structural stages against the model (``structural.plan``: concrete
layers and heads, calibration files) and refuses weight slicing of offloaded layers;
``install_weights`` swaps in sliced projections (before the LLM site hooks k/v_proj for criteria),
``install`` registers the per-layer hooks, instance wrappers and the query-subset attention backend
(``structural.hooks``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import IncompatiblePolicyError, UnsupportedModelError
from ..handle import PatchHandle
from ..structural import hooks
from ..structural.plan import StructuralPlan, resolve

if TYPE_CHECKING:
    from . import PatchTarget


def check_supported(target: "PatchTarget") -> None:
    """Adapters that declare ``supports_structural = False`` refuse every structural op but visual_drop."""
    for i, st in enumerate(target.policy.stages):
        if st.structural and st.op != "visual_drop" and not target.adapter.supports_structural:
            raise IncompatiblePolicyError(
                f"stages[{i}].op",
                f"{st.op!r} is not supported for {target.model.config.model_type!r}; "
                "allowed: token stages (prune, merge, visual_drop)",
            )


def check(target: "PatchTarget") -> StructuralPlan | None:
    """The resolved plan (layers, heads, calibration files, mask format); None without structural ops."""
    plan = resolve(target.model, target.policy, target.seams)
    _check_sliced_weights_in_memory(target, plan)
    return plan


def _check_sliced_weights_in_memory(target: "PatchTarget", plan: StructuralPlan | None) -> None:
    """``ffn_cut`` and ``prune_heads(scope=all)`` read projection weights outside the modules' own forward.

    accelerate's offloading (``device_map`` with ``"cpu"`` / ``"disk"`` entries, ``max_memory``,
    ``cpu_offload``) keeps those weights on the meta device between calls and loads them in its
    ``AlignDevicesHook`` only while that module runs, so they cannot be sliced: refuse here. Every
    other op calls the modules themselves and works with offloaded layers.
    """
    if plan is None:
        return
    seams, pol = target.seams, target.policy
    reads = [("ffn_cut", None, j, seams.decoder_layers[j].mlp, ("gate_proj", "up_proj", "down_proj"), "mlp")
             for j in sorted(plan.ffn)]
    reads += [("prune_heads", "all", j, seams.decoder_layers[j].self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"),
               "self_attn") for j in sorted(plan.heads_all)]
    for op, scope, j, parent, names, prefix in reads:
        for name in names:
            if any(p.is_meta for p in getattr(parent, name).parameters(recurse=False)):
                i = next(i for i, s in enumerate(pol.stages) if s.op == op and (scope is None or s.params.get("scope") == scope))
                raise UnsupportedModelError(
                    f"stages[{i}].op",
                    f"{op}{'(scope=all)' if scope else ''} slices the weights of decoder layer {j}.{prefix}.{name}, which "
                    "are offloaded (meta device between calls, e.g. accelerate device_map with 'cpu'/'disk' offload); "
                    "allowed: keep those layers' weights in memory (a device_map without offload for them) or use an op "
                    "that calls the modules (token stages, skip_layers, prune_heads scope=visual, neighbor_attention)",
                )


def install_weights(handle: PatchHandle, plan: StructuralPlan | None) -> None:
    """Sliced attention projections first, so criteria capture / recompute with what really runs."""
    handle.structural = plan
    if plan is not None:
        hooks.install_modules(handle, plan)


def install(handle: PatchHandle, plan: StructuralPlan | None) -> None:
    """After the LLM site: its routed layer calls change a layer's kwargs before the layer (and its torch hooks)
    runs, so the structural hooks see the kwargs already shrunk by token stages."""
    if plan is not None:
        hooks.install_hooks(handle, plan)
        handle.structural_attention = hooks.install_attention(handle, plan)
