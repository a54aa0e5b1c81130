"""Refusal checks: a bad policy or a budget a row cannot hold is refused with an error naming the field."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp


def assert_policy_refused(text, field: str) -> vtp.PolicyError:
    """``Policy.parse(text)`` raises a PolicyError (a ValueError) whose ``field`` is ``field``."""
    with pytest.raises(vtp.PolicyError) as e:
        vtp.Policy.parse(text)
    assert isinstance(e.value, ValueError)
    assert e.value.field == field, str(e.value)
    return e.value


def assert_budgets_honoured(model, inputs: dict, policy: str, n_visual: list[int]):
    """One forward of ``model`` patched with the one-stage ``policy``: a budget above a row's ``n_visual``
    tokens is an InputError; otherwise every row keeps exactly the budget's count (no stage without visual
    tokens). Returns the trace, or None when refused or there was nothing to prune."""
    pol = vtp.Policy.parse(policy)
    expected = [pol.stages[0].budget.count(n) for n in n_visual]
    with vtp.patch(model, pol) as h, torch.no_grad():
        if any(e > n for e, n in zip(expected, n_visual)):
            with pytest.raises(vtp.InputError):
                model(**inputs)
            return None
        out = model(**inputs)
        tr = h.last_trace()
    assert torch.isfinite(out.logits).all()
    if max(n_visual) == 0:
        assert tr.stages == []
        return None
    assert tr.stages[0].visual_after == expected
    assert [len(k) for k in tr.stages[0].kept_positions] == expected
    return tr
