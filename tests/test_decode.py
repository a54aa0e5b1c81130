"""Decode bookkeeping: manual cache continuation, multi-stage cached decode, serving from threads."""
from __future__ import annotations

import copy
import inspect
import threading

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError
from vlm_tokenprune.eval.tiny_models import make_batch

from vlm_tokenprune import engine

from kit import BACKENDS, tiny_llava

ROWS = [[5, "img", 7], [2, "img", 1, "img", 3]]
MULTI = "fastv:layer=1,keep=0.5+random:layer=2,keep=0.3,seed=4+fastv:layer=3,tokens=5"


def _greedy_manual(model, inputs, steps):
    """Greedy decoding by hand: one prefill forward, then cached one-token forwards."""
    out = model(**inputs, use_cache=True)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.17 vs 5.24
    cache, mask = out[name], inputs["attention_mask"]
    toks = [out.logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=toks[-1][:, None], attention_mask=mask, **{name: cache})
        toks.append(out.logits[:, -1].argmax(-1))
    return torch.stack(toks, 1)



@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("policy", ["fastv:keep=0.25", MULTI])
def test_manual_continuation_equals_generate(impl, policy):
    model = tiny_llava(impl)
    inputs = make_batch(model, ROWS)
    with torch.no_grad(), vtp.patch(model, policy) as h:
        gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, -6:]
        manual = _greedy_manual(model, inputs, 6)
        assert h.last_trace().phase == "decode"
    assert torch.equal(gen, manual)


@pytest.mark.parametrize("impl", BACKENDS)
def test_multi_stage_batch_equals_rows_alone(impl):
    model = tiny_llava(impl)
    inputs = make_batch(model, ROWS)
    with torch.no_grad(), vtp.patch(model, MULTI) as h:
        gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, -6:]
        kept = [s.kept_positions for s in h.last_trace().stages]
        for b, row in enumerate(ROWS):
            alone = make_batch(model, [row], seed=0)
            # make_batch draws text ids in row order: rebuild row b with the batch's own ids
            L = inputs["input_ids"].shape[1]
            n = int(inputs["attention_mask"][b].sum())
            alone["input_ids"] = inputs["input_ids"][b:b + 1, L - n:]
            alone["attention_mask"] = torch.ones(1, n, dtype=torch.long)
            first_img = sum(r.count("img") for r in ROWS[:b])
            alone["pixel_values"] = inputs["pixel_values"][first_img:first_img + row.count("img")]
            g1 = model.generate(**alone, max_new_tokens=6, do_sample=False)[:, -6:]
            assert torch.equal(g1[0], gen[b])
            for s, stage in enumerate(h.last_trace().stages):
                assert [p + (L - n) for p in stage.kept_positions[0]] == kept[s][b]


def test_two_models_in_two_threads_match_running_alone():
    models = [tiny_llava("sdpa", seed=s) for s in (0, 1)]
    batches = [make_batch(m, ROWS, seed=s) for s, m in enumerate(models)]
    policies = ["fastv:keep=0.25", MULTI]
    alone = []
    for m, b, p in zip(models, batches, policies):
        with vtp.patch(m, p):
            alone.append(m.generate(**b, max_new_tokens=5, do_sample=False))
    handles = [vtp.patch(m, p) for m, p in zip(models, policies)]
    results = [[None] * 4, [None] * 4]

    def work(i):
        torch.set_num_threads(1)
        for r in range(4):
            results[i][r] = models[i].generate(**batches[i], max_new_tokens=5, do_sample=False)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.unpatch()
    for i in range(2):
        assert all(torch.equal(r, alone[i]) for r in results[i])


def test_second_thread_runs_while_the_first_is_inside_a_forward():
    """Per-forward state belongs to its thread: a forward from another thread while one is blocked inside a
    decoder layer runs and gives the one-at-a-time result; ``unpatch()`` is refused until the first returns."""
    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    h = vtp.patch(model, "fastv")
    with torch.no_grad():
        want = model(**inputs).logits
    inside, release, errors, got = threading.Event(), threading.Event(), [], []

    def block(module, args):
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)

    extra = model.model.language_model.layers[1].register_forward_pre_hook(block)
    first = threading.Thread(target=lambda: got.append(model(**inputs).logits), name="first")
    first.start()
    inside.wait(10)
    with torch.no_grad():
        second = model(**inputs).logits  # while "first" is inside layer 1
    try:
        h.unpatch()
    except InputError as e:
        errors.append(e.field)
    release.set()
    first.join()
    extra.remove()
    h.unpatch()
    assert errors == ["unpatch"] and torch.equal(second, want) and torch.equal(got[0], want)


def test_decode_steps_look_up_the_kept_sets_once_per_prompt(monkeypatch):
    """Issue reliability-2 item 8: a decode step does no per-layer search for its kept set; the per-layer plan
    is built on the prompt's first decode step, and the steps after it reuse it (same tokens as before)."""
    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    calls = []
    kept_at = vtp.state.PrefillRecord.kept_at
    monkeypatch.setattr(vtp.state.PrefillRecord, "kept_at", lambda self, layer: calls.append(layer) or kept_at(self, layer))
    with torch.no_grad(), vtp.patch(model, MULTI):
        want = _greedy_manual(model, inputs, 1)
        calls.clear()
        toks = _greedy_manual(model, inputs, 6)  # a prefill and 5 decode steps
    assert torch.equal(toks[:, :1], want)
    assert sorted(calls) == list(range(len(model.model.language_model.layers)))  # once per layer, not per step


def _library_calls_per_decode_step(layers: int, policy: str, impl: str, rows=ROWS, monkeypatch=None) -> int:
    """Library calls during one cached decode step (the second one: the first builds the prompt's per-layer plan)
    of a ``layers``-layer tiny LLaVA: every torch hook ``patch()`` registered, on any module, plus every routed
    decoder-layer call (``engine.layer_pre_hook``, reached through ``sites.routed_layers``)."""
    model = tiny_llava(impl, layers=layers)
    inputs = make_batch(model, rows)
    calls = [0]

    def counted(fn):
        def hook(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)
        hook.__vtp__ = True
        return hook

    monkeypatch.setattr(engine, "layer_pre_hook", counted(engine.layer_pre_hook))  # bound by patch() below
    with torch.no_grad(), vtp.patch(model, policy) as h:
        for m in model.modules():
            for hooks in (m._forward_pre_hooks, m._forward_hooks):
                for key, fn in list(hooks.items()):
                    if getattr(fn, "__vtp__", False):
                        hooks[key] = counted(fn)
        counts = []
        for tokens in (2, 3):  # a prefill and 1 / 2 decode steps (each prefill starts a new cache)
            calls[0] = 0
            _greedy_manual(model, inputs, tokens)
            counts.append(calls[0])
        assert h.last_trace().phase == "decode"
    return counts[1] - counts[0]


@pytest.mark.parametrize("rows", [ROWS[:1], ROWS], ids=["one row", "padded batch"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_decode_step_library_calls_do_not_grow_with_depth(impl, rows, monkeypatch):
    """Issue reliability-2 item 8: a decode step costs the unpruned model's work plus a constant number of library
    calls, whatever the depth and wherever the stage sits. A pre-LLM policy: the top pre/post hooks and the
    language model's hook. An LLM-site stage: the top pre/post hooks, its scoring layer's k/v capture hooks and
    one gate (the stage's first layer shrinks the one mask tensor every later layer receives); a second stage adds
    its own capture hooks and gate. Fails on the engine with a pre-hook on every layer from the stage on
    (4 + 3 calls at layer 2 of 4, 4 + 7 at layer 2 of 8)."""
    def count(layers, policy):
        return _library_calls_per_decode_step(layers, policy, impl, rows, monkeypatch)

    pre = "uniform:site=pre_llm,keep=0.25,positions=gaps"
    assert count(4, pre) == count(8, pre) == 3
    one = [count(4, "fastv:layer=2,keep=0.25"), count(8, "fastv:layer=2,keep=0.25"),
           count(8, "fastv:layer=6,keep=0.25")]
    assert one == [2 + 2 + 1] * 3
    assert count(8, "fastv:layer=2,keep=0.5+fastv:layer=5,keep=0.25") == 2 + 2 * (2 + 1)


def _decode_logits(model, inputs, policy, steps, gated, monkeypatch):
    """Each step's logits of a cached greedy decode under ``policy``; ``gated=False`` forces every layer after a
    stage to get its own input (the path before gates), for a side-by-side check."""
    with monkeypatch.context() as m:
        if not gated:
            m.setattr(engine, "decode_gates_apply", lambda handle, record: False)
        out_logits, states = [], []
        with torch.no_grad(), vtp.patch(model, policy) as h:
            out = model(**inputs, use_cache=True)
            name = "cache" if "cache" in out else "past_key_values"
            cache, mask = out[name], inputs["attention_mask"]
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(tok)], 1)
                out = model(input_ids=tok, attention_mask=mask, **{name: cache})
                out_logits.append(out.logits)
                states.append(h.last_state.decode_gated)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return out_logits, states


@pytest.mark.parametrize("rows", [ROWS[:1], ROWS], ids=["one row", "padded batch"])
@pytest.mark.parametrize("policy", ["fastv:layer=2,keep=0.25", MULTI, "fastv:layer=1,keep=1.0+fastv:layer=3,keep=0.3"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_gated_decode_equals_every_layer_its_own_input(impl, policy, rows, monkeypatch):
    """A gated decode step (``sites.routed_layers``: the mask shrunk in place once per stage) gives bit-identical
    logits to the same step with every layer after a stage given its own shrunk input, for one row (no mask under
    sdpa / flash: nothing to change) and a padded batch (a 4-D mask shrunk in place; flash's 2-D mask, which may be
    the caller's own tensor, falls back to per-layer inputs), with a keep-all stage between pruning ones."""
    model = tiny_llava(impl)
    inputs = make_batch(model, rows)
    got, gated = _decode_logits(model, inputs, policy, 4, True, monkeypatch)
    want, plain = _decode_logits(model, inputs, policy, 4, False, monkeypatch)
    assert not any(plain)
    expect_gated = not (impl not in ("eager", "sdpa") and len(rows) > 1)  # flash + padding: per-layer inputs
    assert gated == [expect_gated] * 4
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_decode_with_grad_enabled_is_not_gated_and_equal(monkeypatch):
    """Under ``torch.enable_grad()`` a decode step never changes a mask in place (autograd may have saved it):
    every layer gets its own input, with the same logits as the gated no-grad step."""
    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    policy = "fastv:layer=2,keep=0.25"
    want, _ = _decode_logits(model, inputs, policy, 2, True, monkeypatch)
    with vtp.patch(model, policy) as h:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        name = "cache" if "cache" in out else "past_key_values"
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tok)], 1)
        with torch.enable_grad():
            got = model(input_ids=tok, attention_mask=mask, **{name: out[name]}).logits
        assert h.last_state.phase == "decode" and not h.last_state.decode_gated
    assert torch.equal(got.detach(), want[0])


@pytest.mark.parametrize("policy", ["fastv:layer=2,keep=0.25", "uniform:site=pre_llm,keep=0.25,positions=gaps", MULTI])
def test_a_copied_prompt_cache_continues_the_same_prompt(policy):
    """transformers' prompt-reuse recipe (``copy.deepcopy(prompt_cache)``, then decode from the copy): the copy holds
    the pruned prompt, so its decode steps must continue that prompt exactly as the original cache does. Before the
    cache carried its prompt's tag, a copy ran as an unknown cache: a padded batch raised a raw size mismatch, and a
    pre-LLM policy silently decoded at the reduced cache's positions (logits off by ~3e-3)."""
    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    with torch.no_grad(), vtp.patch(model, policy) as h:
        out = model(**inputs, use_cache=True)
        name = "cache" if "cache" in out else "past_key_values"
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        copied = copy.deepcopy(out[name])
        got = model(input_ids=nxt, attention_mask=mask, **{name: copied}).logits
        assert h.last_trace().phase == "decode"
        want = model(input_ids=nxt, attention_mask=mask, **{name: out[name]}).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gated_generate_under_inference_mode_equals_no_grad(impl):
    """The gate's in-place mask change is allowed on inference tensors: ``generate()`` under
    ``torch.inference_mode()`` takes the gated path and gives the same tokens as under ``torch.no_grad()``."""
    model = tiny_llava(impl)
    inputs = make_batch(model, ROWS)
    outs = []
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), vtp.patch(model, "fastv:layer=2,keep=0.25") as h:
            outs.append(model.generate(**inputs, max_new_tokens=5, do_sample=False))
            assert h.last_state.phase == "decode" and h.last_state.decode_gated
    assert torch.equal(outs[0], outs[1])
