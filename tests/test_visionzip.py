"""VisionZip (arXiv 2412.04467) == the paper's dominant + contextual tokens (plain loops) and the authors'
tensor algorithm (visionzip 0.1.3, re-written in tests/reference/visionzip_oracle.py); at the CLIP feature
layer inside the real batched, left-padded forward / generate == the oracle tower and the LLM on the kept rows."""
from __future__ import annotations

import functools

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH
from reference import flowcut_vit_oracle as fc
from reference import pre_llm_oracle as pl
from reference import visionzip_oracle as oracle
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch
from vlm_tokenprune.methods.visionzip import contextual_merge, split_counts
from vlm_tokenprune.registry import CRITERIA

torch.set_num_threads(1)
ROWS = [[5, "img", 7], [2, "img", 3, "img", 4]]


@functools.lru_cache(maxsize=None)
def tiny(attn: str):
    return build_tiny_llava(attn, vision_layers=4)


def _random_layer(seed: int, T: int = 17, H: int = 4, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H * d, generator=g)
    probs = torch.softmax(torch.randn(H, T, T, generator=g), -1)
    k = torch.randn(T, H, d, generator=g)
    return x, probs, k


@pytest.mark.parametrize("D,C", [(5, 2), (8, 3), (4, 9)])  # the last: C > N_r / 2, step = 1
def test_zip_equals_paper_and_official(D, C):
    x, probs, k = _random_layer(D * 10 + C)
    feats, idx, sources = oracle.paper_zip(x, probs, k, D, C)
    official = oracle.official_zip(x[None], probs[None], k.mean(1)[None], D, C)[0]
    torch.testing.assert_close(feats, official, atol=1e-6, rtol=0)
    # the library's pieces: dominant by the head-summed CLS row, then the contextual merge
    a = probs[:, 0, 1:].sum(0)
    dom = sorted(int(i) + 1 for i in torch.sort(a, descending=True, stable=True).indices[:D])
    assert dom == idx[1: 1 + D]
    rest = [t for t in range(1, x.shape[0]) if t not in set(dom)]
    targets, assign, values = contextual_merge(k.mean(1), x, rest, C)
    assert targets == idx[1 + D:]
    torch.testing.assert_close(values, feats[1 + D:], atol=1e-6, rtol=0)
    groups = [sorted(t for t, g in zip(rest, assign.tolist()) if g == i) for i in range(C)]
    assert groups == sources[1 + D:]


def test_official_splits():
    assert [split_counts(n, 10 / 64) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def _check(model, inputs, T, positions):
    policy = {"criterion": "visionzip", "site": "vision", "tokens": T, "positions": positions}
    with vtp.patch(model, {"stages": [policy]}) as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    n_dom, n_ctx = split_counts(T, 10 / 64)
    feats, kept, sources = oracle.encode(model, fc.all_crops(model, inputs), n_dom, n_ctx)
    for b, (x, pos, src) in enumerate(fc.reduced_rows(model, inputs, feats, kept, sources)):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        assert [q - pad for q in st.kept_positions[b]] == sorted(src), f"row {b}"
        assert [[s - pad for s in g] for g in st.sources[b]] == [src[p] for p in sorted(src)]
        want = pl.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - want.shape[0]:], want, atol=1e-5, rtol=0)
    return st


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("positions", ["repack", "gaps"])
def test_prefill_matches_oracle(attn, positions):
    model = tiny(attn)
    st = _check(model, make_batch(model, ROWS), 12, positions)  # 10 dominant + 2 contextual per image
    assert st.visual_after == [12, 24]


def test_step_one_when_many_contextual():
    model = tiny("eager")
    _check(model, make_batch(model, ROWS, seed=3), 30, "repack")  # C = 5 of N_r = 11 remaining


@pytest.mark.parametrize("attn", ["sdpa", FLASH])
def test_generate_with_cache_matches_oracle(attn):
    model = tiny(attn)
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "visionzip:tokens=12"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    L = inputs["input_ids"].shape[1]
    feats, kept, sources = oracle.encode(model, fc.all_crops(model, inputs), 10, 2)
    for b, (x, pos, _) in enumerate(fc.reduced_rows(model, inputs, feats, kept, sources)):
        n = int(inputs["attention_mask"][b].sum())
        assert out[b, L:].tolist() == pl.greedy(model, x, pos, "repack", n, 4), f"row {b}"


def test_presets_and_fixed_count_flag():
    assert CRITERIA.get("visionzip").image_only_fixed_count is True
    assert vtp.Policy.parse("visionzip_192").stages[0].budget.keep == 192 / 576
