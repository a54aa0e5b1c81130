"""Errors raised by vlm_tokenprune.

Every error is a ``ValueError`` subclass that names the offending field and what is
allowed, and is raised before any model state changes.
"""
from __future__ import annotations

from typing import Iterable


class VTPError(ValueError):
    """Base class: a bad policy, an unsupported model or a bad input, named by ``field``."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class PolicyError(VTPError):
    """The policy itself is malformed (unknown method or key, budget out of range...)."""


class UnknownNameError(PolicyError):
    """A name that is not registered; the message lists the registered ones."""

    def __init__(self, field: str, name: str, valid: Iterable[str]):
        self.name = name
        self.valid = sorted(valid)
        super().__init__(field, f"unknown name {name!r}; allowed: {', '.join(self.valid) or '(none registered)'}")


class IncompatiblePolicyError(PolicyError):
    """The policy is well formed but does not fit this model (layer out of range...)."""


class UnsupportedModelError(VTPError):
    """The model (type, cache, attention backend...) is not supported."""


class InputError(VTPError):
    """A forward call's inputs cannot be served by the patched model (labels, too few tokens...)."""
