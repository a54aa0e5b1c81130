"""``torch.compile`` of a model AFTER ``patch()`` (the other order is refused: test_reliability).

Dynamo traces our Python hooks; they graph-break where token counts become data (``int()`` /
``.item()`` on the visual-token mask, the thread id, timers), so the compiled model runs the same
ops as the eager patched model, split into several graphs. Checked here with the cheap
``backend="eager"`` on a 2-layer model (Dynamo's tracing is what matters; inductor was checked by
hand, see README "torch.compile").
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()  # no compiled code (or its guards) outlives the test


def test_compile_after_patch_matches_eager(dynamo):
    model = build_tiny_llava("sdpa", layers=2, vision_layers=1)
    inputs = make_batch(model, [[5, "img", 7], [3, "img", 2, "img", 4]])
    with torch.no_grad():
        plain = model(**inputs).logits
        handle = vtp.patch(model, "fastv:layer=1,keep=0.25")
        want = model(**inputs).logits
        want_kept = handle.last_trace().stages[0].kept_positions
        handle.reset_trace()
        compiled = torch.compile(model, backend="eager")
        got = compiled(**inputs).logits
        trace = handle.last_trace()
        handle.unpatch()
        after = compiled(**inputs).logits  # Dynamo's guards see the hooks are gone: the unpatched model runs
    assert got.shape == want.shape and torch.equal(got, want)
    assert trace is not None and trace.stages[0].kept_positions == want_kept and trace.stages[0].visual_after == [9, 18]
    assert torch.equal(after, plain)
