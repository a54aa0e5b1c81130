"""Hypothesis fuzz over policies (random stage lists: an optional pre-LLM stage, LLM token stages,
structural ops and an optional ``visual_drop``), models (LLaVA, LLaVA-NeXT, Qwen2-VL), batch sizes,
padding, image counts and sizes: no crash, budgets honoured, keep-all exact. A policy that does not
fit the model (e.g. ``neighbor_attention`` under the flash stand-in) must be refused in ``patch()``
with a field-named ``VTPError``, leaving no hook behind.

CI runs a bounded number of examples; the nightly-style run sets ``VTP_FUZZ_EXAMPLES=1000``:
``VTP_FUZZ_EXAMPLES=1000 OMP_NUM_THREADS=1 python -m pytest tests/test_fuzz.py``.
"""
from __future__ import annotations

import os

import torch
from kit import BACKENDS, tiny_llava, tiny_qwen
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as hs

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError
from vlm_tokenprune.eval.tiny_models import (
    make_batch,
    make_qwen_batch,
)

EXAMPLES = int(os.environ.get("VTP_FUZZ_EXAMPLES", "30"))
EXACT_BUDGET = ("fastv", "random", "uniform", "flowcut_llm", "efficientvla", "aim")
PRE_LLM = ("aim_merge", "uniform", "random")  # criteria that run at site=pre_llm
STRUCTURAL = ("skip_layers", "prune_heads", "ffn_cut", "neighbor_attention")
FAMILIES = ("llava", "llava_next", "qwen2_vl")
_MODELS: dict = {}


def _model(family, impl):
    if (family, impl) not in _MODELS:
        if family == "llava":
            _MODELS[family, impl] = tiny_llava(impl)
        elif family == "llava_next":
            _MODELS[family, impl] = tiny_llava(impl, next=True, image_size=16)
        else:
            _MODELS[family, impl] = tiny_qwen(impl)
    return _MODELS[family, impl]


def _inputs(family, model, rows, padding, sizes, seed):
    if family == "llava":
        return make_batch(model, rows, seed=seed, padding=padding)
    n_img = sum(seg == "img" for r in rows for seg in r)
    if family == "llava_next":
        return make_batch(model, rows, seed=seed, padding=padding, image_sizes=[sizes[i % len(sizes)] for i in range(n_img)])
    grids = [(1 + sizes[i % len(sizes)][0] // 16, 1 + sizes[i % len(sizes)][1] // 16) for i in range(n_img)]
    return make_qwen_batch(model, rows, seed=seed, padding=padding, image_grids=grids)


budget = hs.one_of(hs.floats(0.05, 1.0).map(lambda r: ("keep", round(r, 3))), hs.integers(1, 12).map(lambda t: ("tokens", t)))
stage = hs.tuples(hs.sampled_from(EXACT_BUDGET + ("feather",)), budget)
# a pre-LLM stage (before every LLM stage): (criterion, budget, positions)
pre_llm = hs.none() | hs.tuples(hs.sampled_from(PRE_LLM), budget, hs.sampled_from(["gaps", "repack"]))
layer_list = hs.lists(hs.integers(1, 3), min_size=1, max_size=2, unique=True).map(lambda v: ";".join(map(str, sorted(v))))


@hs.composite
def structural_ops(draw) -> list[str]:
    """0-2 structural stages over the 4-layer models (layer 0 included where the op allows it)."""
    out = []
    for op in draw(hs.lists(hs.sampled_from(STRUCTURAL), unique=True, max_size=2)):
        if op == "skip_layers":
            out.append(f"skip_layers:layers={draw(layer_list)},scope={draw(hs.sampled_from(['all', 'visual']))}")
        elif op == "prune_heads":
            pairs = draw(hs.lists(hs.tuples(hs.integers(0, 3), hs.integers(0, 3)), min_size=1, max_size=3, unique=True))
            heads = ";".join(f"{a}/{b}" for a, b in pairs)
            out.append(f"prune_heads:heads={heads},scope={draw(hs.sampled_from(['visual', 'all']))}")
        elif op == "ffn_cut":
            layers = draw(hs.just("all") | layer_list)
            out.append(f"ffn_cut:ratio={draw(hs.sampled_from([1, 2, 4]))},layers={layers}")
        else:
            layers = draw(hs.just("all") | layer_list)
            out.append(f"neighbor_attention:window={draw(hs.sampled_from([1, 3, 5]))},layers={layers}")
    return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    family=hs.sampled_from(FAMILIES),
    impl=hs.sampled_from(BACKENDS),
    rows=hs.lists(hs.lists(hs.one_of(hs.integers(1, 5), hs.just("img")), min_size=1, max_size=4), min_size=1, max_size=3),
    stages=hs.lists(stage, min_size=0, max_size=3),
    pre=pre_llm,
    structural=structural_ops(),
    drop=hs.booleans(),
    padding=hs.sampled_from(["left", "right"]),
    sizes=hs.lists(hs.tuples(hs.integers(16, 48), hs.integers(16, 48)).map(list), min_size=1, max_size=2),
    seed=hs.integers(0, 3),
)
def test_random_policies_never_crash_and_honour_budgets(family, impl, rows, stages, pre, structural, drop, padding,
                                                        sizes, seed):
    model = _model(family, impl)
    inputs = _inputs(family, model, rows, padding, sizes, seed)
    layers = range(1, 1 + len(stages))  # 4-layer models: stages at layers 1, 2, 3
    parts = []
    if pre is not None:
        method, (kind, value), positions = pre
        parts.append(f"{method}:site=pre_llm,{kind}={value},positions={positions}")
    for layer, (method, (kind, value)) in zip(layers, stages):
        extra = ",rope=false" if method == "feather" else ""
        parts.append(f"{method}:layer={layer},{kind}={value}{extra}")
    if drop and len(stages) < 3:
        parts.append(f"visual_drop:layer={len(stages) + 1}")
    parts += structural
    assume(parts)  # at least one stage
    try:
        policy = vtp.Policy.parse("+".join(parts))
    except vtp.PolicyError:
        event("refused policy")
        return  # e.g. growing budgets across stages: refused before any model is touched (tested elsewhere)
    try:
        handle = vtp.patch(model, policy)
    except vtp.VTPError as e:  # does not fit this model / backend: refused before any hook exists
        assert e.field.startswith(("stages[", "attn_implementation")), e
        assert not vtp.patching.is_patched(model) and not any(m._forward_pre_hooks for m in model.modules())
        event(f"refused at patch(): {e.field}")
        return
    with torch.no_grad(), handle as h:
        try:
            out = model(**inputs)
        except InputError as e:  # a budget above a row's visual tokens, or EfficientVLA without text after the image
            assert e.field.startswith("stages[") or e.field in ("efficientvla",), e
            event("refused input")
            return
        tr = h.last_trace()
    assert torch.isfinite(out.logits).all()
    event(f"ran {family}" + (" +structural" if structural else "") + (" +pre_llm" if pre else ""))
    token_stages = [s for s in policy.stages if s.site == "pre_llm" or s.changes_tokens]  # what the trace records
    for st_trace, st in zip(tr.stages, token_stages, strict=bool(tr.stages)):
        exact = st.criterion in EXACT_BUDGET  # feather adds its grid; aim_merge keeps >= 1 token per patch grid
        for b, (before, after) in enumerate(zip(st_trace.visual_before, st_trace.visual_after)):
            if st.op == "visual_drop":
                assert after == 0
                continue
            want = st.budget.count(tr.stages[0].visual_before[b], before)
            if b in st_trace.kept_all:  # a budget above what the row has, or EfficientVLA without text after the
                assert after == before  # image: the row keeps them all (patch(strict=True) refuses)
                continue
            assert after == want if exact else after >= min(want, before)
            assert len(st_trace.kept_positions[b]) == after


@settings(max_examples=max(5, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    family=hs.sampled_from(FAMILIES),
    impl=hs.sampled_from(BACKENDS),
    rows=hs.lists(hs.lists(hs.one_of(hs.integers(1, 5), hs.just("img")), min_size=1, max_size=3), min_size=1, max_size=3),
    methods=hs.lists(hs.sampled_from(("fastv", "random", "uniform", "flowcut_llm", "feather")), min_size=1, max_size=3),
    pre=hs.sampled_from((None,) + PRE_LLM),
)
def test_keep_all_policies_are_exact(family, impl, rows, methods, pre):
    model = _model(family, impl)
    inputs = _inputs(family, model, rows, "left", [[20, 36]], 0)
    parts = [f"{pre}:site=pre_llm,keep=1,positions=gaps"] if pre else []
    parts += [f"{m}:layer={i + 1},keep=1" + (",stride=0" if m == "feather" else "") for i, m in enumerate(methods)]
    policy = "+".join(parts)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, policy):
            out = model(**inputs).logits
    assert torch.equal(out, ref)
