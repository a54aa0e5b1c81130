"""Kept for test files written against it: the shared test kit now lives in ``tests/kit`` (import from ``kit``)."""
from kit import cache_kwargs, n_image_tokens, new_tokens, patched_prefill  # noqa: F401
