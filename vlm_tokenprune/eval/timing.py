"""Timing and memory of calls for the profiler: interleaved patched / unpatched measurement, timers,
peak memory, and the call objects timed (LM prefill on precomputed image features, the forward split by parts)."""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from ..policy import Policy
from .loading import encode_images, resolve_device

# -- timing and memory ---------------------------------------------------------------------------
def make_timer(device: torch.device) -> tuple[Callable[[Callable[[], Any]], float], str]:
    """``(time(fn) -> seconds, name)``: CUDA events on GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        return cuda_time, "cuda_events"

    def cpu_time(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return cpu_time, "perf_counter"


def summary(seconds: Sequence[float]) -> dict:
    """Median and spread of a list of durations, in milliseconds."""
    ms = sorted(1e3 * s for s in seconds)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median": statistics.median(ms), "p25": q[0], "p75": q[2], "min": ms[0], "max": ms[-1],
            "mean": statistics.fmean(ms), "stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0, "n": len(ms),
            "samples": [1e3 * s for s in seconds]}


def interleaved(model, policy, calls: dict[str, Callable[[], Any]], *, iters: int, warmup: int, device,
                backend: str = "auto") -> dict:
    """Time each of ``calls`` (name -> zero-argument callable) unpatched and patched with ``policy``,
    interleaved: per iteration and call, one baseline and one patched run, order alternating.

    Returns ``{name: {"baseline": [s...], "patched": [s...]}, "trace": last prefill trace of the
    first call, "stage_seconds": [per patched run of the first call: sum of trace stage seconds]}``;
    a ``PartsCall`` also gives ``"baseline_parts"`` / ``"patched_parts"``: ``{part: [s...]}``.
    """
    from .. import patch

    timer, _ = make_timer(resolve_device(device))
    pol = Policy.parse(policy)
    out: dict = {name: {"baseline": [], "patched": []} for name in calls}
    first = next(iter(calls))
    stage_seconds: list[float] = []
    trace = None

    def timed(fn, patched):
        if isinstance(fn, LMPrefillCall):
            fn.prepare(pol if patched else None)  # outside the timer: image features from the (patched) tower
        if not isinstance(fn, PartsCall):
            return timer(fn), None
        fn.install()  # after patch(): its pre-hooks run first and its hooks last, around the patch's own
        try:
            return timer(fn), fn.parts()
        finally:
            fn.remove()

    def run(name, patched, record):
        nonlocal trace
        fn = calls[name]
        if not patched:
            dt, parts = timed(fn, False)
        else:
            handle = patch(model, pol, backend=backend)
            try:
                dt, parts = timed(fn, True)
                if name == first:
                    tr = handle.last_trace()
                    if record:
                        stage_seconds.append(sum(s.seconds for s in tr.stages))
                    trace = tr
            finally:
                handle.unpatch()
        if record:
            kind = "patched" if patched else "baseline"
            out[name][kind].append(dt)
            for part, seconds in (parts or {}).items():
                out[name].setdefault(f"{kind}_parts", {}).setdefault(part, []).append(seconds)

    gc.collect()  # once: a full collection costs ~0.1-0.3 s with transformers loaded; none inside the loop
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad():
            for _ in range(warmup):
                for name in calls:
                    run(name, False, False), run(name, True, False)
            for i in range(iters):
                for name in calls:
                    for patched in ((False, True) if i % 2 == 0 else (True, False)):
                        run(name, patched, True)
    finally:
        if was_enabled:
            gc.enable()
    out["trace"] = trace
    out["stage_seconds"] = stage_seconds
    return out


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated (reset before each call)"
    if _status_bytes("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK):
        return ("process peak RSS: Linux VmHWM reset via /proc/self/clear_refs before each call, glibc mmap "
                "threshold fixed at 64 KiB during the measurement (tracemalloc does not see PyTorch's allocator)")
    return "unavailable (needs CUDA, or Linux /proc/self/clear_refs)"


def peak_memory(fn: Callable[[], Any], device) -> tuple[int | None, int | None]:
    """``(peak above the memory in use before the call, absolute peak)`` in bytes, or ``(None, None)``."""
    device = resolve_device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak - before, peak
    if "unavailable" in memory_method(device):
        return None, None
    with _small_mmap_threshold():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        fn()
        peak = _status_bytes("VmHWM")
    return peak - before, peak


class _small_mmap_threshold:
    """glibc: serve allocations >= 64 KiB by mmap (returned to the OS on free) while measuring, so the RSS
    follows live tensors; afterwards the thresholds go to the large values glibc's own heuristic settles on."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __enter__(self):
        import ctypes

        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)
            self.libc.malloc_trim(0)
        except (OSError, AttributeError):
            self.libc = None
        return self

    def __exit__(self, *exc):
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 64 * 1024 * 1024)


class LMPrefillCall:
    """The language-model prefill: ``model(**lm_inputs, logits_to_keep=1)`` on precomputed image features.

    ``prepare()`` (outside the timer) encodes the pixels again when the model is patched with a
    vision-site stage (its features and kept slots come from the patched tower, as in ``generate()``);
    otherwise the features computed once by the unpatched tower are reused.
    """

    def __init__(self, model, inputs: dict, lm_inputs: dict):
        self.model, self.inputs, self.base, self.lm_inputs = model, inputs, lm_inputs, lm_inputs

    def prepare(self, policy: "Policy | None") -> None:
        """``policy``: the one the model is patched with now (None: unpatched)."""
        vision = policy is not None and any(s.is_vision for s in policy.stages)
        self.lm_inputs = encode_images(self.model, self.inputs) if vision else self.base

    def __call__(self):
        return self.model(**self.lm_inputs, logits_to_keep=1)


# -- vision tower vs language model -------------------------------------------------------------
def part_modules(model) -> dict[str, tuple[Any, Any]]:
    """``{part: (first module, last module)}``: ``vision`` = the vision tower up to the projector (LLaVA,
    LLaVA-NeXT: ``vision_tower`` .. ``multi_modal_projector``; Qwen2-VL: ``visual``, its merger included),
    ``llm`` = the language model (decoder layers and final norm; not the LM head)."""
    inner = getattr(model, "model", model)
    parts = {}
    tower = getattr(inner, "vision_tower", None)
    tower = tower if tower is not None else getattr(inner, "visual", None)
    if tower is not None:
        proj = getattr(inner, "multi_modal_projector", None)
        parts["vision"] = (tower, proj if proj is not None else tower)
    lm = getattr(inner, "language_model", None)
    if lm is not None:
        parts["llm"] = (lm, lm)
    return parts


class PartsCall:
    """A zero-argument call whose parts are timed by forward hooks: each part from its first module's
    forward pre-hook (prepended: before any other pre-hook, e.g. a pre-LLM reduction) to its last
    module's forward hook (registered last), summed over the invocations in one call (Qwen2-VL encodes
    images and videos separately); ``other`` = the whole call minus the parts. CUDA events on GPU (read
    after the call's synchronize), ``perf_counter`` on CPU. ``install()`` / ``remove()`` around each call
    (outside the timer), after ``patch()`` so the patch's own hooks lie inside the spans.
    """

    def __init__(self, model, fn: Callable[[], Any], device):
        self.model, self.fn = model, fn
        self.cuda = resolve_device(device).type == "cuda"
        self.modules = part_modules(model)
        self._hooks: list = []
        self._open: dict = {}
        self._spans: dict[str, list] = {}

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def install(self) -> None:
        self._open, self._spans = {}, {name: [] for name in self.modules}
        for name, (first, last) in self.modules.items():
            def start(module, args, name=name):
                self._open.setdefault(name, self._now())  # nested / repeated entries: the outermost start

            def stop(module, args, output, name=name):
                if name in self._open:
                    self._spans[name].append((self._open.pop(name), self._now()))

            self._hooks.append(first.register_forward_pre_hook(start, prepend=True))
            self._hooks.append(last.register_forward_hook(stop))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __call__(self):
        self._t0 = self._now()
        out = self.fn()
        self._t1 = self._now()
        return out

    def parts(self) -> dict[str, float]:
        """Seconds per part of the last call, and ``other``."""
        if self.cuda:
            torch.cuda.synchronize()
            span = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731
        else:
            span = lambda a, b: b - a  # noqa: E731
        out = {name: sum(span(a, b) for a, b in spans) for name, spans in self._spans.items()}
        out["other"] = max(0.0, span(self._t0, self._t1) - sum(out.values()))
        return out
