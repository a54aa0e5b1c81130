"""Structural operations (skip layers, prune heads, visual FFN cut, neighbour attention, visual
drop): policy data in ``spec``, per-model resolution in ``plan``, installation in ``hooks``."""
from .spec import STRUCTURAL_OPS, TOKEN_OPS  # noqa: F401
