"""The sites where a policy acts, one module each: ``llm`` (decoder layers), ``pre_llm`` (the language
model's input), ``vision`` (between vision-encoder layers) and ``structural`` (weight- and layer-level ops).

Every site has ``check(target) -> plan`` (validates, touches nothing; None: the policy has nothing
there) and ``install(handle, plan)`` (registers its hooks on the handle). ``patch()`` checks every
site, then installs every site, in the one order below: this is the only place sites are dispatched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..adapters.base import Adapter, Seams
from ..handle import PatchHandle
from ..policy import Policy
from ..registry import CRITERIA
from . import llm, pre_llm, structural, vision


@dataclass
class PatchTarget:
    """What every site's ``check`` reads: the model, its adapter and seams, the policy, its bound criteria."""

    model: nn.Module
    adapter: Adapter
    seams: Seams
    policy: Policy
    criteria: list = field(default_factory=list)  # per stage: the bound criterion (None: structural stage)


def bind_criteria(target: PatchTarget) -> list:
    """Each token stage's criterion, bound to the model (learned weights load and are checked here)."""
    pol = target.policy
    found = [CRITERIA.get(st.criterion, f"stages[{i}].criterion") if not st.structural else None
             for i, st in enumerate(pol.stages)]
    return [c.bind(target.model, st.params, f"stages[{i}]", target.seams) if c is not None else None
            for i, (c, st) in enumerate(zip(found, pol.stages))]


def check_all(target: PatchTarget) -> dict[str, Any]:
    """Every site's plan, in the order their errors are reported; nothing is touched."""
    plans = {"llm": llm.check(target), "pre_llm": pre_llm.check(target)}
    structural.check_supported(target)
    target.criteria = bind_criteria(target)
    plans["structural"] = structural.check(target)
    plans["vision"] = vision.check(target)
    return plans


# (site, install): sliced projections first, so criteria capture / recompute with what really runs; the
# structural hooks after the LLM site's routed layer calls, so they see the kwargs already shrunk by token stages
INSTALL_ORDER = (
    ("structural", structural.install_weights),
    ("llm", llm.install),
    ("pre_llm", pre_llm.install),
    ("vision", vision.install),
    ("structural", structural.install),
)


def install_all(handle: PatchHandle, plans: dict[str, Any]) -> None:
    """Register every site's hooks on ``handle``, then the adapter's own (e.g. the original LLaVA's splice recorder)."""
    for site, install in INSTALL_ORDER:
        install(handle, plans[site])
    handle.adapter.install(handle, handle.model)


__all__ = ["INSTALL_ORDER", "PatchTarget", "bind_criteria", "check_all", "install_all"]
