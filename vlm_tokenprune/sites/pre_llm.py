"""The pre-LLM site: stages that shorten the language model's input before decoder layer 0
(``site="pre_llm"``, and the hand-over of a vision-site stage's reduced features).

``check`` validates support and the ``positions`` convention on this model; ``install`` registers
the language model's forward pre-hook (``engine.lm_pre_hook``).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .. import engine
from ..errors import IncompatiblePolicyError
from ..handle import PatchHandle
from ..marking import mark_hook

if TYPE_CHECKING:
    from . import PatchTarget


def check(target: "PatchTarget") -> bool:
    """True when the language model's input hook is needed (a pre_llm or vision stage)."""
    model, adapter, seams = target.model, target.adapter, target.seams
    for i, st in enumerate(target.policy.stages):
        if st.site != "pre_llm":
            continue
        if seams.language_model is None or not adapter.supports_pre_llm:
            raise IncompatiblePolicyError(
                f"stages[{i}].site",
                f"pre_llm is not supported for {model.config.model_type!r} yet; "
                "allowed models: llava, llava_next, qwen2_vl, qwen2_5_vl",
            )
        allowed = adapter.pre_llm_positions
        if st.params.get("positions") not in allowed:
            raise IncompatiblePolicyError(
                f"stages[{i}].positions",
                f"{st.params.get('positions')!r} is not defined for {model.config.model_type!r} "
                f"({adapter.pre_llm_positions_why}); allowed: {', '.join(allowed)}",
            )
    return any(st.site in ("pre_llm", "vision") for st in target.policy.stages)


def install(handle: PatchHandle, needed: bool) -> None:
    if not needed:
        return
    lm = handle.seams.language_model
    handle.add_hook(
        f"{type(lm).__name__}: forward pre-hook (pre_llm / vision stage: reduce inputs_embeds, position ids, 2-D mask)",
        lm.register_forward_pre_hook(mark_hook(functools.partial(engine.lm_pre_hook, handle)), with_kwargs=True),
    )
