"""Fixtures only (shared code lives in ``tests/kit``): one torch thread, the flash-attention stand-in
registered, a fixed seed per test, and the shared tiny models checked unchanged after every test module."""
from __future__ import annotations

import pytest
import torch

from kit.backends import register_flash_standin
from kit.models import changed_shared_models

torch.set_num_threads(1)

register_flash_standin()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _shared_models_unchanged():
    """The kit's shared tiny models are never mutated: a test module that leaves one changed fails here."""
    yield
    changed = changed_shared_models()
    assert not changed, "a test changed a shared tiny model (take kit.fresh_llava / fresh_qwen):\n" + "\n".join(changed)
