"""``PatchHandle``: owns every hook of one ``patch()`` call and undoes them (peft-style symmetry)."""
from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from .errors import InputError, UnsupportedModelError
from .ops import Ops
from .policy import Policy
from .state import ForwardState, Trace


class PatchHandle:
    """Returned by ``patch()``. ``unpatch()`` (idempotent) removes every hook; usable as a context manager."""

    def __init__(self, model: nn.Module, policy: Policy, adapter: Any, seams: Any, criteria: list, backend: str):
        self.model = model
        self.policy = policy
        self.adapter = adapter
        self.seams = seams
        self.criteria = criteria
        self.backend = backend
        self.ops = Ops(backend)  # the hot ops on this backend; the engine and every ScoringContext use it
        self.image_token_id = getattr(model.config, "image_token_id", None)  # None: the original LLaVA (spliced features)
        # decoder layer j -> index of the stage whose criterion runs on layer j's input (stage.layer == j + 1)
        # (prune stages only: visual_drop needs no criterion); stage_at: every token stage (prune, visual_drop)
        self.stage_after = {st.layer - 1: i for i, st in enumerate(policy.stages) if st.op == "prune" and st.site == "llm"}
        self.stage_at = {st.layer: i for i, st in enumerate(policy.stages) if st.changes_tokens}
        self.structural = None  # structural.plan.StructuralPlan when the policy has structural ops
        self.vision_seams = None  # adapters.base.VisionSeams when the policy has a vision-site stage
        self._vision_run = None  # vision.state.VisionRun of the tower call in progress
        self._vision_out = None  # vision.state.VisionOutcome of the last tower call, until the LLM input takes it
        self.structural_attention = False  # True: skip_visual / neighbor layers run query-subset attention (real savings)
        self.structural_heads = False  # True: visual-scope head pruning slices q/k/v/o for visual rows
        self._restore: list = []  # undo records of instance-level changes (structural.hooks), applied in reverse
        self._hooks: list = []
        self._sites: list[str] = []
        self._state: ForwardState | None = None
        self._last: ForwardState | None = None
        self._sessions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self.active = False

    # -- lifecycle -----------------------------------------------------------------------------
    def _add(self, site: str, removable) -> None:
        self._hooks.append(removable)
        self._sites.append(site)

    def unpatch(self) -> None:
        """Remove every hook; the model is exactly as before ``patch()``. Calling twice is a no-op."""
        if self._state is not None:
            raise InputError("unpatch", "called while a forward is running; unpatch after it returns")
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        while self._restore:  # modules and instance attributes swapped by structural ops, newest first
            self._restore.pop().undo()
        self._sessions = weakref.WeakKeyDictionary()
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __reduce_ex__(self, protocol):
        # reached through the model's hook dicts by copy.deepcopy(model), pickle.dumps(model), torch.save(model)
        raise UnsupportedModelError(
            "model", "a patched model cannot be deep-copied, pickled or torch.save'd whole: its hooks belong to one "
            "PatchHandle; allowed: save model.state_dict() or save_pretrained() (the unpatched weights), or "
            "handle.unpatch(), copy / save the model, then patch() each copy")

    def __exit__(self, *exc) -> None:
        self.unpatch()

    # -- observability -------------------------------------------------------------------------
    def last_trace(self) -> Trace | None:
        """Per stage of the last forward: kept visual positions per sample, counts, scoring time."""
        return None if self._last is None else Trace.from_state(self._last)

    def describe(self) -> str:
        """Every hook site this handle installed, and the policy's stages."""
        lines = [f"vlm_tokenprune patch ({'active' if self.active else 'removed'}), backend={self.backend}",
                 f"model: {type(self.model).__name__} ({self.model.config.model_type}), "
                 f"attention: {self.seams.attn_implementation} (mask {self.seams.mask_format})"]
        for i, st in enumerate(self.policy.stages):
            if st.site == "vision":
                lines.append(f"stage {i}: {st.describe()}  ({st.op} between vision-encoder layers; empty slots dropped "
                             f"at the language model's input, positions {st.params['positions']})")
            elif st.site == "pre_llm":
                lines.append(f"stage {i}: {st.describe()}  ({st.op} at the language model's input, before layer 0; "
                             f"positions {st.params['positions']})")
            elif st.op == "prune":
                after = ("; among the tokens the pre_llm stage left, keep counted of the original visual tokens"
                         if any(s.site == "pre_llm" for s in self.policy.stages[:i]) else "")
                lines.append(f"stage {i}: {st.describe()}  (scores on layer {st.layer - 1}'s input, drops before "
                             f"layer {st.layer}{after})")
            elif st.op == "visual_drop":
                lines.append(f"stage {i}: {st.describe()}  (every visual token removed before layer {st.layer}; real savings)")
            else:
                lines.append(f"stage {i}: {st.describe()}")
        if self.structural is not None:
            lines += [f"  {line}" for line in self.structural.describe(self.structural_attention)]
        lines += [f"hook: {s}" for s in self._sites] if self.active else []
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PatchHandle(policy={self.policy.to_string()!r}, active={self.active})"
