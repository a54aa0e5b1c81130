"""Hypothesis fuzz over policies (random stage lists), models (LLaVA, LLaVA-NeXT, Qwen2-VL), batch sizes,
padding, image counts and sizes: no crash, budgets honoured, keep-all exact.

CI runs a bounded number of examples; the nightly-style run sets ``VTP_FUZZ_EXAMPLES=1000``:
``VTP_FUZZ_EXAMPLES=1000 OMP_NUM_THREADS=1 python -m pytest tests/test_fuzz.py``.
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, build_tiny_qwen2_vl, make_batch, make_qwen_batch

from conftest import BACKENDS

EXAMPLES = int(os.environ.get("VTP_FUZZ_EXAMPLES", "30"))
EXACT_BUDGET = ("fastv", "random", "uniform", "flowcut_llm", "efficientvla", "aim")
FAMILIES = ("llava", "llava_next", "qwen2_vl")
_MODELS: dict = {}


def _model(family, impl):
    if (family, impl) not in _MODELS:
        if family == "llava":
            _MODELS[family, impl] = build_tiny_llava(impl)
        elif family == "llava_next":
            _MODELS[family, impl] = build_tiny_llava(impl, next=True, image_size=16)
        else:
            _MODELS[family, impl] = build_tiny_qwen2_vl(impl)
    return _MODELS[family, impl]


def _inputs(family, model, rows, padding, sizes, seed):
    if family == "llava":
        return make_batch(model, rows, seed=seed, padding=padding)
    n_img = sum(seg == "img" for r in rows for seg in r)
    if family == "llava_next":
        return make_batch(model, rows, seed=seed, padding=padding, image_sizes=[sizes[i % len(sizes)] for i in range(n_img)])
    grids = [(1 + sizes[i % len(sizes)][0] // 16, 1 + sizes[i % len(sizes)][1] // 16) for i in range(n_img)]
    return make_qwen_batch(model, rows, seed=seed, padding=padding, image_grids=grids)


stage = hs.tuples(
    hs.sampled_from(EXACT_BUDGET + ("feather",)),
    hs.one_of(hs.floats(0.05, 1.0).map(lambda r: ("keep", round(r, 3))), hs.integers(1, 12).map(lambda t: ("tokens", t))),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    family=hs.sampled_from(FAMILIES),
    impl=hs.sampled_from(BACKENDS),
    rows=hs.lists(hs.lists(hs.one_of(hs.integers(1, 5), hs.just("img")), min_size=1, max_size=4), min_size=1, max_size=3),
    stages=hs.lists(stage, min_size=1, max_size=3),
    padding=hs.sampled_from(["left", "right"]),
    sizes=hs.lists(hs.tuples(hs.integers(16, 48), hs.integers(16, 48)).map(list), min_size=1, max_size=2),
    seed=hs.integers(0, 3),
)
def test_random_policies_never_crash_and_honour_budgets(family, impl, rows, stages, padding, sizes, seed):
    model = _model(family, impl)
    inputs = _inputs(family, model, rows, padding, sizes, seed)
    layers = range(1, 1 + len(stages))  # 4-layer models: stages at layers 1, 2, 3
    parts = []
    for layer, (method, (kind, value)) in zip(layers, stages):
        extra = ",rope=false" if method == "feather" else ""
        parts.append(f"{method}:layer={layer},{kind}={value}{extra}")
    try:
        policy = vtp.Policy.parse("+".join(parts))
    except vtp.PolicyError:
        event("refused policy")
        return  # e.g. growing budgets across stages: refused before any model is touched (tested elsewhere)
    with torch.no_grad(), vtp.patch(model, policy) as h:
        try:
            out = model(**inputs)
        except InputError as e:  # a budget above a row's visual tokens, or EfficientVLA without text after the image
            assert e.field.startswith("stages[") or e.field in ("efficientvla",), e
            event("refused input")
            return
        tr = h.last_trace()
    assert torch.isfinite(out.logits).all()
    event(f"ran {family}")
    for i, st in enumerate(tr.stages):
        exact = policy.stages[i].criterion in EXACT_BUDGET
        for b, (before, after) in enumerate(zip(st.visual_before, st.visual_after)):
            want = policy.stages[i].budget.count(tr.stages[0].visual_before[b], before)
            assert after == want if exact else after >= min(want, before)
            assert len(st.kept_positions[b]) == after


@settings(max_examples=max(5, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    family=hs.sampled_from(FAMILIES),
    impl=hs.sampled_from(BACKENDS),
    rows=hs.lists(hs.lists(hs.one_of(hs.integers(1, 5), hs.just("img")), min_size=1, max_size=3), min_size=1, max_size=3),
    methods=hs.lists(hs.sampled_from(("fastv", "random", "uniform", "flowcut_llm", "feather")), min_size=1, max_size=3),
)
def test_keep_all_policies_are_exact(family, impl, rows, methods):
    model = _model(family, impl)
    inputs = _inputs(family, model, rows, "left", [[20, 36]], 0)
    policy = "+".join(f"{m}:layer={i + 1},keep=1" + (",stride=0" if m == "feather" else "") for i, m in enumerate(methods))
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, policy):
            out = model(**inputs).logits
    assert torch.equal(out, ref)
