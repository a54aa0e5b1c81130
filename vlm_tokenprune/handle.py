"""``PatchHandle``: owns every hook of one ``patch()`` call and undoes them (peft-style symmetry).

Its public collaborator API is what the sites (``vlm_tokenprune.sites``) use while installing:
``add_hook`` (a torch hook handle, listed by ``describe()``), ``swap_attr`` (an instance attribute
replaced until ``unpatch()``), ``on_unpatch`` (any other undo). Per-forward state belongs to the
calling thread: ``state`` is the ``ForwardState`` of the forward running in THIS thread (several
threads may run forwards on one patched model at once), opened / closed by the LLM site's
top-level hooks (``open_state`` / ``close_state``); ``vision_run`` / ``vision_outcome`` are the
calling thread's vision-tower call and its result.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator

from torch import nn

from .errors import InputError, UnsupportedModelError
from .ops import Ops
from .policy import Policy
from .state import ForwardState, Trace


class _Swap:
    """One instance-level change and how to revert it exactly."""

    def __init__(self, obj: Any, name: str, new: Any):
        self.obj, self.name = obj, name
        self.had = name in vars(obj) or name in getattr(obj, "_modules", {})
        self.old = getattr(obj, name) if self.had else None
        setattr(obj, name, new)

    def undo(self) -> None:
        if self.had:
            setattr(self.obj, self.name, self.old)
        else:
            delattr(self.obj, self.name)


def _undo(st: ForwardState) -> None:
    """Revert what a forward changed in place (``ForwardState.undo``), newest first, once."""
    undo, st.undo = st.undo, []
    for fn in reversed(undo):
        fn()


class _SessionKey:
    """The tag a patched prefill puts on its KV cache (``cache._vtp_session``), naming the prompt the cache holds.

    ``copy.deepcopy`` / ``copy.copy`` of the cache keep the SAME tag (transformers' prompt-reuse recipe copies a
    prompt's cache and decodes from each copy), so a copy continues the same prompt: the same kept set per layer
    and, after a pre-LLM stage, the same positions. Pickling gives a new tag (the copy is then a cache this handle
    has not seen). A tag lives as long as some cache carries it.
    """

    __slots__ = ("__weakref__",)

    def __deepcopy__(self, memo) -> "_SessionKey":
        return self

    def __copy__(self) -> "_SessionKey":
        return self

    def __reduce__(self):
        return (_SessionKey, ())


SESSION_ATTR = "_vtp_session"


class _Call:
    """An undo that is a call (e.g. unregistering a name registered with transformers)."""

    def __init__(self, fn: Callable[[], None]):
        self.undo = fn


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
        # set by the sites' install (vlm_tokenprune.sites): decoder layer j -> the prune stage scoring on layer j's
        # input / the token stage applied before layer j; the structural plan; the vision tower's seams
        self.stage_after: dict[int, int] = {}
        self.stage_at: dict[int, int] = {}
        self.repacks_llm = False  # an LLM stage with positions=repack (sites.llm.install)
        self.decode_gates = False  # decode steps may run library code per token stage only (sites.routed_layers)
        self.structural = None  # structural.plan.StructuralPlan when the policy has structural ops
        self.vision_seams = None  # adapters.base.VisionSeams when the policy has a vision-site stage
        self.structural_attention = False  # True: skip_visual / neighbor layers run query-subset attention (real savings)
        self.structural_heads = False  # True: visual-scope head pruning slices q/k/v/o for visual rows
        self._restore: list = []  # undo records of instance-level changes, applied in reverse
        self._hooks: list = []
        self._sites: list[str] = []
        self._states: dict[int, ForwardState] = {}  # thread ident -> the forward running in that thread
        self._local = threading.local()  # per thread: last finished forward, vision run / outcome
        self._last: ForwardState | None = None  # the last forward finished in any thread
        self._last_prefill: ForwardState | None = None  # the last prefill finished in any thread
        self.requested_policy = policy  # the policy as written (patch() sets it; self.policy: resolved for the model)
        self.patcher: Callable[..., "PatchHandle"] | None = None  # patch() itself (set by it): use() swaps with it
        self._lock = threading.Lock()
        self._sessions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # _SessionKey -> PrefillRecord
        self.active = False

    # -- collaborator API (the sites) ---------------------------------------------------------
    def add_hook(self, site: str, removable: Any = None) -> None:
        """Keep ``removable`` (a torch ``RemovableHandle``; None: a change recorded with ``swap_attr`` /
        ``on_unpatch``) for ``unpatch()``, and list ``site`` in ``describe()``."""
        if removable is not None:
            self._hooks.append(removable)
        self._sites.append(site)

    def swap_attr(self, obj: Any, name: str, new: Any) -> None:
        """Set ``obj.name = new`` on the instance; ``unpatch()`` restores the old value (or deletes it) exactly."""
        self._restore.append(_Swap(obj, name, new))

    def on_unpatch(self, undo: Callable[[], None]) -> None:
        """Call ``undo()`` in ``unpatch()`` (after every hook is removed, newest first with ``swap_attr``)."""
        self._restore.append(_Call(undo))

    # -- per-forward state (the calling thread's) ---------------------------------------------
    @property
    def state(self) -> ForwardState | None:
        """The forward running in the calling thread (None outside a forward)."""
        return self._states.get(threading.get_ident())

    @property
    def busy(self) -> bool:
        """True while some live thread is inside a forward of this patched model."""
        alive = {t.ident for t in threading.enumerate()}
        with self._lock:
            for ident in [i for i in self._states if i not in alive]:  # a thread that died mid-forward
                del self._states[ident]
            return bool(self._states)

    def open_state(self, st: ForwardState) -> None:
        self._states[threading.get_ident()] = st

    def close_state(self) -> ForwardState | None:
        """End the calling thread's forward; its state becomes the last trace. Idempotent."""
        st = self._states.pop(threading.get_ident(), None)
        if st is not None:
            _undo(st)
            st.cache = None  # keep no reference to the caller's KV cache
            self._local.last = st
            self._last = st
            if st.phase == "prefill":  # last_trace("prefill") after generate(): the prompt's, not the last step's
                self._local.last_prefill = st
                self._last_prefill = st
        return st

    def discard_state(self) -> None:
        """Forget the calling thread's state without recording it (left by an interrupted call)."""
        st = self._states.pop(threading.get_ident(), None)
        if st is not None:
            _undo(st)

    @property
    def last_state(self) -> ForwardState | None:
        """The calling thread's last finished forward (else the last of any thread)."""
        return getattr(self._local, "last", None) or self._last

    def reset_trace(self) -> None:
        """Forget the last forward (``last_trace()`` is None until the next one finishes)."""
        self._local.last = None
        self._last = None
        self._local.last_prefill = None
        self._last_prefill = None

    def session(self, cache: Any):
        """The ``PrefillRecord`` a cache continues (None: not a prompt this handle saw). A copy of a cache
        (``copy.deepcopy``) continues the same prompt (``_SessionKey``)."""
        key = getattr(cache, "__dict__", {}).get(SESSION_ATTR)
        if key is None:
            return None
        with self._lock:
            return self._sessions.get(key)

    def remember(self, cache: Any, record: Any, *, replace: bool = True) -> None:
        """``cache`` holds the prompt of ``record`` (``replace=False``: unless it already holds one of this handle's).
        A new prompt gets a new tag, so copies taken of the cache before still continue their own prompt."""
        with self._lock:
            key = getattr(cache, "__dict__", {}).get(SESSION_ATTR)
            if not replace and key is not None and key in self._sessions:
                return
            key = _SessionKey()
            setattr(cache, SESSION_ATTR, key)
            self._sessions[key] = record

    @property
    def n_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def vision_run(self) -> Any:
        """``vision.state.VisionRun`` of the tower call in progress in this thread."""
        return getattr(self._local, "vision_run", None)

    @vision_run.setter
    def vision_run(self, run: Any) -> None:
        self._local.vision_run = run

    @property
    def vision_outcome(self) -> Any:
        """``vision.state.VisionOutcome`` of this thread's last tower call, until the LLM input takes it."""
        return getattr(self._local, "vision_outcome", None)

    @vision_outcome.setter
    def vision_outcome(self, out: Any) -> None:
        self._local.vision_outcome = out

    # -- lifecycle -----------------------------------------------------------------------------
    def unpatch(self) -> None:
        """Remove every hook; the model is exactly as before ``patch()``. Calling twice is a no-op."""
        if self.busy:
            raise InputError("unpatch", "called while a forward is running; unpatch after it returns")
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        while self._restore:  # modules and instance attributes swapped at install, newest first
            self._restore.pop().undo()
        with self._lock:
            self._sessions = weakref.WeakKeyDictionary()
        self.active = False

    @contextlib.contextmanager
    def use(self, policy: "str | Policy | Any") -> Iterator["PatchHandle"]:
        """``with handle.use(policy):`` calls in the block run under ``policy``; on exit the handle's own policy
        is back. For servers and sweeps: the same handle (``last_trace()``, ``describe()``, ``policy``) follows.

        ``policy`` is validated exactly like ``patch()`` (it IS a ``patch()``): a bad one raises here and the
        handle keeps its own policy. Swapping costs a ``patch()`` each way (hooks removed and installed, learned
        weights bound again), not a forward. Refused while a forward runs (in any thread).
        """
        if not self.active:
            raise InputError("use", "the handle is unpatched; call patch() again")
        if self.busy:
            raise InputError("use", "called while a forward is running; switch policies between calls")
        patcher, own = self.patcher, self.requested_policy
        kwargs = {"backend": self.backend, "strict": getattr(self, "strict", False)}
        self.unpatch()
        try:
            temporary = patcher(self.model, policy, **kwargs)
        except BaseException:
            self.__dict__ = patcher(self.model, own, **kwargs).__dict__  # own policy back, then the error
            raise
        # the hooks were installed for ``temporary``: this handle shares its attributes (one dict), so every
        # method of this object reads and undoes what they do
        self.__dict__ = temporary.__dict__
        try:
            yield self
        finally:
            if self.busy:  # pragma: no cover - a forward left running in another thread
                raise InputError("use", "a forward is still running at the end of the block")
            self.unpatch()
            self.__dict__ = patcher(self.model, own, **kwargs).__dict__

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
    def last_trace(self, phase: str | None = None) -> Trace | None:
        """Per stage of the last forward: kept visual positions per sample, counts, scoring time.

        ``phase="prefill"``: the last PREFILL's trace (after ``generate()`` the last forward is a decode
        step; profiling wants the prompt's); ``"decode"``: the last forward if it was a decode step.
        """
        if phase not in (None, "prefill", "decode"):
            raise InputError("phase", f"{phase!r}; allowed: None (the last forward), 'prefill', 'decode'")
        if phase == "prefill":
            last = getattr(self._local, "last_prefill", None) or self._last_prefill
        else:
            last = self.last_state
            if phase == "decode" and last is not None and last.phase != "decode":
                last = None
        return None if last is None else Trace.from_state(last)

    def describe(self) -> str:
        """Every hook site this handle installed, and the policy's stages."""
        lines = [f"vlm_tokenprune patch ({'active' if self.active else 'removed'}), backend={self.backend}",
                 f"model: {type(self.model).__name__} ({self.model.config.model_type}), "
                 f"attention: {self.seams.attn_implementation} (mask {self.seams.mask_format})"]
        requested = getattr(self, "requested_policy", None)
        if requested is not None and requested != self.policy:  # a preset's paper layers mapped (Policy.at_depth)
            lines += [f"policy as written: {requested.to_string()}",
                      f"policy on this model ({self.seams.num_layers} decoder layers): {self.policy.to_string()}"]
        for i, st in enumerate(self.policy.stages):
            if st.is_vision:
                lines.append(f"stage {i}: {st.describe()}  ({st.op} between vision-encoder layers; empty slots dropped "
                             f"at the language model's input, positions {st.params['positions']})")
            elif st.is_pre_llm:
                lines.append(f"stage {i}: {st.describe()}  ({st.op} at the language model's input, before layer 0; "
                             f"positions {st.params['positions']})")
            elif st.op in ("prune", "merge"):
                after = ("; among the tokens the pre_llm stage left, keep counted of the original visual tokens"
                         if any(s.is_pre_llm for s in self.policy.stages[:i]) else "")
                does = "drops" if st.op == "prune" else "drops / merges"
                lines.append(f"stage {i}: {st.describe()}  (scores on layer {st.layer - 1}'s input, {does} before "
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
