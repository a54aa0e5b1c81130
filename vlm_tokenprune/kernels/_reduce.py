"""Reductions the kernels use: ``tl.reduce`` / ``tl.associative_scan`` with triton's own combine functions.

Same results and code on the GPU as ``tl.sum`` / ``tl.max`` / ``tl.cumsum``. Why not those:
they are ``@triton.jit`` functions built when ``triton`` is imported, and torch imports triton
early (``torch._dynamo``), usually before anyone can set ``TRITON_INTERPRET=1``; called from an
interpreted kernel they then refuse to run. The builtins ``tl.reduce`` / ``tl.associative_scan``
are patched by the interpreter itself, which recognises these combine functions and runs
them as single numpy calls. For the same reason the kernels write ``tl.full(shape, 0, dtype)``,
never ``tl.zeros`` / ``tl.zeros_like`` (also ``@triton.jit`` functions of triton's standard library).
"""
from __future__ import annotations

import triton
import triton.language as tl

_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


@triton.jit
def tsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _ADD)


@triton.jit
def tmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX)


@triton.jit
def tcumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, _ADD)
