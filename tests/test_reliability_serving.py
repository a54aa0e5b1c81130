"""Serving-grade behaviour (issue 15): prune_heads(scope=all) leaves the model's own state alone (item 4), and
every generation mode of the installed transformers either equals plain greedy on the patched model or is
refused by name before generating (item 3)."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, build_tiny_qwen2_vl, make_batch

HEADS_ALL = "prune_heads:heads=1/0;2/1;2/3,scope=all"
ROWS = [[5, "img", 7], [3, "img", 4]]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# -- item 4: prune_heads(scope=all) and the model's own state ---------------------------------------------
def test_heads_all_state_dict_is_the_unpatched_one():
    model = build_tiny_llava("sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with vtp.patch(model, HEADS_ALL):
        sd = model.state_dict()
        assert sd.keys() == before.keys()
        assert all(torch.equal(sd[k], v) for k, v in before.items())


def test_heads_all_save_pretrained_while_patched_reloads(tmp_path):
    model = build_tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    ref = logits(model, inputs)
    with vtp.patch(model, HEADS_ALL):
        patched = logits(model, inputs)
        model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path, attn_implementation="sdpa")
    assert torch.equal(logits(again, inputs), ref)
    with vtp.patch(again, HEADS_ALL):
        assert torch.equal(logits(again, inputs), patched)


def test_heads_all_load_state_dict_while_patched_uses_the_loaded_weights():
    model = build_tiny_llava("sdpa", seed=0)
    other = build_tiny_llava("sdpa", seed=1)
    inputs = make_batch(model, ROWS)
    with vtp.patch(other, HEADS_ALL):
        want = logits(other, inputs)
    with vtp.patch(model, HEADS_ALL):
        model.load_state_dict(other.state_dict())
        assert torch.equal(logits(model, inputs), want)
    assert torch.equal(logits(model, inputs), logits(other, inputs))


def test_heads_all_to_dtype_then_unpatch_is_consistent():
    model = build_tiny_llava("sdpa")
    twin = build_tiny_llava("sdpa").to(torch.bfloat16)
    inputs = make_batch(model, ROWS)
    h = vtp.patch(model, HEADS_ALL)
    model.to(torch.bfloat16)
    with vtp.patch(twin, HEADS_ALL):
        want = logits(twin, {**inputs, "pixel_values": inputs["pixel_values"].bfloat16()})
    bf = {**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}
    assert torch.equal(logits(model, bf), want)
    h.unpatch()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(model, bf), logits(twin, bf))


# -- item 3: generation modes ----------------------------------------------------------------------------
def _models():
    from vlm_tokenprune.eval.tiny_models import make_qwen_batch

    llava = build_tiny_llava("sdpa")
    qwen = build_tiny_qwen2_vl("sdpa")
    # one row: transformers' assisted generation takes batch size 1
    return [("llava", llava, make_batch(llava, [[5, "img", 7]])),
            ("qwen2_vl", qwen, make_qwen_batch(qwen, [[3, "img", 4]], image_grids=[(2, 3)]))]


MODELS = _models()
REFUSED = [  # (generate kwargs, the field named)
    ({"assistant_model": "twin"}, "assistant_model"),
    ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"),
    ({"dola_layers": "high"}, "dola_layers"),
    ({"num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 1.0}, "num_beam_groups"),
    ({"num_beams": 2, "force_words_ids": [[5]]}, "force_words_ids"),
    ({"custom_generate": lambda *a, **k: None}, "custom_generate"),
]


@pytest.mark.parametrize("name,model,inputs", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("kwargs,field", REFUSED, ids=[f for _, f in REFUSED])
def test_generation_modes_that_break_the_prefill_contract_are_refused(name, model, inputs, kwargs, field):
    """Assisted / speculative decoding (and prompt lookup) verify prompt + candidates in their first forward:
    with fastv they gave other tokens than plain greedy. They, and the custom_generate modes (contrastive, DoLa,
    group / constrained beams), are refused by name before generating; the model then generates as usual."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    kwargs = {k: (twin if v == "twin" else v) for k, v in kwargs.items()}
    with torch.no_grad(), vtp.patch(model, "fastv:layer=2,keep=0.25") as h:
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with pytest.raises(InputError) as e:
            model.generate(**inputs, max_new_tokens=4, do_sample=False, **kwargs)
        assert e.value.field == field
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), greedy)
    assert "generate" not in vars(model) and h.active is False


@pytest.mark.parametrize("name,model,inputs", MODELS, ids=[m[0] for m in MODELS])
def test_assisted_decoding_with_a_weight_level_policy_equals_greedy(name, model, inputs):
    """prune_heads(scope=all) (the same weights for every token) does not depend on the prompt boundary:
    assisted decoding is allowed there and gives plain greedy's tokens (its contract)."""
    twin = type(model)(model.config).eval()
    with torch.no_grad(), vtp.patch(model, HEADS_ALL):
        greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assisted = model.generate(**inputs, max_new_tokens=5, do_sample=False, assistant_model=twin)
        lookup = model.generate(**inputs, max_new_tokens=5, do_sample=False, prompt_lookup_num_tokens=2)
    assert torch.equal(assisted, greedy) and torch.equal(lookup, greedy)


def test_beam_search_scores_equal_the_patched_models_own_cached_decode():
    """Beam search with a cache (LLM-site stage): every beam row is a copy of its prompt (same kept set), so each
    returned sequence's score equals the patched model's prefill + cached teacher-forced decode of it."""
    model = MODELS[0][1]
    assert_beam_scores_are_sequence_logprobs(model, make_batch(model, [[5, "img", 7]]), "fastv:layer=2,keep=0.25")


def assert_beam_scores_are_sequence_logprobs(model, inputs: dict, policy) -> None:
    """Beam search (3 beams, 3 returned, length_penalty 0) under ``policy`` on the one-row ``inputs``: each returned
    sequence's score == the patched model's prefill + cached teacher-forced decode of it (``_sequence_logprob``)."""
    L = inputs["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    with torch.no_grad(), vtp.patch(model, policy):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=3,
                             length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
        for seq, score in zip(out.sequences, out.sequences_scores):
            new = seq[L:].tolist()
            if eos is not None and eos in new:
                new = new[: new.index(eos) + 1]
            assert torch.allclose(_sequence_logprob(model, inputs, new), score.float(), atol=1e-4)


def _sequence_logprob(model, inputs, new_tokens):
    """Sum of log-probs of ``new_tokens`` after the (one-row) prompt: patched prefill, then cached decode."""
    out = model(**inputs, use_cache=True)
    total = torch.log_softmax(out.logits[0, -1].float(), -1)[new_tokens[0]]
    key = "cache" if "cache" in out else "past_key_values"
    cache, mask = out[key], inputs["attention_mask"]
    for prev, tok in zip(new_tokens[:-1], new_tokens[1:]):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        out = model(input_ids=torch.tensor([[prev]]), attention_mask=mask, use_cache=True, **{key: cache})
        total = total + torch.log_softmax(out.logits[0, -1].float(), -1)[tok]
    return total


def test_continuous_batching_is_refused_by_name():
    """transformers' continuous batching (paged cache) cannot be served; transformers would catch the forward's
    error and only log each request as failed, so generate_batch is refused by name before it starts."""
    from transformers import GenerationConfig

    model = MODELS[0][1]
    if not hasattr(model, "generate_batch"):
        pytest.skip("this transformers has no continuous batching")
    with vtp.patch(model, "fastv:layer=2,keep=0.25"):
        with pytest.raises(InputError) as e:
            model.generate_batch(inputs=[[5, 6, 7]], generation_config=GenerationConfig(max_new_tokens=2))
        assert e.value.field == "generate_batch"
    assert "generate_batch" not in vars(model)
