"""Serving behaviour of one patched model (issue: reliability-2, items 1 and 2).

- Concurrent forwards from several threads on ONE patched model (prefill and cached decode interleaved,
  mixed prompt lengths, an LLM-site, a pre-LLM + LLM and a vision-site policy) give exactly the logits and
  traces of the same calls run one by one: the per-forward state belongs to its thread.
- A ``KeyboardInterrupt`` (any ``BaseException``) raised inside a decoder layer, in the main thread or in
  a worker thread, in a forward or in ``generate()``, releases the forward state: the model keeps working
  and ``unpatch()`` restores it exactly.
"""
from __future__ import annotations

import functools
import random
import threading

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch

torch.set_num_threads(1)

PROMPTS = [[[5, "img", 7]], [[2, "img", 3, "img", 4]], [[5, "img", 7], [3, "img", 2, "img", 9]], [[9, "img", 2]]]
POLICIES = ["fastv:layer=2,keep=0.25", "uniform:site=pre_llm,keep=0.5,positions=gaps+fastv:layer=3,keep=0.5",
            "flowcut_vit:tokens=8,positions=gaps+fastv:layer=2,tokens=5",
            "prune_heads:heads=2/2;2/3,scope=visual+fastv:layer=2,keep=0.5"]


@functools.lru_cache(maxsize=None)
def tiny():
    return build_tiny_llava("sdpa", vision_layers=3)


def _cache(out) -> dict:
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}


def _call(model, handle, inputs: dict, decode_steps: int):
    """One request: a prefill (cached when decoding follows) and ``decode_steps`` greedy cached steps.
    Returns the logits of every forward and the prefill's kept positions (this thread's last trace)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=decode_steps > 0)
        kept = [s.kept_positions for s in handle.last_trace().stages]
        logits = [out.logits[:, -1]]
        mask = inputs["attention_mask"]
        for _ in range(decode_steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **_cache(out))
            logits.append(out.logits[:, -1])
    return logits, kept


@pytest.mark.parametrize("policy", POLICIES)
def test_concurrent_forwards_equal_sequential(policy):
    model = tiny()
    batches = [make_batch(model, rows, seed=s) for s, rows in enumerate(PROMPTS)]
    jobs = [(p, steps) for p in range(len(batches)) for steps in (0, 2)]  # prefill only / prefill + 2 decode steps
    with vtp.patch(model, policy) as h:
        want = {job: _call(model, h, batches[job[0]], job[1]) for job in jobs}  # one by one
        failures: list = []

        def worker(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                for _ in range(100 if policy == POLICIES[0] else 20):
                    job = rnd.choice(jobs)
                    logits, kept = _call(model, h, batches[job[0]], job[1])
                    w_logits, w_kept = want[job]
                    if kept != w_kept or any(not torch.equal(a, b) for a, b in zip(logits, w_logits)):
                        failures.append((seed, job))
            except BaseException as e:  # noqa: BLE001  (reported below with the thread's seed)
                failures.append((seed, repr(e)))

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert h.state is None and not h.busy


class _Interrupt:
    """A user's forward pre-hook on one decoder layer that raises ``KeyboardInterrupt`` on its n-th call."""

    def __init__(self, layer, at: int = 1):
        self.calls, self.at = 0, at
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("where", ["main", "worker"])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_keyboard_interrupt_releases_the_forward(where, call):
    model = build_tiny_llava("sdpa", vision_layers=2)
    inputs = make_batch(model, PROMPTS[2])
    with torch.no_grad():
        plain = model(**inputs).logits
    before = _snapshot(model)
    h = vtp.patch(model, POLICIES[1])
    with torch.no_grad():
        want = model(**inputs).logits
        want_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    layer = model.model.language_model.layers[3]
    trap = _Interrupt(layer, at=1 if call == "forward" else 3)  # generate: inside the second decode step

    def run():
        with torch.no_grad():
            if call == "forward":
                model(**inputs)
            else:
                model.generate(**inputs, max_new_tokens=4, do_sample=False)

    raised: list = []
    if where == "main":
        with pytest.raises(KeyboardInterrupt):
            run()
    else:
        def worker():
            try:
                run()
            except BaseException as e:  # noqa: BLE001
                raised.append(type(e))

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert raised == [KeyboardInterrupt]
    trap.handle.remove()
    assert h.state is None and not h.busy
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)  # usable again, same results
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), want_gen)
    h.unpatch()  # not refused
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and "forward" not in vars(model)


def _qwen_requests():
    from kit import tiny_qwen
    from vlm_tokenprune.eval.tiny_models import make_qwen_batch

    model = tiny_qwen("sdpa")
    a = make_qwen_batch(model, [[5, "img", 7]], seed=0, image_grids=[(2, 3)])
    b = make_qwen_batch(model, [[2, "img", 3, "img", 4]], seed=1, image_grids=[(4, 5), (3, 2)])  # other rope_deltas
    return model, a, b


def _qwen_decode(model, inputs, out, steps: int, own_positions: bool) -> torch.Tensor:
    """Greedy cached decode steps; ``own_positions``: each step passes this request's M-RoPE position ids (the
    prompt's ``get_rope_index`` deltas); else neither mask nor position ids (the model adds its stored deltas)."""
    mask, logits = inputs["attention_mask"], [out.logits[:, -1]]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        if own_positions:
            _, delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])
            pos = ((mask.long().cumsum(-1) - 1)[:, -1:] + delta)[None].expand(3, -1, -1)
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **_cache(out))
        else:
            out = model(input_ids=nxt, use_cache=True, **_cache(out))
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def _interleaving_changes(model, a, b, own_positions: bool) -> bool:
    """Whether request ``b``'s prefill between ``a``'s prefill and ``a``'s decode steps changes ``a``'s logits."""
    with torch.no_grad():
        alone = _qwen_decode(model, a, model(**a, use_cache=True), 3, own_positions)
        out = model(**a, use_cache=True)
        model(**b, use_cache=True)
        interleaved = _qwen_decode(model, a, out, 3, own_positions)
    return not torch.equal(alone, interleaved)


def test_qwen2_vl_interleaved_decode_matches_the_unpatched_model():
    """Issue reliability-2: Qwen2-VL keeps ``rope_deltas`` on the model (``model.model.rope_deltas``): every prefill
    writes it, and a cached forward given no ``position_ids`` adds it. Another request's prefill between a request's
    prefill and its decode steps (interleaved serving, or threads) then shifts that request's positions — in the
    UNPATCHED model. The patch adds no race of its own: an LLM-site policy changes logits under interleaving exactly
    when the unpatched model does; a pre-LLM policy's decode positions come from its own prompt's record (never
    shifted); decode steps that pass their own position ids (what ``generate()`` does from a fresh prompt) are
    never shifted, patched or not. Concurrent ``generate()`` on one patched Qwen2-VL equals the calls one by one."""
    model, a, b = _qwen_requests()
    assert not _interleaving_changes(model, a, b, own_positions=True)
    unpatched_shifts = _interleaving_changes(model, a, b, own_positions=False)
    assert unpatched_shifts  # transformers' shared state (if this changes, the claims in README change with it)
    with vtp.patch(model, "fastv:layer=2,keep=0.5"):
        assert _interleaving_changes(model, a, b, own_positions=False) == unpatched_shifts
        assert not _interleaving_changes(model, a, b, own_positions=True)
    for policy in ("fastv:layer=2,keep=0.5", "uniform:site=pre_llm,keep=0.5,positions=gaps+fastv:layer=2,keep=0.5"):
        with vtp.patch(model, policy):
            if "pre_llm" in policy:
                assert not _interleaving_changes(model, a, b, own_positions=False)
            _threads_generate_as_alone(model, (a, b))


def _threads_generate_as_alone(model, requests) -> None:
    with torch.no_grad():
        want = [model.generate(**r, max_new_tokens=4, do_sample=False) for r in requests]
    got, errors = {}, []

    def work(k: int) -> None:
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                got[k] = [model.generate(**requests[k], max_new_tokens=4, do_sample=False) for _ in range(3)]
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(torch.equal(g, want[k]) for k in got for g in got[k])
