"""``patch(model, policy)``: validate everything, then register hooks."""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from torch import nn

from . import engine
from .adapters import resolve_adapter
from .errors import IncompatiblePolicyError, PolicyError, UnsupportedModelError
from .handle import PatchHandle
from .ops import BACKENDS, check_backend
from .policy import Policy
from .registry import CRITERIA


def _mark(fn):
    fn.__vtp__ = True
    return fn


def is_patched(model: nn.Module) -> bool:
    return any(getattr(h, "__vtp__", False) for h in getattr(model, "_forward_pre_hooks", {}).values())


def patch(model: nn.Module, policy: "str | Mapping | Policy", *, backend: str = "auto", strict: bool = False) -> PatchHandle:
    """Insert the policy's hooks into ``model`` and return a handle that removes them.

    Everything is validated first (policy, model type, layers, cache, backend); a failed
    ``patch()`` leaves the model untouched.

    Args:
        model: a Hugging Face LLaVA, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL ``...ForConditionalGeneration``.
        policy: a policy string (``"fastv:layer=2,keep=0.25"``), dict or ``Policy``.
        backend: where the hot ops (attention-row scores, top-k, token gathers) run (``ops``):
            ``"torch"`` (PyTorch reference), ``"triton"`` (Triton kernels: CUDA, or CPU under
            ``TRITON_INTERPRET=1``; an error here if they cannot run) or ``"auto"`` (Triton on CUDA
            tensors when it is installed, else PyTorch).
    """
    pol = Policy.parse(policy)
    if backend not in BACKENDS:
        raise PolicyError("backend", f"{backend!r} is not available; allowed: {', '.join(BACKENDS)}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise UnsupportedModelError("model", "is torch.compile'd; patch the original module, then compile it")
    adapter = resolve_adapter(model)
    adapter.check(model)
    seams = adapter.seams(model)
    if is_patched(seams.top):
        raise UnsupportedModelError("model", "is already patched; call unpatch() on the existing handle first")
    gen_cfg = getattr(model, "generation_config", None)
    if getattr(gen_cfg, "cache_implementation", None) not in (None, "dynamic"):
        raise UnsupportedModelError(
            "generation_config.cache_implementation",
            f"{gen_cfg.cache_implementation!r} is not supported; allowed: None or 'dynamic' (DynamicCache)",
        )
    for i, st in enumerate(pol.stages):
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
    for i, st in enumerate(pol.stages):
        if st.site != "pre_llm":
            continue
        if seams.language_model is None or not getattr(adapter, "supports_pre_llm", False):
            raise IncompatiblePolicyError(
                f"stages[{i}].site",
                f"pre_llm is not supported for {model.config.model_type!r} yet; "
                "allowed models: llava, llava_next, qwen2_vl, qwen2_5_vl",
            )
        allowed = getattr(adapter, "pre_llm_positions", ("gaps", "repack"))
        if st.params.get("positions") not in allowed:
            raise IncompatiblePolicyError(
                f"stages[{i}].positions",
                f"{st.params.get('positions')!r} is not defined for {model.config.model_type!r} "
                f"({getattr(adapter, 'pre_llm_positions_why', '')}); allowed: {', '.join(allowed)}",
            )
    for i, st in enumerate(pol.stages):
        if st.structural and st.op != "visual_drop" and not getattr(adapter, "supports_structural", True):
            raise IncompatiblePolicyError(
                f"stages[{i}].op",
                f"{st.op!r} is not supported for {model.config.model_type!r}; allowed: token stages (prune, merge, visual_drop)",
            )
    criteria = [CRITERIA.get(st.criterion, f"stages[{i}].criterion") if not st.structural else None
                for i, st in enumerate(pol.stages)]
    criteria = [c.bind(model, st.params, f"stages[{i}]") if c is not None else None  # learned weights load here
                for i, (c, st) in enumerate(zip(criteria, pol.stages))]
    from .structural.plan import resolve

    plan = resolve(model, pol, seams)  # structural stages: layers, heads, calibration files, mask format
    _check_sliced_weights_in_memory(pol, plan, seams)
    from .vision.hooks import check as check_vision

    vision_seams = check_vision(model, adapter, pol, criteria, seams)  # None without a vision stage
    param = next(model.parameters(), None)
    check_backend(backend, param.device if param is not None else "cpu")

    # -- nothing above touched the model; from here on, only hooks kept on the handle --
    if not isinstance(strict, bool):
        raise PolicyError("strict", f"must be True or False, got {strict!r}")
    handle = PatchHandle(model, pol, adapter, seams, criteria, backend)
    handle.strict = strict
    handle.structural = plan
    handle.vision_seams = vision_seams
    try:
        _install(handle, model, pol, seams, plan)
    except BaseException:
        handle.unpatch()  # whatever was installed goes again: a failed patch() leaves the model untouched
        raise
    handle.active = True
    return handle


def _check_sliced_weights_in_memory(pol: Policy, plan: Any, seams: Any) -> None:
    """``ffn_cut`` and ``prune_heads(scope=all)`` read projection weights outside the modules' own forward.

    accelerate's offloading (``device_map`` with ``"cpu"`` / ``"disk"`` entries, ``max_memory``,
    ``cpu_offload``) keeps those weights on the meta device between calls and loads them in its
    ``AlignDevicesHook`` only while that module runs, so they cannot be sliced: refuse here. Every
    other op calls the modules themselves and works with offloaded layers.
    """
    if plan is None:
        return
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


def _install(handle: PatchHandle, model: nn.Module, pol: Policy, seams: Any, plan: Any) -> None:
    from .structural.hooks import install_attention, install_hooks, install_modules

    if plan is not None:  # sliced projections first, so criteria capture/recompute with what really runs
        install_modules(handle, plan)
    top = seams.top
    handle._add(
        f"{type(top).__name__}: forward pre-hook (find visual tokens, open per-forward state)",
        top.register_forward_pre_hook(_mark(functools.partial(engine.top_pre_hook, handle)), with_kwargs=True),
    )
    handle._add(
        f"{type(top).__name__}: forward hook, always called (close per-forward state)",
        top.register_forward_hook(
            _mark(functools.partial(engine.top_post_hook, handle)), with_kwargs=True, always_call=True
        ),
    )
    if any(st.site in ("pre_llm", "vision") for st in pol.stages):
        lm = seams.language_model
        handle._add(
            f"{type(lm).__name__}: forward pre-hook (pre_llm / vision stage: reduce inputs_embeds, position ids, 2-D mask)",
            lm.register_forward_pre_hook(_mark(functools.partial(engine.lm_pre_hook, handle)), with_kwargs=True),
        )
    for j, layer in enumerate(seams.decoder_layers):
        roles = []
        if j in handle.stage_at:
            roles.append(f"score stage {handle.stage_at[j]} and drop tokens")
        if any(st.changes_tokens and st.layer <= j for st in pol.stages):
            roles.append("shrink mask/positions")
        if j in handle.stage_after:
            roles.append(f"keep input for stage {handle.stage_after[j]}'s criterion")
            for what in ("k", "v"):
                handle._add(
                    f"decoder layer {j}: self_attn.{what}_proj forward hook (capture for stage {handle.stage_after[j]})",
                    getattr(layer.self_attn, f"{what}_proj").register_forward_hook(
                        _mark(functools.partial(engine.capture_hook, handle, j, what))
                    ),
                )
        handle._add(
            f"decoder layer {j}: forward pre-hook ({', '.join(roles) or 'count tokens'})",
            layer.register_forward_pre_hook(
                _mark(functools.partial(engine.layer_pre_hook, handle, j)), with_kwargs=True
            ),
        )
    if handle.vision_seams is not None:  # vision-site stage: hooks on the vision tower (vlm_tokenprune.vision)
        from .vision.hooks import install as install_vision

        install_vision(handle, handle.vision_seams)
    if plan is not None:  # after the engine's layer pre-hooks: they see the kwargs already shrunk by token stages
        install_hooks(handle, plan)
        handle.structural_attention = install_attention(handle, plan)
    if hasattr(handle.adapter, "install"):  # the adapter's own seams (e.g. the original LLaVA's splice recorder)
        handle.adapter.install(handle, model)
