"""Hypothesis fuzz over policies (random stage lists: an optional pre-LLM stage, LLM token stages,
structural ops and an optional ``visual_drop``), models (LLaVA, LLaVA-NeXT, Qwen2-VL), batch sizes,
padding, image counts and sizes: no crash, budgets honoured, keep-all exact. A policy that does not
fit the model (e.g. ``neighbor_attention`` under the flash stand-in) must be refused in ``patch()``
with a field-named ``VTPError``, leaving no hook behind.

CI runs a bounded number of examples; the nightly-style run sets ``VTP_FUZZ_EXAMPLES=1000``:
``VTP_FUZZ_EXAMPLES=1000 OMP_NUM_THREADS=1 python -m pytest tests/test_fuzz.py``.

Serving properties over the same random policies: several threads calling ONE patched model give what
the same calls give one by one (prefill and cached decode interleaved), and a ``KeyboardInterrupt``
raised from a hook inside a decoder layer at a random point leaves the model working (the next call is
correct) and ``unpatch()`` restores it exactly.
"""
from __future__ import annotations

import os
import random
import threading

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


def _parts(stages, pre, structural, drop) -> list[str]:
    """The policy's stage strings: the pre-LLM stage, token stages at layers 1, 2, 3 (4-layer models), an
    optional ``visual_drop`` after them, then the structural ops."""
    parts = []
    if pre is not None:
        method, (kind, value), positions = pre
        parts.append(f"{method}:site=pre_llm,{kind}={value},positions={positions}")
    for layer, (method, (kind, value)) in zip(range(1, 1 + len(stages)), stages):
        extra = ",rope=false" if method == "feather" else ""
        parts.append(f"{method}:layer={layer},{kind}={value}{extra}")
    if drop and len(stages) < 3:
        parts.append(f"visual_drop:layer={len(stages) + 1}")
    return parts + structural


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
    parts = _parts(stages, pre, structural, drop)
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


# Serving properties (issue reliability-2, items 1 and 2) over random policies.
CALL_PROMPTS = [[[5, "img", 7]], [[2, "img", 3, "img", 4]], [[5, "img", 7], [3, "img", 2, "img", 9]], [[4, "img", 2], [6]]]
policy_parts = dict(stages=hs.lists(stage, min_size=1, max_size=3), pre=pre_llm, structural=structural_ops(), drop=hs.booleans())


def _decode_steps(family) -> int:
    """Cached greedy decode steps after the prefill (every family: Qwen2-VL's steps carry their own position ids,
    ``_qwen_decode_positions``)."""
    return 2


def _qwen_decode_positions(model, inputs: dict, mask: torch.Tensor, q: int) -> torch.Tensor:
    """M-RoPE position ids ``[3, B, q]`` of the last ``q`` tokens of a Qwen2-VL request: what ``generate()`` gives
    them (2-D mask positions plus this prompt's ``rope_deltas``, from the pure ``get_rope_index``). A cached forward
    without ``position_ids`` reads ``model.model.rope_deltas``, which the LAST prefill of ANY request wrote
    (transformers' state, shared by concurrent and interleaved requests, patched or not: tests/test_concurrency.py
    ::test_qwen2_vl_interleaved_decode_matches_the_unpatched_model), so a serving loop passes its own."""
    if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
        delta = torch.zeros(mask.shape[0], 1, dtype=torch.long)
    else:
        _, delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs.get("image_grid_thw"),
                                              video_grid_thw=inputs.get("video_grid_thw"),
                                              attention_mask=inputs["attention_mask"])
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:] + delta
    return pos[None].expand(3, -1, -1)


def _patched(model, parts):
    """``patch(model, policy)``, or None (recorded as an event) where the policy or the model refuses it."""
    assume(parts)
    try:
        return vtp.patch(model, "+".join(parts))
    except vtp.VTPError as e:
        event(f"refused at parse / patch(): {type(e).__name__}")
        return None


def _call(model, handle, inputs: dict, steps: int):
    """One request: a prefill (cached when decoding follows) and ``steps`` greedy cached decode steps.
    Returns the last-position logits of every forward and this thread's prefill kept positions."""
    with torch.no_grad():
        out = model(**inputs, use_cache=steps > 0)
        kept = [s.kept_positions for s in handle.last_trace().stages]
        logits, mask = [out.logits[:, -1]], inputs["attention_mask"]
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            cache = {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}  # 5.2x / 5.1x
            if "mm_token_type_ids" in inputs:  # Qwen2-VL: this request's own M-RoPE positions
                cache["position_ids"] = _qwen_decode_positions(model, inputs, mask, 1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **cache)
            logits.append(out.logits[:, -1])
    return logits, kept


def _same(a, b) -> bool:
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@settings(max_examples=max(5, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
@given(family=hs.sampled_from(FAMILIES), impl=hs.sampled_from(BACKENDS), n_threads=hs.integers(2, 4),
       seed=hs.integers(0, 2**16), **policy_parts)
def test_concurrent_calls_equal_sequential(family, impl, n_threads, seed, stages, pre, structural, drop):
    model = _model(family, impl)
    batches = [_inputs(family, model, rows, "left", [[20, 36]], s) for s, rows in enumerate(CALL_PROMPTS)]
    jobs = [(b, n) for b in range(len(batches)) for n in sorted({0, _decode_steps(family)})]
    handle = _patched(model, _parts(stages, pre, structural, drop))
    if handle is None:
        return
    with handle as h:
        try:
            want = {job: _call(model, h, batches[job[0]], job[1]) for job in jobs}  # one by one
        except InputError as e:
            event(f"refused input: {e.field}")
            return
        failures: list = []

        def worker(k: int) -> None:
            rnd = random.Random(seed * 8 + k)
            try:
                for _ in range(4):
                    job = rnd.choice(jobs)
                    if not _same(_call(model, h, batches[job[0]], job[1]), want[job]):
                        failures.append((k, job))
            except BaseException as e:  # noqa: BLE001  (reported below with the thread's number)
                failures.append((k, repr(e)))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert h.state is None and not h.busy
    event(f"ran {family} with {n_threads} threads")


class _Interrupt:
    """A user's forward pre-hook on one decoder layer that raises ``KeyboardInterrupt`` on its ``at``-th call."""

    def __init__(self, layer, at: int):
        self.calls, self.at = 0, at
        self.removable = layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


@settings(max_examples=max(5, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
@given(family=hs.sampled_from(FAMILIES), impl=hs.sampled_from(BACKENDS), layer=hs.integers(0, 3), at=hs.integers(1, 3),
       in_worker=hs.booleans(),
       rows=hs.lists(hs.lists(hs.one_of(hs.integers(1, 5), hs.just("img")), min_size=1, max_size=3), min_size=1, max_size=2),
       **policy_parts)
def test_interrupted_calls_leave_the_model_working(family, impl, layer, at, in_worker, rows, stages, pre, structural, drop):
    model = _model(family, impl)
    inputs = _inputs(family, model, rows, "left", [[20, 36]], 0)
    steps = _decode_steps(family)  # the interrupt lands in the prefill or in a decode step (at - 1)
    before, hooks = {k: v.clone() for k, v in model.state_dict().items()}, _hooks(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    handle = _patched(model, _parts(stages, pre, structural, drop))
    if handle is None:
        return
    trap = None
    try:
        try:
            want = _call(model, handle, inputs, steps)
        except InputError as e:
            event(f"refused input: {e.field}")
            return
        trap = _Interrupt(model.model.language_model.layers[layer], at)
        raised: list = []

        def run() -> None:
            try:
                _call(model, handle, inputs, steps)
            except BaseException as e:  # noqa: BLE001
                raised.append(type(e))

        if in_worker:
            t = threading.Thread(target=run)
            t.start()
            t.join()
        else:
            run()
        trap.removable.remove()
        reached = trap.calls >= trap.at  # a skipped layer (skip_layers) or a prefill-only call may not reach it
        assert raised == ([KeyboardInterrupt] if reached else [])
        event("interrupted " + ("in a worker" if in_worker else "in the main thread") if reached else "not reached")
        assert handle.state is None and not handle.busy
        assert _same(_call(model, handle, inputs, steps), want)  # the next call is correct
    finally:
        if trap is not None:
            trap.removable.remove()
        handle.unpatch()  # never refused after an interrupt
    assert not vtp.patching.is_patched(model) and _hooks(model) == hooks and "forward" not in vars(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
