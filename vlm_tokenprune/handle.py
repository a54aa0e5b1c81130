"""``PatchHandle``: owns every hook of one ``patch()`` call and undoes them (peft-style symmetry)."""
from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from .errors import InputError
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
        self.image_token_id = model.config.image_token_id
        # decoder layer j -> index of the stage whose criterion runs on layer j's input (stage.layer == j + 1)
        self.stage_after = {st.layer - 1: i for i, st in enumerate(policy.stages)}
        self.stage_at = {st.layer: i for i, st in enumerate(policy.stages)}
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
        self._sessions = weakref.WeakKeyDictionary()
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

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
            lines.append(f"stage {i}: {st.describe()}  (scores on layer {st.layer - 1}'s input, drops before layer {st.layer})")
        lines += [f"hook: {s}" for s in self._sites] if self.active else []
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PatchHandle(policy={self.policy.to_string()!r}, active={self.active})"
