"""Serving properties over EVERY registered preset (the list is read from ``vtp.PRESETS`` at collection
time, so a method registered later is covered without touching this file).

Per preset: sequential requests with different prompts, image counts, batch sizes and padding leave
no state (each equals the same request on a freshly patched model); a request that raised
mid-forward (or mid-generate) leaves the next one correct; keep-all equals the unpatched model
where the method has a keep-all setting (every stage has a budget); cached ``generate()`` runs and
is repeatable.

How a preset becomes a policy on a 4-layer tiny model (named rules, applied in this order):

- ``NEEDS_FILE``: presets that cannot be built without a file argument get one made here for the
  test model (``efficientvla_layers``: a ``what="layers"`` calibration from ``vtp.calibrate``).
  Any other preset that does not parse without arguments fails the test: add it to this rule.
- paper layers (presets written for 32-layer LLMs, ``Stage.depth``) are mapped to the model's depth by
  ``patch()`` itself (``Policy.at_depth``), so no rule here: the preset is patched as named.
- ``SHIPPED_MODEL``: a preset that ``patch()`` refuses on the random tiny LLaVA because its default
  file (learned weights, calibration) belongs to the shipped tiny VLM (a ``*.config_hash`` error)
  runs on the shipped tiny VLM (``load_tiny_vlm``) instead. Any other refusal fails the test.

The random tiny LLaVA has a 6-layer vision tower (feature layer 4) so vision-site stages fit (MCTF
halves at most once per layer: 36 patches need 3 layers to reach its 22 %).
"""
from __future__ import annotations

import functools

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, Policy
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch

PRESET_NAMES = vtp.PRESETS.names()
NEEDS_FILE = {"efficientvla_layers": "layers", "finercut": "sublayers"}  # preset -> calibration `what` made for the test model
FILE_ARGS = {"efficientvla_layers": "layers_kept=3,of=4", "finercut": "removed=2,of=8"}  # how much of the 4 layers it drops
# requests of one serving session: (rows, padding); batch sizes 1-3, 0-2 images per row, a text-only batch
REQUESTS = [
    ([[5, "img", 7], [3, "img", 2, "img", 4]], "left"),
    ([[4, "img", 6]], "left"),
    ([[3, "img", 2, "img", 5], [6, "img", 3], [9]], "right"),
    ([[7]], "left"),
]


def _keep_all_presets() -> list[str]:
    """Presets with a keep-all setting: they parse without arguments and every stage has a budget."""
    out = []
    for name in PRESET_NAMES:
        try:
            pol = Policy.parse(name)
        except vtp.PolicyError:
            continue  # needs an argument: a structural preset today (NEEDS_FILE); covered by the other tests
        if all(st.budget is not None for st in pol.stages):
            out.append(name)
    return out


@functools.cache
def _model(kind: str):
    if kind == "random":  # 6 vision encoder layers (feature layer 4): vision-site stages have layers to act on
        return build_tiny_llava("sdpa", vision_layers=6)
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm

    return load_tiny_vlm("sdpa")[0]


@functools.cache
def case(name: str, tmp: str) -> tuple[str, Policy]:
    """``(model kind, policy)`` of preset ``name`` after the rules above."""
    kind = "random"
    if name in NEEDS_FILE:
        path = f"{tmp}/{name}_{NEEDS_FILE[name]}.json"
        vtp.calibrate(_model(kind), [make_batch(_model(kind), rows, padding=pad) for rows, pad in REQUESTS[:2]],
                      what=NEEDS_FILE[name], path=path, progress=False)
        pol = Policy.parse(f"{name}:calibration={path},{FILE_ARGS[name]}")
    else:
        try:
            pol = Policy.parse(name)
        except vtp.PolicyError as e:
            pytest.fail(f"preset {name!r} does not build without arguments ({e}); add it to NEEDS_FILE")
    try:
        vtp.patch(_model(kind), pol).unpatch()
    except IncompatiblePolicyError as e:
        if not e.field.endswith(".config_hash"):
            raise
        kind = "shipped"  # rule SHIPPED_MODEL
        vtp.patch(_model(kind), pol).unpatch()
    return kind, pol


@pytest.fixture
def preset_case(request, tmp_path_factory):
    tmp = str(tmp_path_factory.getbasetemp())
    kind, pol = case(request.param, tmp)
    return _model(kind), pol


def _requests(model):
    return [make_batch(model, rows, seed=i, padding=pad) for i, (rows, pad) in enumerate(REQUESTS)]


def _fault_on_last_layer(model, after_calls: int = 0):
    """A forward pre-hook on the last decoder layer that raises on call ``after_calls`` (0-based), once."""
    layer = model.model.language_model.layers[-1]
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == after_calls + 1:
            raise RuntimeError("injected fault")

    return layer.register_forward_pre_hook(hook)


@pytest.mark.parametrize("preset_case", PRESET_NAMES, indirect=True)
def test_sequential_requests_leave_no_state(preset_case):
    model, pol = preset_case
    reqs = _requests(model)
    with torch.no_grad():
        fresh = []
        for r in reqs:  # each request alone on a freshly patched model
            with vtp.patch(model, pol):
                fresh.append(model(**r).logits)
        with vtp.patch(model, pol) as h:
            served = [model(**r).logits for r in reqs + reqs[:1]]
            assert h.state is None
    for got, want in zip(served, fresh + fresh[:1]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("preset_case", PRESET_NAMES, indirect=True)
def test_failed_request_leaves_the_next_correct(preset_case):
    model, pol = preset_case
    r = _requests(model)[0]
    kw = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}  # the shipped VLM would stop at EOS
    with torch.no_grad(), vtp.patch(model, pol) as h:
        want, want_gen = model(**r).logits, model.generate(**r, **kw)
        fault = _fault_on_last_layer(model)  # a plain forward fails after every stage ran
        with pytest.raises(RuntimeError, match="injected fault"):
            model(**r)
        fault.remove()
        assert h.state is None and torch.equal(model(**r).logits, want)
        fault = _fault_on_last_layer(model, after_calls=2)  # generate() fails in its second decode step
        with pytest.raises(RuntimeError, match="injected fault"):
            model.generate(**r, **kw)
        fault.remove()
        assert h.state is None and torch.equal(model.generate(**r, **kw), want_gen)


@pytest.mark.parametrize("preset_case", _keep_all_presets(), indirect=True)
def test_keep_all_equals_unpatched(preset_case):
    model, pol = preset_case
    keep_all = Policy.from_dict({"stages": [dict(st, budget={"keep": 1.0}) for st in pol.to_dict()["stages"]]})
    reqs = _requests(model)
    with torch.no_grad():
        want = [model(**r).logits for r in reqs]
        with vtp.patch(model, keep_all):
            got = [model(**r).logits for r in reqs]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("preset_case", PRESET_NAMES, indirect=True)
def test_cached_generate_runs_and_repeats(preset_case):
    model, pol = preset_case
    r = make_batch(model, REQUESTS[2][0], seed=2, padding="left")  # three rows, one text-only; left padding
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad(), vtp.patch(model, pol) as h:
        a = model.generate(**r, **kw)
        trace = h.last_trace()
        b = model.generate(**r, **kw)
        resolved = h.policy  # the preset's paper layers on this model (token stages on one layer collapse)
    assert a.shape == (3, r["input_ids"].shape[1] + 4) and torch.equal(a, b)
    assert trace.phase == "decode" and len(trace.stages) >= sum(st.budget is not None for st in resolved.stages)
