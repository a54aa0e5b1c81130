"""Refusal checks: a bad policy or a budget a row cannot hold is refused with an error naming the field."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp

from .families import no_hook_left


def assert_policy_refused(text, field: str) -> vtp.PolicyError:
    """``Policy.parse(text)`` raises a PolicyError (a ValueError) whose ``field`` is ``field``."""
    with pytest.raises(vtp.PolicyError) as e:
        vtp.Policy.parse(text)
    assert isinstance(e.value, ValueError)
    assert e.value.field == field, str(e.value)
    return e.value


def assert_patch_refused(model, policy, field: str, *words: str) -> vtp.IncompatiblePolicyError:
    """``patch(model, policy)`` raises an IncompatiblePolicyError naming ``field`` whose message holds every one of
    ``words``, and leaves no hook on the model."""
    with no_hook_left(model), pytest.raises(vtp.IncompatiblePolicyError) as e:
        vtp.patch(model, policy)
    assert e.value.field == field and all(w in str(e.value) for w in words), str(e.value)
    return e.value


def assert_budgets_honoured(model, inputs: dict, policy: str, n_visual: list[int]):
    """One forward of ``model`` patched with the one-stage ``policy``: every row keeps exactly the budget's
    count, except a row whose budget is above its ``n_visual`` tokens, which keeps them all and is listed in
    the trace's ``kept_all`` (with ``patch(strict=True)`` that row is an InputError); no stage without visual
    tokens. Returns the trace, or None when there was nothing to prune."""
    pol = vtp.Policy.parse(policy)
    expected = [pol.stages[0].budget.count(n) for n in n_visual]
    over = [b for b, (e, n) in enumerate(zip(expected, n_visual)) if e > n]
    if over:
        with vtp.patch(model, pol, strict=True), torch.no_grad(), pytest.raises(vtp.InputError):
            model(**inputs)
    with vtp.patch(model, pol) as h, torch.no_grad():
        out = model(**inputs)
        tr = h.last_trace()
    assert torch.isfinite(out.logits).all()
    if max(n_visual) == 0:
        assert tr.stages == []
        return None
    expected = [n if b in over else e for b, (e, n) in enumerate(zip(expected, n_visual))]
    assert tr.stages[0].visual_after == expected and sorted(tr.stages[0].kept_all) == over
    assert [len(k) for k in tr.stages[0].kept_positions] == expected
    return tr
