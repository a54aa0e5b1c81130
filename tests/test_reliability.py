"""Serving-style robustness: no state growth, other dtypes, beam search / sampling, compiled models."""
from __future__ import annotations

import gc

import pytest
import torch

import vlm_tokenprune as vtp
from kit import fresh_llava, tiny_llava
from vlm_tokenprune import UnsupportedModelError
from vlm_tokenprune.eval.tiny_models import make_batch
from helpers import cache_kwargs

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]


def test_no_state_growth_over_many_forwards_and_generates():
    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "fastv:keep=0.25+random:layer=3,keep=0.1") as h, torch.no_grad():
        for _ in range(200):
            model(**inputs)
        for _ in range(20):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        gc.collect()
        assert h.state is None
        assert h.n_sessions == 0  # every generate's cache is gone, and with it its record
        assert h.last_state.cache is None  # the last trace holds no KV cache
        tr = h.last_trace()
    assert tr.phase == "decode" and len(tr.stages) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = tiny_llava("sdpa", dtype=dtype)
    inputs = make_batch(model, ROWS)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, "fastv:keep=1"):
            assert torch.equal(model(**inputs).logits, ref)
        with vtp.patch(model, "fastv:keep=0.25") as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert h.last_trace().stages[0].visual_after == [9, 18]
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_beam_search_and_seeded_sampling():
    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    kw = dict(max_new_tokens=4, num_beams=3, do_sample=False)
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        with vtp.patch(model, "fastv:keep=1"):
            assert torch.equal(model.generate(**inputs, **kw), ref)
        with vtp.patch(model, "fastv:keep=0.25"):
            beams = model.generate(**inputs, **kw)
            torch.manual_seed(0)
            s1 = model.generate(**inputs, max_new_tokens=4, do_sample=True)
            torch.manual_seed(0)
            s2 = model.generate(**inputs, max_new_tokens=4, do_sample=True)
    assert beams.shape[0] == 2 and torch.equal(s1, s2)


def test_compiled_model_is_refused():
    model = tiny_llava("sdpa")
    compiled = torch.compile(model)
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(compiled, "fastv")
    assert e.value.field == "model" and "compile" in str(e.value)


def test_coexists_with_accelerate_offload_hooks():
    accelerate = pytest.importorskip("accelerate")
    model = fresh_llava("sdpa")  # offloading moves the weights off the module
    inputs = make_batch(model, ROWS)
    with torch.no_grad():
        with vtp.patch(model, "fastv:keep=0.25"):
            ref = model(**inputs).logits
            ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    # offload every weight to CPU RAM with accelerate's module hooks (weights live off-module between calls)
    accelerate.cpu_offload(model, execution_device="cpu")
    offloaded = {n for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    assert offloaded
    with torch.no_grad():
        h = vtp.patch(model, "fastv:keep=0.25")
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        h.unpatch()
    assert torch.allclose(out, ref, atol=1e-6) and torch.equal(gen, ref_gen)
    assert {n for n, m in model.named_modules() if hasattr(m, "_hf_hook")} == offloaded  # accelerate's hooks intact


def test_more_bad_inputs_are_named():
    from vlm_tokenprune import InputError
    from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID

    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS[:1])
    with vtp.patch(model, "fastv"):
        bad = dict(inputs, input_ids=inputs["input_ids"].clone())
        bad["input_ids"][0, 3] = IMAGE_TOKEN_ID  # one placeholder too many
        with pytest.raises(InputError) as e:
            model(**bad)
        assert e.value.field == "input_ids"
        L = inputs["attention_mask"].shape[1]
        with pytest.raises(InputError) as e:
            model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=torch.ones(1, 1, L, L))
        assert e.value.field == "attention_mask"
        out = model(**inputs, use_cache=True)
        with pytest.raises(InputError) as e:  # new images on top of an existing cache
            model(input_ids=inputs["input_ids"][:, -3:], pixel_values=inputs["pixel_values"], **cache_kwargs(out))
        assert e.value.field == "pixel_values"


def test_long_cached_decoding_equals_cache_free_oracle():
    """200 cached greedy steps equal the independent cache-free FastV oracle (kept set fixed at the prompt)."""
    from reference import fastv_oracle as oracle

    model = fresh_llava("sdpa")
    model.generation_config.eos_token_id = None  # run all 200 steps
    inputs = make_batch(model, ROWS[:1])
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtp.patch(model, "fastv:layer=2,tokens=9"):
        g = model.generate(**inputs, max_new_tokens=200, do_sample=False, min_new_tokens=200)
    want = oracle.fastv_generate(model, inputs, 2, 9, 200, rescore=False)
    assert g[0, L:].tolist() == want


def test_memory_does_not_grow_over_many_calls():
    """RSS after 1,000 patched forwards and 100 generate() calls stays within a small slack of the warm value."""
    import resource

    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "fastv:keep=0.25+random:layer=3,keep=0.1"), torch.no_grad():
        for _ in range(50):  # warm up allocator pools
            model(**inputs)
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        gc.collect()
        warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        for _ in range(1000):
            model(**inputs)
        for _ in range(100):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        gc.collect()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"RSS growth {(peak - warm) / 1024:.2f} MiB")
    assert peak - warm < 8 * 1024, f"peak RSS grew by {(peak - warm) / 1024:.1f} MiB"


def test_long_cached_decoding_multi_stage_equals_cache_free_oracle():
    """200 cached greedy steps of a two-stage FEATHER policy equal the independent cache-free FEATHER oracle."""
    from reference import feather_oracle as oracle

    model = fresh_llava("sdpa")
    model.generation_config.eos_token_id = None
    inputs = make_batch(model, ROWS[:1])
    L = inputs["input_ids"].shape[1]
    stages = [dict(layer=1, k=12, rope=False, softmax="keys", stride=3),
              dict(layer=3, k=4, rope=False, softmax="keys", stride=0)]
    policy = "feather:layer=1,tokens=12,stride=3+feather:layer=3,tokens=4,stride=0"
    with torch.no_grad(), vtp.patch(model, policy):
        g = model.generate(**inputs, max_new_tokens=200, do_sample=False, min_new_tokens=200)
    want = oracle.feather_generate(model, inputs, stages, 200, rescore=False)
    assert g[0, L:].tolist() == want
