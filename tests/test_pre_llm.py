"""Pre-LLM stages (site ``pre_llm``) and AIM stage A (``aim_merge``, arXiv 2412.03248) == an
independent oracle (tests/reference/pre_llm_oracle.py): plain loops over tokens, one row at a time,
no KV cache. The library reduces the language model's input inside the real batched, left-padded
forward / generate, under every attention backend.
"""
from __future__ import annotations


import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH, cache_kwargs, left_padding, patched_prefill, tiny_llava, tiny_qwen
from kit.prompts import BATCHES
from reference import pre_llm_oracle as oracle
from vlm_tokenprune.errors import IncompatiblePolicyError, PolicyError
from vlm_tokenprune.eval.tiny_models import make_batch
from vlm_tokenprune.reduction import Reduction

ATOL = 1e-5


def _check_rows(model, inputs, logits, trace, keep, positions, merge=None):
    st = trace.stages[0]
    assert st.site == "pre_llm" and st.layer == 0
    for b in range(inputs["input_ids"].shape[0]):
        pad = left_padding(inputs, b)
        kept = [p - pad for p in st.kept_positions[b]] if merge is None else None
        x, pos, sources = oracle.reduce_row(model, inputs, b, keep, merge=merge, kept=kept)
        vis = [p for p in pos if p in sources]
        assert [p - pad for p in st.kept_positions[b]] == vis
        assert [[s - pad for s in src] for src in st.sources[b]] == [sources[p] for p in vis]
        want = oracle.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - len(pos):], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("mode,order,keep,positions", [
    ("mean", "spatial", 0.125, "repack"),
    ("size", "paper", 0.25, "gaps"),
    ("mean", "paper", 0.125, "gaps"),
    ("size", "spatial", 0.25, "repack"),
])
def test_aim_merge_matches_oracle(attn, batch, mode, order, keep, positions):
    model = tiny_llava(attn)
    inputs = make_batch(model, BATCHES[batch])
    logits, trace = patched_prefill(model, inputs, f"aim_merge:keep={keep},mode={mode},order={order},positions={positions}")
    _check_rows(model, inputs, logits, trace, keep, positions, merge={"mode": mode, "order": order})


def test_aim_merge_iterations_and_partition():
    """keep=0.25 -> 36 -> 18 -> 9 tokens per image; the sources of the kept tokens partition the image."""
    model = tiny_llava("sdpa")
    inputs = make_batch(model, BATCHES["1img+2img"])
    _, trace = patched_prefill(model, inputs, "aim_merge:keep=0.25")
    st = trace.stages[0]
    assert st.visual_before == [36, 72] and st.visual_after == [9, 18]
    for b in range(2):
        vis = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten().tolist()
        assert sorted(s for src in st.sources[b] for s in src) == vis
    assert trace.tokens_per_layer == [st.tokens_after] * 4


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("criterion", ["uniform", "random"])
@pytest.mark.parametrize("positions", ["gaps", "repack"])
def test_pre_llm_prune_matches_oracle(attn, criterion, positions):
    model = tiny_llava(attn)
    inputs = make_batch(model, BATCHES["2img+1img+text"])
    logits, trace = patched_prefill(model, inputs, f"{criterion}:site=pre_llm,keep=0.25,positions={positions}")
    assert trace.stages[0].visual_after == [18, 9, 0]
    assert all(src == [[p] for p in kp] for src, kp in zip(trace.stages[0].sources, trace.stages[0].kept_positions))
    _check_rows(model, inputs, logits, trace, 0.25, positions)


@pytest.mark.parametrize("attn", ["sdpa", FLASH])
@pytest.mark.parametrize("positions", ["gaps", "repack"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_continues_positions(attn, positions, use_cache):
    """Greedy generate() == the oracle's cache-free decoding: next position = original length (gaps)
    or kept length (repack)."""
    model = tiny_llava(attn)
    inputs = make_batch(model, BATCHES["1img+2img"])
    policy = f"aim_merge:keep=0.25,positions={positions}"
    with vtp.patch(model, policy), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache)
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        x, pos, _ = oracle.reduce_row(model, inputs, b, 0.25, merge={"mode": "mean", "order": "spatial"})
        n_orig = int(inputs["attention_mask"][b].sum())
        assert out[b, L:].tolist() == oracle.greedy(model, x, pos, positions, n_orig, 4)


def test_plain_decode_step_without_position_ids():
    """A manual forward on the returned cache continues like generate() (positions from the cache length)."""
    model = tiny_llava("eager")
    inputs = make_batch(model, [[5, "img", 7]])
    nxt = torch.tensor([[9]])
    for positions in ("gaps", "repack"):
        with vtp.patch(model, f"aim_merge:keep=0.25,positions={positions}"), torch.no_grad():
            pre = model(**inputs, use_cache=True)
            step = model(input_ids=nxt, **cache_kwargs(pre)).logits[0, -1]
        x, pos, _ = oracle.reduce_row(model, inputs, 0, 0.25, merge={"mode": "mean", "order": "spatial"})
        with torch.no_grad():
            e = model.get_input_embeddings()(nxt[0])
        p = (pos if positions == "gaps" else list(range(len(pos)))) + [len(inputs["input_ids"][0]) if positions == "gaps" else len(pos)]
        want = oracle._logits(model, torch.cat([x, e]), p)[-1]
        torch.testing.assert_close(step, want, atol=ATOL, rtol=0)


def test_unpatch_is_exact_and_text_only_passes_through():
    model = tiny_llava("sdpa")
    inputs = make_batch(model, BATCHES["1img+2img"])
    text = make_batch(model, [[6]])
    with torch.no_grad():
        before, before_text = model(**inputs).logits, model(**text).logits
        h = vtp.patch(model, "aim_merge")
        assert "pre_llm" in h.describe() and "LlamaModel: forward pre-hook" in h.describe()
        assert torch.equal(model(**text).logits, before_text)
        assert model(**inputs).logits.shape[1] < before.shape[1]
        h.unpatch()
        assert torch.equal(model(**inputs).logits, before)
    assert not any(getattr(hk, "__vtp__", False) for m in model.modules()
                   for hk in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))


def test_keep_everything_is_exact():
    model = tiny_llava("eager")
    inputs = make_batch(model, BATCHES["1img+2img"])
    with torch.no_grad():
        before = model(**inputs).logits
        logits, trace = patched_prefill(model, inputs, "aim_merge:keep=1.0")
    assert torch.equal(logits, before) and trace.stages[0].visual_after == [36, 72]


@pytest.mark.parametrize("text,field", [
    ("fastv:site=pre_llm", "stages[0].site"),
    ("aim_merge:layer=2", "stages[0].layer"),
    ("aim_merge:positions=dense", "stages[0].positions"),
    ("aim_merge:mode=max", "stages[0].mode"),
    ("aim_merge:order=random", "stages[0].order"),
    ("aim_merge:site=llm,layer=2", "stages[0].site"),
    ("aim_merge+fastv", "stages[1].keep"),  # fastv keeps 0.5 of the original after aim_merge kept 0.125
    ("fastv+aim_merge", "stages[1].site"),  # a pre_llm stage comes before the LLM stages
    ("aim_merge+uniform:site=pre_llm,keep=0.1", "stages[1].site"),  # one pre_llm stage
    ("fastv:positions=dense", "stages[0].positions"),  # LLM stages take gaps | repack
    ("uniform:site=pre_llm,op=merge", "stages[0].op"),
])
def test_policy_errors_name_the_field(text, field):
    with pytest.raises(PolicyError) as e:
        vtp.Policy.parse(text)
    assert e.value.field == field, str(e.value)


def test_round_trip_and_dict():
    for text in ("aim_merge", "aim_merge:keep=0.25,mode=size,order=paper,positions=gaps", "uniform:site=pre_llm,keep=0.5"):
        pol = vtp.Policy.parse(text)
        assert vtp.Policy.parse(pol.to_string()) == pol
        assert vtp.Policy.from_dict(pol.to_dict()) == pol
    d = vtp.Policy.parse("aim_merge").to_dict()["stages"][0]
    assert d["site"] == "pre_llm" and d["op"] == "merge" and d["layer"] is None
    assert d["params"] == {"mode": "mean", "order": "spatial", "positions": "repack"}


def test_repack_refused_on_qwen2_vl():
    model = tiny_qwen()
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(model, "aim_merge")  # AIM's preset repacks; M-RoPE has no contiguous renumbering
    assert e.value.field == "stages[0].positions" and "allowed: gaps" in str(e.value)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_reduction_algebra():
    keep = torch.tensor([[True, False, True, True], [False, False, True, False]])
    r = Reduction.prune(keep)
    x = torch.randn(2, 4, 3)
    assert torch.equal(r.fuse(x)[0], x[0, [0, 2, 3]]) and torch.equal(r.fuse(x)[1, -1], x[1, 2])
    assert r.ok.tolist() == [[True] * 3, [False, False, True]]
    m = Reduction.from_targets(torch.tensor([[0, 2, 2, 3]]), weight="size")
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    torch.testing.assert_close(m.fuse(x[:1], size)[0, 1], (x[0, 1] + 3 * x[0, 2]) / 4)
    assert m.add(size).tolist() == [[1.0, 4.0, 1.0]] and m.route(torch.arange(4)[None]).tolist() == [[0, 1, 1, 2]]
    p = Reduction.from_targets(torch.tensor([[0, 1, 2, 3]]), key=torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
    assert p.rep.tolist() == [[0, 2, 3, 1]] and p.dst.tolist() == [[0, 3, 1, 2]]


def test_flops_prediction_matches_trace():
    from vlm_tokenprune.eval.flops import policy_flops, trace_flops

    model = tiny_llava("sdpa")
    inputs = make_batch(model, [[5, "img", 7]])
    _, trace = patched_prefill(model, inputs, "aim_merge:keep=0.25")
    n_vis, n_text = 36, inputs["input_ids"].shape[1] - 36
    pred = policy_flops(model.config.text_config, "aim_merge:keep=0.25", n_text, n_vis)
    got = trace_flops(model.config.text_config, trace, policy="aim_merge:keep=0.25")
    assert pred["tokens_per_layer"] == trace.tokens_per_layer == [n_text + 9] * 4
    assert got["flops"] == pred["flops"] and got["baseline_flops"] == pred["baseline_flops"] and got["ratio"] < 0.5


@pytest.mark.parametrize("positions", ["gaps", "repack"])
def test_generate_after_a_prompt_ending_in_an_image(positions):
    """The last prompt token is visual (may be merged away): decoding still continues at the original
    length (gaps) or the kept length (repack)."""
    model = tiny_llava("sdpa")
    inputs = make_batch(model, [[5, "img"], [2, "img", 3, "img"]])
    with vtp.patch(model, f"aim_merge:keep=0.125,positions={positions}"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        x, pos, _ = oracle.reduce_row(model, inputs, b, 0.125, merge={"mode": "mean", "order": "spatial"})
        assert out[b, L:].tolist() == oracle.greedy(model, x, pos, positions, int(inputs["attention_mask"][b].sum()), 3)


def test_oracle_distinguishes_settings():
    """Each option changes the oracle's result, so the comparisons above can fail."""
    model = tiny_llava("eager")
    inputs = make_batch(model, [[5, "img", 7]])
    runs = {}
    for mode in ("mean", "size"):
        for order in ("spatial", "paper"):
            x, pos, src = oracle.reduce_row(model, inputs, 0, 0.125, merge={"mode": mode, "order": order})
            runs[mode, order] = (x, pos, src)
    assert not torch.allclose(runs["mean", "spatial"][0], runs["size", "spatial"][0])
    assert runs["mean", "spatial"][1] != runs["mean", "paper"][1]
    x, pos, _ = runs["mean", "spatial"]
    assert not torch.allclose(oracle.row_logits(model, x, pos, "gaps"), oracle.row_logits(model, x, pos, "repack"))
