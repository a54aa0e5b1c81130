"""``patch(model, policy)``: resolve the adapter, parse the policy, check every site, then install every
site (``vlm_tokenprune.sites``); a failed check or install leaves the model untouched."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .adapters import resolve_adapter
from .adapters.base import Adapter
from .errors import PolicyError, UnsupportedModelError
from .generation_guard import install as install_generate_guard
from .handle import PatchHandle
from .marking import is_patched
from .ops import BACKENDS, check_backend
from .policy import Policy
from .sites import PatchTarget, check_all, install_all


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
    # a family preset (flowcut) takes this model's family setting; a preset's paper depth is mapped below
    pol = Policy.parse(policy, family=getattr(getattr(model, "config", None), "model_type", None))
    if backend not in BACKENDS:
        raise PolicyError("backend", f"{backend!r} is not available; allowed: {', '.join(BACKENDS)}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise UnsupportedModelError("model", "is torch.compile'd; patch the original module, then compile it")
    adapter = resolve_adapter(model)
    if not isinstance(adapter, Adapter):
        raise UnsupportedModelError(
            "adapter", f"{type(adapter).__name__} does not subclass vlm_tokenprune.adapters.base.Adapter; "
            "allowed: an Adapter subclass (its defaults declare every optional seam)")
    adapter.check(model)
    seams = adapter.seams(model)
    # a preset's paper layers (Stage.depth: written for a reference depth) -> this model's layers; handle.policy
    # holds the resolved policy (handle.requested_policy what was asked)
    requested, pol = pol, pol.at_depth(seams.num_layers, seams.first_full_attention_layer + 1)
    if is_patched(seams.top):
        raise UnsupportedModelError("model", "is already patched; call unpatch() on the existing handle first")
    gen_cfg = getattr(model, "generation_config", None)
    if getattr(gen_cfg, "cache_implementation", None) not in (None, "dynamic"):
        raise UnsupportedModelError(
            "generation_config.cache_implementation",
            f"{gen_cfg.cache_implementation!r} is not supported; allowed: None or 'dynamic' (DynamicCache)",
        )
    target = PatchTarget(model, adapter, seams, pol)
    plans = check_all(target)  # every site: layers, positions, criteria (bound), structural plan, vision tower
    param = next(model.parameters(), None)
    check_backend(backend, param.device if param is not None else "cpu")

    # -- nothing above touched the model; from here on, only hooks kept on the handle --
    if not isinstance(strict, bool):
        raise PolicyError("strict", f"must be True or False, got {strict!r}")
    handle = PatchHandle(model, pol, adapter, seams, target.criteria, backend)
    handle.strict = strict
    handle.requested_policy = requested
    handle.patcher = patch  # handle.use(policy) swaps policies with patch() itself (validated the same way)
    try:
        install_all(handle, plans)
        # generate() modes that would score with a candidate token as the prompt's last token: refused by name
        install_generate_guard(handle, model, handle.swap_attr)
    except BaseException:
        handle.unpatch()  # whatever was installed goes again: a failed patch() leaves the model untouched
        raise
    handle.active = True
    return handle


