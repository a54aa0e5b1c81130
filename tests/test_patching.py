"""patch()/unpatch() symmetry, keep-all exactness, validation before mutation, traces, fuzz."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, InputError, PolicyError, UnsupportedModelError
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, make_batch

from kit import BACKENDS, assert_budgets_honoured, fresh_llava, tiny_llava

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]  # batch 2, left padding, 1 and 2 images


@pytest.fixture(scope="module")
def models():
    return {impl: tiny_llava(impl) for impl in BACKENDS}


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _ours(model):
    return sum(getattr(h, "__vtp__", False) for m in model.modules()
               for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))


def _attrs(model):
    return {name: sorted(vars(m).keys()) for name, m in model.named_modules()}


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("policy", ["fastv:keep=1", "uniform:layer=1,keep=1.0+random:layer=3,keep=1"])
def test_keep_all_is_exactly_unpatched(models, impl, policy):
    model = models[impl]
    inputs = make_batch(model, ROWS)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with vtp.patch(model, policy) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert all(s.visual_before == s.visual_after for s in h.last_trace().stages)


def test_unpatch_restores_exactly_after_many_cycles(models):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS)
    hooks, attrs = _hook_count(model), _attrs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**inputs).logits
        for i in range(20):
            h = vtp.patch(model, f"fastv:layer={1 + i % 3},keep=0.25")
            changed = model(**inputs).logits
            assert changed.shape != ref.shape
            h.unpatch()
            h.unpatch()  # idempotent
        out = model(**inputs).logits
    assert torch.equal(out, ref)
    assert _hook_count(model) == hooks and _ours(model) == 0  # transformers keeps a few hooks of its own
    assert _attrs(model) == attrs
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_context_manager_unpatches_on_error(models):
    model = models["eager"]
    with pytest.raises(RuntimeError, match="boom"):
        with vtp.patch(model, "fastv"):
            raise RuntimeError("boom")
    assert _ours(model) == 0


def _assert_refused(model, exc, field, fn):
    hooks, attrs = _hook_count(model), _attrs(model)
    with pytest.raises(exc) as e:
        fn()
    assert isinstance(e.value, ValueError)
    assert e.value.field == field, str(e.value)
    assert _hook_count(model) == hooks and _attrs(model) == attrs
    return e.value


@pytest.mark.parametrize(
    "policy, exc, field",
    [
        ("fastv:layer=4", IncompatiblePolicyError, "stages[0].layer"),
        ("fastv:layer=99", IncompatiblePolicyError, "stages[0].layer"),
        ("fastv:layer=0", PolicyError, "stages[0].layer"),
        ("fastv:keep=0", PolicyError, "stages[0].keep"),
        ("nosuch", PolicyError, "stages[0].method"),
        ("fastv:what=1", PolicyError, "stages[0].what"),
    ],
)
def test_bad_policy_leaves_model_untouched(models, policy, exc, field):
    _assert_refused(models["sdpa"], exc, field, lambda: vtp.patch(models["sdpa"], policy))


def test_layer_error_lists_allowed_range(models):
    err = _assert_refused(models["sdpa"], IncompatiblePolicyError, "stages[0].layer",
                          lambda: vtp.patch(models["sdpa"], "fastv:layer=7"))
    assert "1..3" in str(err)


def test_unsupported_models_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=64))
    err = _assert_refused(llm, UnsupportedModelError, "model.config.model_type", lambda: vtp.patch(llm, "fastv"))
    assert "llava" in str(err) and "llava_next" in str(err)
    gemma = tiny_llava("sdpa", text_model_type="gemma")
    _assert_refused(gemma, UnsupportedModelError, "config.text_config.model_type", lambda: vtp.patch(gemma, "fastv"))
    for not_a_model in (None, 3, torch.nn.Linear(2, 2)):  # no .config at all: named as such
        with pytest.raises(UnsupportedModelError) as e:
            vtp.patch(not_a_model, "fastv")
        assert e.value.field == "model" and type(not_a_model).__name__ in str(e.value)


def test_static_cache_is_refused(models):
    model = fresh_llava("sdpa")
    model.generation_config.cache_implementation = "static"
    _assert_refused(model, UnsupportedModelError, "generation_config.cache_implementation",
                    lambda: vtp.patch(model, "fastv"))
    model = models["sdpa"]
    inputs = make_batch(model, ROWS[:1])
    with vtp.patch(model, "fastv"):
        with pytest.raises(InputError) as e:
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
        assert e.value.field == "cache"


def test_patching_twice_is_refused(models):
    model = models["sdpa"]
    with vtp.patch(model, "fastv"):
        _assert_refused(model, UnsupportedModelError, "model", lambda: vtp.patch(model, "fastv"))


def test_unknown_backend_is_refused(models):
    _assert_refused(models["sdpa"], PolicyError, "backend", lambda: vtp.patch(models["sdpa"], "fastv", backend="cuda"))


def test_runtime_input_errors(models):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "fastv:layer=2,tokens=40", strict=True) as h:  # row 0 has only 36 visual tokens
        with pytest.raises(InputError) as e:
            model(**inputs)
        assert e.value.field == "stages[0].tokens"
        with pytest.raises(InputError) as e:
            model(**inputs, labels=inputs["input_ids"])
        assert e.value.field == "labels"
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(InputError) as e:
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        assert e.value.field == "input_ids"
        assert h.state is None  # a failed forward leaves no state behind
    assert _ours(model) == 0


def test_failed_forward_does_not_leak_into_the_next(models):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "fastv:keep=0.25"):
        good = model(**inputs).logits
        with pytest.raises(InputError):
            model(**inputs, labels=inputs["input_ids"])
        again = model(**inputs).logits
    assert torch.equal(good, again)


def test_text_only_input_is_a_noop(models):
    model = models["eager"]
    inputs = make_batch(model, [[9], [4]])
    ref = model(**inputs).logits
    with vtp.patch(model, "fastv:keep=0.1") as h:
        out = model(**inputs).logits
        assert h.last_trace().stages == [] and h.last_trace().phase == "passthrough"
    assert torch.equal(out, ref)


def test_unpatch_inside_forward_is_refused(models):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS[:1])
    h = vtp.patch(model, "fastv")
    seen = []

    def try_unpatch(module, args):
        with pytest.raises(InputError) as e:
            h.unpatch()
        seen.append(e.value.field)

    extra = model.model.language_model.layers[1].register_forward_pre_hook(try_unpatch)
    model(**inputs)
    extra.remove()
    h.unpatch()
    assert seen == ["unpatch"] and not vtp.patching.is_patched(model)


def test_trace_and_describe(models):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "fastv:layer=2,keep=0.25+uniform:layer=3,tokens=4") as h:
        model(**inputs)
        tr = h.last_trace()
        text = h.describe()
    assert tr.phase == "prefill" and [s.layer for s in tr.stages] == [2, 3]
    assert tr.stages[0].visual_before == [36, 72] and tr.stages[0].visual_after == [9, 18]
    assert tr.stages[1].visual_after == [4, 4]
    assert [len(k) for k in tr.stages[1].kept_positions] == [4, 4]
    assert set(tr.stages[1].kept_positions[0]) <= set(tr.stages[0].kept_positions[0])
    ids = inputs["input_ids"]
    for b, kept in enumerate(tr.stages[0].kept_positions):
        assert all(ids[b, p] == IMAGE_TOKEN_ID for p in kept) and kept == sorted(kept)
    L = ids.shape[1]
    n_text = [int(((ids[b] != IMAGE_TOKEN_ID) & inputs["attention_mask"][b].bool()).sum()) for b in range(2)]
    assert tr.tokens_per_layer[:2] == [L, L]
    assert tr.tokens_per_layer[2] == max(n + k for n, k in zip(n_text, [9, 18]))
    assert tr.tokens_per_layer[3] == max(n + 4 for n in n_text)
    assert all(s.seconds >= 0 for s in tr.stages)
    assert "decoder layer 2: input change before the layer, routed call (score stage 0 and drop tokens" in text
    assert "decoder layer 1: self_attn.k_proj forward hook (capture for stage 0)" in text


def test_random_is_seeded_and_uniform_is_spatially_even(models):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS[:1])
    kept = []
    for seed in (0, 0, 1):
        with vtp.patch(model, f"random:keep=0.25,seed={seed}") as h:
            model(**inputs)
            kept.append(h.last_trace().stages[0].kept_positions[0])
    assert kept[0] == kept[1] != kept[2]
    with vtp.patch(model, "uniform:tokens=9") as h:
        model(**inputs)
        pos = h.last_trace().stages[0].kept_positions[0]
    first = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    cells = [divmod(p - first, 6) for p in pos]  # 6x6 grid
    assert cells == [(1, 1), (1, 3), (1, 5), (3, 1), (3, 3), (3, 5), (5, 1), (5, 3), (5, 5)]


def test_llava_next_uniform_covers_base_and_crops():
    model = tiny_llava("sdpa", next=True, image_size=16)
    inputs = make_batch(model, [[4, "img", 3]], image_sizes=[[20, 36]])
    with vtp.patch(model, "uniform:layer=2,keep=0.5") as h:
        out = model(**inputs)
        tr = h.last_trace()
    assert torch.isfinite(out.logits).all()
    n = tr.stages[0].visual_before[0]
    assert tr.stages[0].visual_after == [max(1, int(0.5 * n + 0.5))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=hs.lists(hs.lists(hs.one_of(hs.integers(1, 6), hs.just("img")), min_size=1, max_size=4), min_size=1, max_size=3),
    layer=hs.integers(1, 3),
    budget=hs.one_of(hs.floats(0.01, 1.0).map(lambda r: f"keep={r}"), hs.integers(1, 36).map(lambda t: f"tokens={t}")),
    method=hs.sampled_from(["fastv", "random", "uniform"]),
    impl=hs.sampled_from(BACKENDS),
    padding=hs.sampled_from(["left", "right"]),
)
def test_fuzz_budgets_are_honoured(models, rows, layer, budget, method, impl, padding):
    model = models[impl]
    inputs = make_batch(model, rows, padding=padding)
    n_vis = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert_budgets_honoured(model, inputs, f"{method}:layer={layer},{budget}", n_vis)


def test_budget_relative_to_current_count(models):
    model = models["sdpa"]
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "fastv:layer=1,keep=0.5+fastv:layer=2,keep=0.5,of=current") as h:
        model(**inputs)
        tr = h.last_trace()
    assert tr.stages[0].visual_after == [18, 36]
    assert tr.stages[1].visual_before == [18, 36] and tr.stages[1].visual_after == [9, 18]


@pytest.mark.parametrize("sizes", [[[20, 36]], [[16, 16]], [[40, 20]], [[20, 36], [30, 16]]])
def test_llava_next_layout_same_from_pixels_and_from_generate_features(sizes):
    """generate() hands the model mm_encoder_outputs instead of pixels + image_sizes: same grid either way."""
    from vlm_tokenprune.adapters import resolve_adapter

    model = tiny_llava("sdpa", next=True, image_size=16)
    inputs = make_batch(model, [[4] + ["img", 2] * len(sizes)], image_sizes=sizes)
    adapter = resolve_adapter(model)
    a = adapter.visual_layout(model, inputs["input_ids"], inputs)
    with torch.no_grad():
        enc = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                             return_dict=True)
    b = adapter.visual_layout(model, inputs["input_ids"], {"mm_encoder_outputs": {"image": enc}})
    assert a.coords_known and b.coords_known
    for f in ("is_visual", "image", "segment", "row", "col", "is_newline"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    with vtp.patch(model, "uniform:keep=0.5") as h:
        model(**inputs)
        fwd = h.last_trace().stages[0].kept_positions
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert h.last_trace().stages[0].kept_positions == fwd


def test_routed_layers_leave_the_model_unchanged_outside_a_forward():
    """``sites.routed_layers``: while patched the text model's ``layers`` holds the same modules under the same
    names (state_dict keys, indexing, slicing outside a forward give the plain modules); unpatch puts the original
    ModuleList object back."""
    from torch import nn

    model = tiny_llava("sdpa")
    lm = model.model.language_model
    original, keys = lm.layers, list(model.state_dict())
    with vtp.patch(model, "fastv:layer=2,keep=0.25"):
        assert lm.layers is not original and isinstance(lm.layers, nn.ModuleList)
        assert list(lm.layers) == list(original) and lm.layers[1] is original[1]
        part = lm.layers[:2]
        assert type(part) is nn.ModuleList and list(part) == list(original[:2])
        assert list(model.state_dict()) == keys
    assert lm.layers is original
