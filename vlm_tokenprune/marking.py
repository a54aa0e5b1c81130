"""The tag on every hook function this library registers (``is_patched`` looks for it)."""
from __future__ import annotations

from typing import Any, Callable


def mark_hook(fn: Callable) -> Callable:
    """Tag a hook function as vlm_tokenprune's."""
    fn.__vtp__ = True
    return fn


def is_marked(fn: Any) -> bool:
    return bool(getattr(fn, "__vtp__", False))
