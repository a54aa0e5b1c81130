"""Triton kernels of the hot ops (``scores.py``, ``topk.py``, ``gather.py``), one launcher each.

Their PyTorch references live in ``vlm_tokenprune/reference_ops.py`` and ``ops.py`` picks
between the two. Importing this package does not import triton: ``HAS_TRITON`` is computed
on first access (``from vlm_tokenprune.kernels import HAS_TRITON``), and the kernel modules
import triton themselves, so ``import vlm_tokenprune`` works without it.
"""
from __future__ import annotations

import importlib

__all__ = ["HAS_TRITON"]


def __getattr__(name: str):
    if name == "HAS_TRITON":
        try:
            importlib.import_module("triton")
            importlib.import_module("triton.language")
        except Exception:  # not installed, or installed but unusable here (no driver, bad wheel)
            value = False
        else:
            value = True
        globals()[name] = value  # computed once per process
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
