"""Batch == rows alone: a patched padded batch must give each row what the oracle gives that row alone."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .batches import row_alone
from .runs import generate_rows, patched_prefill


def assert_batch_matches_rows_alone(model, inputs: dict, rows: list, policy, row_oracle: Callable, *,
                                    padding: str = "left", atol: float = 1e-5):
    """One patched prefill of the padded batch ``inputs`` (built from ``rows``) against the oracle per row.

    ``row_oracle(alone)`` -> ``(kept, logits)``: per stage the kept image positions of the row alone, and
    its ``[n_kept_tokens, V]`` logits; or ``None`` for a row the policy leaves untouched (the plain model,
    nothing kept). Kept positions must match (shifted by the row's left padding), logits within ``atol``,
    and the batch is as long as its longest kept row. Returns the trace for method-specific checks."""
    logits, trace = patched_prefill(model, inputs, policy)
    L = inputs["input_ids"].shape[1]
    lengths = []
    for b in range(len(rows)):
        alone = row_alone(inputs, rows, b)
        pad = L - alone["input_ids"].shape[1] if padding == "left" else 0
        got = row_oracle(alone)
        if got is None:
            with torch.no_grad():
                kept, want = [[] for _ in trace.stages], model(**alone).logits[0]
        else:
            kept, want = got
        assert [st.kept_positions[b] for st in trace.stages] == [[p + pad for p in s] for s in kept], f"row {b}"
        lengths.append(want.shape[0])
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=atol, rtol=0, msg=f"row {b}")
    assert logits.shape[1] == max(lengths)
    return trace


def assert_batch_equals_patched_rows_alone(model, inputs: dict, rows: list, policy, *, atol: float = 1e-5):
    """The patched padded batch gives each row what the same patched model gives that row alone: the same kept
    positions (shifted by the row's left padding) and logits within ``atol``."""
    def patched_alone(alone):
        logits, trace = patched_prefill(model, alone, policy)
        return [st.kept_positions[0] for st in trace.stages], logits[0]

    return assert_batch_matches_rows_alone(model, inputs, rows, policy, patched_alone, atol=atol)


def assert_generate_matches_rows_alone(model, inputs: dict, rows: list, policy, row_generate: Callable, *,
                                       use_cache: bool = True, steps: int = 8, **generate_kw) -> None:
    """Greedy generation of the patched padded batch: row b's tokens == ``row_generate(row b alone)``."""
    got = generate_rows(model, inputs, policy, steps, use_cache, **generate_kw)
    for b in range(len(rows)):
        assert got[b] == row_generate(row_alone(inputs, rows, b)), f"row {b}"
