"""The tag on every hook function this library registers (``is_patched`` looks for it)."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn


def mark_hook(fn: Callable) -> Callable:
    """Tag a hook function as vlm_tokenprune's."""
    fn.__vtp__ = True
    return fn


def is_marked(fn: Any) -> bool:
    return bool(getattr(fn, "__vtp__", False))


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` carries a forward pre-hook of this library (a live ``patch()``)."""
    return any(is_marked(h) for h in getattr(model, "_forward_pre_hooks", {}).values())
