"""Pre-LLM stages on Qwen2-VL / Qwen2.5-VL == the oracle (tests/reference/pre_llm_oracle.py, ``qwen_*``):
``inputs_embeds`` and the 3-D M-RoPE ids reduced (each kept token keeps its original 3-D position),
decoding continues at the unpatched model's next position. Hand-built inputs (tests/test_qwen2_vl.py
style): images of different sizes and a video, a left-padded batch of two, every backend, both versions.
"""
from __future__ import annotations


import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH, cache_kwargs, left_padding, row_alone, tiny_qwen
from reference import pre_llm_oracle as oracle
from vlm_tokenprune.errors import IncompatiblePolicyError
from vlm_tokenprune.eval.tiny_models import (
    IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_END_ID, QWEN_VISION_START_ID,
    make_qwen_batch,
)

ATOL = 1e-5
ROWS = [[3, "img", 2, "vid", 4], [2, "img", 1, "img", 3]]  # row 1 shorter: left padded
IMAGES = [(2, 3), (3, 2), (1, 4)]  # (h, w) in LLM tokens
VIDEOS = [(2, 2, 3)]  # (t, h, w): two frames, each its own grid
MERGE = {"mode": "mean", "order": "spatial"}
SPECIAL = (IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID)


def tiny(attn: str, version: str = "2"):
    return tiny_qwen(attn, version)


def batch(model) -> dict:
    return make_qwen_batch(model, ROWS, image_grids=IMAGES, video_grids=VIDEOS)


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("policy,merge", [
    ("aim_merge:keep=0.25,positions=gaps", MERGE),
    ("aim_merge:keep=0.5,mode=size,order=paper,positions=gaps", {"mode": "size", "order": "paper"}),
    ("uniform:site=pre_llm,keep=0.5", None),
])
def test_pre_llm_matches_oracle(version, attn, policy, merge):
    model = tiny(attn, version)
    inputs = batch(model)
    with vtp.patch(model, policy) as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    keep = float(policy.split("keep=")[1].split(",")[0])
    for b in range(2):
        pad = left_padding(inputs, b)
        kept = None if merge is not None else [p - pad for p in st.kept_positions[b]]
        x, pos3, pos, sources, _ = oracle.qwen_reduce(model, row_alone(inputs, ROWS, b), keep, merge=merge, kept=kept)
        vis = [p for p in pos if p in sources]
        assert [p - pad for p in st.kept_positions[b]] == vis
        assert [[s - pad for s in src] for src in st.sources[b]] == [sources[p] for p in vis]
        want = oracle.qwen_logits(model, x, pos3)
        torch.testing.assert_close(logits[b, logits.shape[1] - len(pos):], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("attn", ["sdpa", FLASH])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_oracle(version, attn, use_cache):
    """Greedy generate(): decoding continues at the unpatched model's next 3-D position (rope_deltas)."""
    model = tiny(attn, version)
    inputs = batch(model)
    with vtp.patch(model, "aim_merge:keep=0.25,positions=gaps"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache, suppress_tokens=list(SPECIAL))
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        x, pos3, _, _, nxt = oracle.qwen_reduce(model, row_alone(inputs, ROWS, b), 0.25, merge=MERGE)
        assert out[b, L:].tolist() == oracle.qwen_greedy(model, x, pos3, nxt, 4, SPECIAL)


@pytest.mark.parametrize("with_mask", [True, False])
def test_cached_decode_step_logits(with_mask):
    """A manual decode step on the returned cache, with a grown 2-D mask or none (the model then counts the
    cache, which holds the reduced prompt): the new token sits at the unreduced prompt's next position."""
    model = tiny("sdpa")
    inputs = row_alone(batch(model), ROWS, 0)
    nxt = torch.tensor([[9]])
    extra = {"attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)} if with_mask else {}
    with vtp.patch(model, "aim_merge:keep=0.25,positions=gaps"), torch.no_grad():
        pre = model(**inputs, use_cache=True)
        step = model(input_ids=nxt, **cache_kwargs(pre), **extra).logits[0, -1]
    x, pos3, _, _, n = oracle.qwen_reduce(model, inputs, 0.25, merge=MERGE)
    with torch.no_grad():
        e = model.get_input_embeddings()(nxt[0])
    want = oracle.qwen_logits(model, torch.cat([x, e]), torch.cat([pos3, torch.full((3, 1), n)], 1))[-1]
    torch.testing.assert_close(step, want, atol=ATOL, rtol=0)
    wrong = oracle.qwen_logits(model, torch.cat([x, e]), torch.cat([pos3, torch.full((3, 1), x.shape[0])], 1))[-1]
    assert not torch.allclose(step, wrong, atol=1e-4)  # the cache length would be the wrong position


def test_keep_everything_and_unpatch_are_exact():
    model = tiny("eager", "2.5")
    inputs = batch(model)
    with torch.no_grad():
        before = model(**inputs).logits
        with vtp.patch(model, "aim_merge:keep=1.0,positions=gaps+uniform:layer=2,keep=1.0"):
            assert torch.equal(model(**inputs).logits, before)
        with vtp.patch(model, "aim_merge:keep=0.25,positions=gaps") as h:
            assert model(**inputs).logits.shape[1] < before.shape[1]
            assert "Qwen2_5_VLTextModel: forward pre-hook" in h.describe()
        assert torch.equal(model(**inputs).logits, before)


def test_oracle_distinguishes_positions():
    """Gapped 3-D positions differ from a text-like renumbering, so the logits comparison can fail."""
    model = tiny("eager")
    inputs = row_alone(batch(model), ROWS, 0)
    x, pos3, _, _, _ = oracle.qwen_reduce(model, inputs, 0.25, merge=MERGE)
    flat = torch.arange(x.shape[0]).expand(3, -1)
    assert not torch.allclose(oracle.qwen_logits(model, x, pos3), oracle.qwen_logits(model, x, flat), atol=1e-4)


def test_repack_is_refused_naming_the_field():
    model = tiny("sdpa")
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(model, "uniform:site=pre_llm,keep=0.5,positions=repack")
    assert e.value.field == "stages[0].positions" and "allowed: gaps" in str(e.value)


@pytest.mark.parametrize("attn", BACKENDS)
def test_aim_merge_then_fastv_matches_oracle(attn):
    """Stage A + FastV at layer 2 on M-RoPE: FastV (fastv_qwen_oracle plumbing) scores the merged row at
    its gapped 3-D positions; keep is a fraction of the ORIGINAL visual tokens."""
    from reference import fastv_qwen_oracle as fq

    model = tiny(attn)
    inputs = batch(model)
    with vtp.patch(model, "aim_merge:keep=0.5,positions=gaps+fastv:layer=2,keep=0.25") as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[1]
    eager = fq.eager_copy(model)
    lm = eager.model.language_model
    for b in range(2):
        pad = left_padding(inputs, b)
        x, pos3, pos, sources, _ = oracle.qwen_reduce(model, row_alone(inputs, ROWS, b), 0.5, merge=MERGE)
        n_orig = sum(len(s) for s in sources.values())
        k = max(1, int(0.25 * n_orig + 0.5))
        with torch.no_grad():
            hid = fq.run_layers(model, eager, x[None], pos3, range(1))
            att = fq.last_token_attention(model, eager, 1, hid, pos3).mean(0)
            vis = [i for i, p in enumerate(pos) if p in sources]
            slots = sorted(sorted(vis, key=lambda i: (-float(att[i]), i))[:k])
            keep = [i for i in range(len(pos)) if i not in vis or i in slots]
            hid = fq.run_layers(model, eager, x[None], pos3, range(2))[:, keep]
            want = eager.lm_head(lm.norm(fq.run_layers(model, eager, hid, pos3[:, keep], range(2, len(lm.layers)))))[0]
        assert [p - pad for p in st.kept_positions[b]] == [pos[i] for i in slots]
        torch.testing.assert_close(logits[b, logits.shape[1] - len(keep):], want, atol=ATOL, rtol=0)
