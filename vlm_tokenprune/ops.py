"""Backend dispatch of the hot ops: a Triton kernel (``kernels/``) or its PyTorch reference (``reference_ops``).

Backends (``patch(model, policy, backend=...)``):

- ``"torch"``: always the PyTorch reference.
- ``"triton"``: always the kernels. They run on CUDA tensors, and on CPU tensors only under
  the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported,
  as the tests do). Where that is impossible ``check_backend`` raises
  ``PolicyError("backend", ...)`` at ``patch()`` time: never a silent switch.
- ``"auto"``: the kernels for CUDA tensors when triton is importable, else the reference.

A handle carries an ``Ops`` (the backend bound to these functions) and hands it to every
``ScoringContext``, so criteria reach the ops without globals. Both backends select
identical indices; scores agree to fp32 rounding (``tests/test_kernels.py``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Sequence

import torch

from . import kernels
from . import reference_ops as ref
from .errors import PolicyError

BACKENDS = ("auto", "torch", "triton")
_KERNEL_MODULES = ("scores", "topk", "gather")


def _kernel(name: str):
    """The kernel module ``vlm_tokenprune.kernels.<name>`` (imports triton on first use)."""
    return importlib.import_module(f"{__package__}.kernels.{name}")


def kernels_interpreted() -> bool:
    """True if the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at their first import).

    Imports the kernel modules (and triton) if they are not imported yet.
    """
    kinds = {type(v).__name__ for n in _KERNEL_MODULES for v in vars(_kernel(n)).values()}
    return "InterpretedFunction" in kinds and "JITFunction" not in kinds


def _unusable(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` tensors here, or None if they can."""
    if not kernels.HAS_TRITON:
        return ("'triton' needs the triton package, which cannot be imported here "
                "(pip install 'vlm_tokenprune[triton]'); allowed without it: auto, torch")
    if device.type == "cuda" or kernels_interpreted():
        return None
    return (f"'triton' cannot run on {device.type} tensors: the kernels run on CUDA, or on CPU under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before vlm_tokenprune's kernels are first imported); "
            "allowed here: auto, torch")


def check_backend(backend: str, device: torch.device | str = "cpu", field: str = "backend") -> None:
    """Raise ``PolicyError(field, ...)`` unless ``backend`` can run on tensors of ``device``."""
    if backend not in BACKENDS:
        raise PolicyError(field, f"{backend!r} is not available; allowed: {', '.join(BACKENDS)}")
    if backend == "triton":
        why = _unusable(torch.device(device))
        if why is not None:
            raise PolicyError(field, why)


def use_triton(backend: str, t: torch.Tensor) -> bool:
    """Whether ``backend`` runs the kernel for an op on tensor ``t`` (raises for an impossible ``"triton"``)."""
    if backend == "torch":
        return False
    if backend == "triton":
        check_backend(backend, t.device)
        return True
    if backend == "auto":
        if not t.is_cuda:
            return False
        return kernels.HAS_TRITON
    raise PolicyError("backend", f"{backend!r} is not available; allowed: {', '.join(BACKENDS)}")


# -- the ops -----------------------------------------------------------------------------------------


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_idx: torch.Tensor,
    k_valid: torch.Tensor,
    *,
    scaling: float,
    k_idx: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    subset: torch.Tensor | None = None,
    subset_ok: torch.Tensor | None = None,
    softmax_over: str = "row",
    reduce: str = "mean",
    row_ok: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of query rows over a key subset, fp32; see ``reference_ops.attention_scores``.

    ``[B, S]`` for ``reduce="mean"|"max"``, ``[B, H, R, S]`` for ``"none"``. The kernel streams
    over the keys (memory O(B*H*R + B*S)); the reference materialises ``[B, H, r, Nk]`` logits for
    chunks of rows. ``row_keys`` (per-row key sets that are not causal: several query rows at a Gemma 3
    sliding layer, image-token rows in its bidirectional block) replaces the causal rule on both paths (the
    kernel reads the ``[B, R, Nk]`` bools as it streams the keys).
    """
    ref.check_scores_args(q, k, q_idx, k_valid, k_idx, cos, sin, subset, subset_ok, softmax_over, reduce, row_ok,
                          row_keys)
    kw = dict(scaling=scaling, k_idx=k_idx, cos=cos, sin=sin, subset=subset, subset_ok=subset_ok,
              softmax_over=softmax_over, reduce=reduce, row_ok=row_ok, row_keys=row_keys)
    if use_triton(backend, q):
        return _kernel("scores").attention_scores(q, k, q_idx, k_valid, **kw)
    return ref.attention_scores(q, k, q_idx, k_valid, **kw)


def topk(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-``k[b]`` of the valid scores ``[B, N]``: ``(idx [B, max k] ascending, ok)``; see ``reference_ops.topk``."""
    if scores.dim() != 2 or valid.shape != scores.shape or k.shape != scores.shape[:1]:
        raise ValueError(f"topk needs scores/valid [B, N] and k [B], got {tuple(scores.shape)}, "
                         f"{tuple(valid.shape)}, {tuple(k.shape)}")
    if use_triton(backend, scores):
        return _kernel("topk").topk(scores, valid, k)
    return ref.topk(scores, valid, k)


def gather_tokens(
    idx: torch.Tensor,
    tensors: Sequence[torch.Tensor | None],
    *,
    dims: Sequence[int] | None = None,
    ok: torch.Tensor | None = None,
    zero_invalid: Sequence[bool] | None = None,
    backend: str = "auto",
) -> list[torch.Tensor | None]:
    """Gather every tensor's tokens at the same ``idx`` ``[B, M]`` (one launch on the kernel path).

    ``tensors[i]`` has its token axis at ``dims[i]`` (default 1) and its batch axis (B or 1) just
    before it; None entries pass through. Where ``ok`` ``[B, M]`` is False, tensors with
    ``zero_invalid[i]`` get 0 (a padding mask's dropped slots). See ``reference_ops.gather_tokens``.
    """
    n = len(tensors)
    dims = [1] * n if dims is None else list(dims)
    zero_invalid = [False] * n if zero_invalid is None else list(zero_invalid)
    if len(dims) != n or len(zero_invalid) != n:
        raise ValueError(f"gather_tokens: {n} tensors but {len(dims)} dims and {len(zero_invalid)} zero_invalid")
    if idx.dim() != 2 or (ok is not None and ok.shape != idx.shape):
        raise ValueError(f"gather_tokens: idx must be [B, M] and ok like it, got {tuple(idx.shape)}")
    if use_triton(backend, idx):
        return _kernel("gather").gather_tokens(idx, tensors, dims=dims, ok=ok, zero_invalid=zero_invalid)
    return ref.gather_tokens(idx, tensors, dims=dims, ok=ok, fill=[0 if z else None for z in zero_invalid])


def scatter_tokens(
    src: torch.Tensor, idx: torch.Tensor, length: int, *, ok: torch.Tensor | None = None,
    base: torch.Tensor | None = None, backend: str = "auto",
) -> torch.Tensor:
    """Inverse gather ``[B, M, ...] -> [B, length, ...]``; see ``reference_ops.scatter_tokens``."""
    if use_triton(backend, src):
        return _kernel("gather").scatter_tokens(src, idx, length, ok=ok, base=base)
    return ref.scatter_tokens(src, idx, length, ok=ok, base=base)


def scatter_add_tokens(
    src: torch.Tensor, idx: torch.Tensor, length: int, *, weight: torch.Tensor | None = None,
    ok: torch.Tensor | None = None, base: torch.Tensor | None = None, backend: str = "auto",
) -> torch.Tensor:
    """Weighted scatter-add into fp32 ``[B, length, ...]`` (merging); see ``reference_ops.scatter_add_tokens``."""
    if use_triton(backend, src):
        return _kernel("gather").scatter_add_tokens(src, idx, length, weight=weight, ok=ok, base=base)
    return ref.scatter_add_tokens(src, idx, length, weight=weight, ok=ok, base=base)


@dataclass(frozen=True)
class Ops:
    """The ops bound to one backend; a handle owns one and passes it to every ``ScoringContext``."""

    backend: str = "auto"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise PolicyError("backend", f"{self.backend!r} is not available; allowed: {', '.join(BACKENDS)}")

    def attention_scores(self, q, k, q_idx, k_valid, **kw) -> torch.Tensor:
        return attention_scores(q, k, q_idx, k_valid, backend=self.backend, **kw)

    def topk(self, scores, valid, k) -> tuple[torch.Tensor, torch.Tensor]:
        return topk(scores, valid, k, backend=self.backend)

    def gather_tokens(self, idx, tensors, **kw) -> list[torch.Tensor | None]:
        return gather_tokens(idx, tensors, backend=self.backend, **kw)

    def scatter_tokens(self, src, idx, length, **kw) -> torch.Tensor:
        return scatter_tokens(src, idx, length, backend=self.backend, **kw)

    def scatter_add_tokens(self, src, idx, length, **kw) -> torch.Tensor:
        return scatter_add_tokens(src, idx, length, backend=self.backend, **kw)
