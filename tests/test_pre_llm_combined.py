"""A pre_llm stage followed by LLM stages (AIM stage A + a FastV stage B, pre-LLM prune + FastV,
structural ops) == an independent oracle composing the two reductions
(tests/reference/pre_llm_fastv_oracle.py): kept positions in original coordinates, merge sources,
logits, and greedy generate() with and without the KV cache, on a left-padded batch of two rows
with one and two images, under every attention backend.
"""
from __future__ import annotations

import math

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH, cache_kwargs, left_padding, patched_prefill, tiny_llava
from reference import pre_llm_fastv_oracle as oracle
from reference import pre_llm_oracle
from reference import structural_oracle
from vlm_tokenprune.eval.tiny_models import make_batch

ATOL = 1e-5
ROWS = [[5, "img", 7], [2, "img", 3, "img", 4]]  # 36 and 72 visual tokens; row 0 left-padded
MERGE = {"mode": "mean", "order": "spatial"}


def _check(model, inputs, logits, trace, *, keep1, layer, keep2, positions, merge=None, of="original", rows=None):
    for b in rows if rows is not None else range(inputs["input_ids"].shape[0]):
        pad = left_padding(inputs, b)
        kept = None if merge is not None else [p - pad for p in trace.stages[0].kept_positions[b]]
        want_pos, want_src, want = oracle.row(model, inputs, b, keep1=keep1, layer=layer, keep2=keep2,
                                              positions=positions, merge=merge, kept=kept, of=of)
        st = trace.stages[1]
        assert [p - pad for p in st.kept_positions[b]] == want_pos
        assert [[s - pad for s in src] for src in st.sources[b]] == want_src
        torch.testing.assert_close(logits[b, logits.shape[1] - want.shape[0]:], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("positions", ["gaps", "repack"])
def test_aim_merge_then_fastv_matches_oracle(attn, positions):
    """AIM's stage A (keep 25 %) + FastV at layer 2 keeping 12.5 % of the ORIGINAL visual tokens."""
    model = tiny_llava(attn)
    inputs = make_batch(model, ROWS)
    logits, trace = patched_prefill(model, inputs, f"aim_merge:keep=0.25,positions={positions}+fastv:layer=2,keep=0.125")
    assert [s.site for s in trace.stages] == ["pre_llm", "llm"]
    assert trace.stages[0].visual_after == [9, 18] and trace.stages[1].visual_after == [5, 9]  # of the original 36 / 72
    _check(model, inputs, logits, trace, keep1=0.25, layer=2, keep2=0.125, positions=positions, merge=MERGE)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("criterion,positions,keep2,of", [
    ("uniform", "gaps", 0.25, "original"),
    ("random", "repack", 0.5, "current"),  # of=current: half of what the pre_llm stage left
])
def test_pre_llm_prune_then_fastv_matches_oracle(attn, criterion, positions, keep2, of):
    """A pre-LLM prune + FastV, with a text-only third row (no visual token: passes through)."""
    model = tiny_llava(attn)
    inputs = make_batch(model, [[1, "img", "img", 5], [20, "img", 1], [12]])
    budget2 = f"keep={keep2}" + (",of=current" if of == "current" else "")
    logits, trace = patched_prefill(model, inputs, f"{criterion}:site=pre_llm,keep=0.5,positions={positions}+fastv:layer=2,{budget2}")
    n0 = [72, 36, 0]
    k1 = [max(1, math.floor(0.5 * n + 0.5)) if n else 0 for n in n0]
    k2 = [max(1, math.floor(keep2 * (n if of == "original" else k) + 0.5)) if n else 0 for n, k in zip(n0, k1)]
    assert trace.stages[0].visual_after == k1 and trace.stages[1].visual_after == k2
    assert trace.stages[1].sources[0] == [[p] for p in trace.stages[1].kept_positions[0]]  # a prune: itself
    assert trace.stages[1].kept_positions[2] == []
    _check(model, inputs, logits, trace, keep1=0.5, layer=2, keep2=keep2, positions=positions, of=of, rows=(0, 1))


@pytest.mark.parametrize("attn", ["sdpa", FLASH])
@pytest.mark.parametrize("positions", ["gaps", "repack"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_oracle(attn, positions, use_cache):
    """Cached generate(): FastV's choice is made once on the prompt; use_cache=False re-scores every step."""
    model = tiny_llava(attn)
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, f"aim_merge:keep=0.25,positions={positions}+fastv:layer=2,keep=0.125"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache)
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        want = oracle.greedy(model, inputs, b, keep1=0.25, layer=2, keep2=0.125, positions=positions, steps=4,
                             rescore=not use_cache, merge=MERGE)
        assert out[b, L:].tolist() == want


def test_oracle_distinguishes_settings():
    """Gaps vs repack and FastV's choice change the oracle's logits, so the comparisons above can fail."""
    model = tiny_llava("eager")
    inputs = make_batch(model, [[5, "img", 7]])
    a = oracle.row(model, inputs, 0, keep1=0.25, layer=2, keep2=0.125, positions="gaps", merge=MERGE)
    b = oracle.row(model, inputs, 0, keep1=0.25, layer=2, keep2=0.125, positions="repack", merge=MERGE)
    c = oracle.row(model, inputs, 0, keep1=0.25, layer=3, keep2=0.125, positions="gaps", merge=MERGE)
    assert not torch.allclose(a[2], b[2]) and not torch.allclose(a[2], c[2])
    # keep=0.125 of the ORIGINAL 36 (5 tokens), not of the 9 left (1 token)
    assert len(a[0]) == 5 and len(oracle.row(model, inputs, 0, keep1=0.25, layer=2, keep2=0.125, positions="gaps",
                                             merge=MERGE, of="current")[0]) == 1


def test_three_stages_trace_in_original_coordinates():
    """aim_merge + two LLM stages: every stage's kept positions are original ones, nested, with merge sources."""
    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS)
    _, trace = patched_prefill(model, inputs, "aim_merge:keep=0.5+fastv:layer=1,keep=0.25+fastv:layer=3,keep=0.125")
    assert [s.layer for s in trace.stages] == [0, 1, 3]
    assert [s.visual_after for s in trace.stages] == [[18, 36], [9, 18], [5, 9]]
    assert trace.tokens_per_layer[0] == trace.stages[0].tokens_after
    for b in range(2):
        for prev, cur in zip(trace.stages, trace.stages[1:]):
            assert set(cur.kept_positions[b]) <= set(prev.kept_positions[b])
            src = dict(zip(prev.kept_positions[b], prev.sources[b]))
            assert cur.sources[b] == [src[p] for p in cur.kept_positions[b]]


@pytest.mark.parametrize("structural,ops", [
    ("skip_layers:layers=2", {"skip_all": {2}}),
    ("skip_layers:layers=1;3,scope=visual", {"skip_visual": {1, 3}}),
    ("ffn_cut", {"ffn": {j: 64 for j in range(4)}}),  # tiny model: MLP 128 -> visual rows use 64 channels
])
def test_structural_after_pre_llm_matches_oracle(structural, ops):
    """Structural ops see the reduced sequence (its visual rows are the merged tokens): prefill logits and
    cached greedy generate() == the masked structural oracle run on the pre_llm oracle's reduced rows."""
    model = tiny_llava("eager")
    inputs = make_batch(model, ROWS)
    policy = f"aim_merge:keep=0.25,positions=gaps+{structural}"
    logits, _ = patched_prefill(model, inputs, policy)
    with vtp.patch(model, policy), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    for b in range(2):
        x, pos, sources = pre_llm_oracle.reduce_row(model, inputs, b, 0.25, merge=MERGE)
        visual = torch.tensor([[p in sources for p in pos]])
        with torch.no_grad():
            want = structural_oracle.forward(model, x[None], torch.tensor([pos]), torch.ones_like(visual), visual, ops=ops)[0]
        torch.testing.assert_close(logits[b, logits.shape[1] - len(pos):], want, atol=ATOL, rtol=0)
        nxt, toks = int(inputs["attention_mask"][b].sum()), []
        for _ in range(3):  # cache-free greedy: the generated tokens are text
            with torch.no_grad():
                tok = int(structural_oracle.forward(model, x[None], torch.tensor([pos]), torch.ones_like(visual),
                                                    visual, ops=ops)[0, -1].argmax())
                x = torch.cat([x, model.get_input_embeddings()(torch.tensor([tok]))])
            toks.append(tok)
            pos, visual = pos + [nxt], torch.cat([visual, torch.zeros(1, 1, dtype=torch.bool)], 1)
            nxt += 1
        assert gen[b].tolist() == toks


def test_keep_everything_and_unpatch_are_exact():
    model = tiny_llava("eager")
    inputs = make_batch(model, ROWS)
    with torch.no_grad():
        before = model(**inputs).logits
        logits, trace = patched_prefill(model, inputs, "aim_merge:keep=1.0+fastv:layer=2,keep=1.0")
        assert torch.equal(logits, before) and trace.stages[1].visual_after == [36, 72]
        with vtp.patch(model, "aim_merge:keep=0.25+fastv:layer=2,keep=0.125") as h:
            assert model(**inputs).logits.shape[1] < before.shape[1]
            text = h.describe()
        assert torch.equal(model(**inputs).logits, before)
    assert "stage 0: aim_merge" in text and "stage 1: fastv" in text and "LlamaModel: forward pre-hook" in text
    assert "among the tokens the pre_llm stage left" in text


def test_flops_prediction_matches_trace_and_explain(capsys):
    from vlm_tokenprune.cli import main
    from vlm_tokenprune.eval.flops import policy_flops, trace_flops

    model = tiny_llava("sdpa")
    inputs = make_batch(model, [[5, "img", 7]])
    policy = "aim_merge:keep=0.25+fastv:layer=2,keep=0.125"
    _, trace = patched_prefill(model, inputs, policy)
    n_text = inputs["input_ids"].shape[1] - 36
    pred = policy_flops(model.config.text_config, policy, n_text, 36)
    assert pred["tokens_per_layer"] == trace.tokens_per_layer == [n_text + 9] * 2 + [n_text + 5] * 2
    assert trace_flops(model.config.text_config, trace, policy=policy)["flops"] == pred["flops"]
    assert main(["explain", policy, "--model-config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "stage 0: aim_merge" in out and "stage 1: fastv:layer=2,keep=0.125" in out
    assert "among the tokens the pre_llm stage left" in out


def test_budget_errors_name_the_field():
    from vlm_tokenprune.errors import InputError, PolicyError

    with pytest.raises(PolicyError) as e:
        vtp.Policy.parse("aim_merge:keep=0.25+fastv:layer=2,keep=0.5")
    assert e.value.field == "stages[1].keep" and "of=current" in str(e.value)
    model = tiny_llava("sdpa")
    inputs = make_batch(model, [[5, "img", 7]])
    with pytest.raises(InputError) as e, vtp.patch(model, "aim_merge:keep=0.25+fastv:layer=2,tokens=20", strict=True), torch.no_grad():
        model(**inputs)  # 9 tokens left after the merge
    assert e.value.field == "stages[1].tokens"


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("positions", ["gaps", "repack"])
def test_cached_decode_step_logits_match_oracle(attn, positions):
    """One cached decode step after the reduced, pruned prompt (the 2-D mask grows by one column, as in
    generate()): its logits == the oracle's cache-free forward with the new token at the next position."""
    model = tiny_llava(attn)
    inputs = make_batch(model, ROWS)
    nxt = torch.tensor([[9], [11]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with vtp.patch(model, f"aim_merge:keep=0.25,positions={positions}+fastv:layer=2,keep=0.125"), torch.no_grad():
        pre = model(**inputs, use_cache=True)
        step = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(pre)).logits[:, -1]
    eager = oracle.fv.eager_copy(model)
    for b in range(2):
        x, pos, sources = pre_llm_oracle.reduce_row(model, inputs, b, 0.25, merge=MERGE)
        visual = [p in sources for p in pos]
        p = oracle.prompt_positions(pos, positions)
        slots = oracle.fastv_slots(eager, x, p, visual, 2, oracle.budget(0.125, 36 * (b + 1), sum(visual)))
        with torch.no_grad():
            e = model.get_input_embeddings()(nxt[b])
        after = int(inputs["attention_mask"][b].sum()) if positions == "gaps" else len(pos)
        want = oracle.logits(eager, torch.cat([x, e]), p + [after], visual + [False], 2, slots)[-1]
        torch.testing.assert_close(step[b], want, atol=ATOL, rtol=0)
