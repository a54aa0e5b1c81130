"""Small training utilities shared by the learned selectors' trainers: seeding, progress, checkpoints.

A checkpoint is one ``torch.save`` file written atomically (temporary file, then ``os.replace``),
so an interrupted run never leaves a half-written checkpoint behind; :func:`load_checkpoint`
returns ``None`` when there is none to resume from.
"""
from __future__ import annotations

import os
import random
from typing import Any, Iterable

import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover  (numpy is an install requirement)
        pass


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def progress(iterable: Iterable, *, total: int, initial: int = 0, desc: str = "", enabled: bool = True) -> Iterable:
    """A ``tqdm`` bar over ``iterable`` (steps ``initial..total``; ``set_postfix`` shows running figures),
    or ``iterable`` itself when disabled."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True)


def save_checkpoint(path: str, state: dict[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str) -> dict[str, Any] | None:
    """The state saved at ``path``, or ``None`` if there is no checkpoint."""
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
