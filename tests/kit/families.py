"""Checks every model family's test file makes the same way: hooks left on a model, keep-everything
policies == the unpatched model (forward and generate), ``unpatch()`` restores it, refusals leave no hook."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

import vlm_tokenprune as vtp

from .budget import kept_count


def n_hooks(model) -> int:
    """Forward (pre-)hooks on every module of ``model``."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@contextlib.contextmanager
def no_hook_left(model):
    """The block (typically a refused ``patch()``) leaves exactly the hooks ``model`` had."""
    hooks = n_hooks(model)
    yield
    assert n_hooks(model) == hooks


def k_of(keep: float, n: int) -> int:
    """Visual tokens ``keep=x`` keeps of ``n`` (the documented half-up rule, at least 1)."""
    return kept_count(("keep", keep), n)


def positions_of(inputs: dict, token_ids: Iterable[int], b: int = 0) -> list[int]:
    """Positions of row ``b`` whose token is one of ``token_ids`` (image / video placeholders)."""
    ids = inputs["input_ids"][b]
    hit = torch.zeros_like(ids, dtype=torch.bool)
    for t in token_ids:
        hit |= ids == t
    return hit.nonzero().flatten().tolist()


def assert_keep_all_exact(model, inputs: dict, policies: Iterable[str], generate_kw: dict) -> None:
    """Each keep-everything policy gives the unpatched model's logits and greedy tokens bit for bit."""
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, **generate_kw)
        for policy in policies:
            with vtp.patch(model, policy):
                assert torch.equal(model(**inputs).logits, ref), policy
                assert torch.equal(model.generate(**inputs, **generate_kw), ref_gen), policy


def assert_unpatch_restores(model, inputs: dict, policies: Iterable[str], *,
                            patched: Callable | None = None, unpatched: Callable | None = None) -> None:
    """Each policy shortens the sequence while patched; after ``unpatch()`` no hook is left and the logits are
    the unpatched model's exactly. ``patched(model)`` / ``unpatched(model)``: family-specific checks run right
    after ``patch()`` / ``unpatch()``."""
    hooks = n_hooks(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        for policy in policies:
            h = vtp.patch(model, policy)
            if patched is not None:
                patched(model)
            assert model(**inputs).logits.shape[1] < ref.shape[1], policy
            h.unpatch()
            if unpatched is not None:
                unpatched(model)
        assert n_hooks(model) == hooks
        assert torch.equal(model(**inputs).logits, ref)


def assert_pre_llm_merge_matches_oracle(model, inputs: dict, *, row_alone: Callable, prompt_embeds: Callable,
                                        visual_positions: Callable, atol: float) -> None:
    """AIM before the LLM (size-weighted: a fused token is the plain mean of its sources' embeddings), original
    positions of the representatives (``gaps``) == the language model run by hand on that sequence, per row of
    the padded batch. ``row_alone(inputs, b)``: row ``b`` unpadded; ``prompt_embeds(model, row)``: the oracle's
    LM input embeddings; ``visual_positions(row)``: the row's visual-token positions."""
    with vtp.patch(model, "aim_merge:keep=0.25,mode=size,positions=gaps") as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    assert any(len(src) > 1 for row in st.sources for src in row)  # real merges happened
    L = inputs["input_ids"].shape[1]
    for b in range(inputs["input_ids"].shape[0]):
        alone = row_alone(inputs, b)
        pad = L - alone["input_ids"].shape[1]
        emb = prompt_embeds(model, alone)[0]
        merged = {p - pad: [q - pad for q in src] for p, src in zip(st.kept_positions[b], st.sources[b])}
        vis = set(visual_positions(alone))
        kept = [p for p in range(emb.shape[0]) if p not in vis or p in merged]
        x = torch.stack([emb[merged[p]].mean(0) if p in merged else emb[p] for p in kept])
        with torch.no_grad():
            hs = model.model.language_model(inputs_embeds=x[None], position_ids=torch.tensor([kept])).last_hidden_state
            want = model.lm_head(hs)[0]
        torch.testing.assert_close(logits[b, -len(kept):], want, atol=atol, rtol=0, msg=f"row {b}")


def assert_explain_equals_trace(model, inputs: dict, policy, n_visual: int, kept: int) -> None:
    """For a one-row prompt with ``n_visual`` visual tokens of which the vision stage keeps ``kept``: ``policy_flops``
    (what ``explain`` prints) == ``trace_flops`` of the patched run for the LLM, tower and projector, and the
    projector counts every token (a packed tower's merger runs whole; the pruning is at the LLM input)."""
    from vlm_tokenprune.eval.flops import policy_flops, trace_flops, unpruned_flops

    with vtp.patch(model, policy) as h, torch.no_grad():
        model(**inputs, logits_to_keep=1)
        traced = trace_flops(model.config, h.last_trace())
    n_text = inputs["input_ids"].shape[1] - n_visual
    predicted = policy_flops(model.config, policy, n_text, n_visual)
    L = model.config.text_config.num_hidden_layers
    assert predicted["tokens_per_layer"] == traced["tokens_per_layer"] == [n_text + kept] * L
    for key in ("flops", "vision_flops", "projector_flops"):
        assert predicted[key] == traced[key], key
    whole = unpruned_flops(model.config, n_text, n_visual)
    assert predicted["vision_flops"] == whole["vision_flops"] and predicted["projector_flops"] == whole["projector_flops"]
