"""VisPruner (arXiv 2412.01818) == the paper's selection (plain loops) and the official algorithm
(tests/reference/vispruner_oracle.py); at the CLIP feature layer inside the real batched, left-padded
forward / generate == the oracle tower run layer by layer and the LLM run on the kept rows."""
from __future__ import annotations

import functools

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH
from reference import flowcut_vit_oracle as fc
from reference import pre_llm_oracle as pl
from reference import vispruner_oracle as oracle
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch
from vlm_tokenprune.methods.vispruner import select_patches
from vlm_tokenprune.registry import CRITERIA

torch.set_num_threads(1)
ROWS = [[5, "img", 7], [2, "img", 3, "img", 4]]


@functools.lru_cache(maxsize=None)
def tiny(attn: str, next: bool = False):
    if next:
        return build_tiny_llava(attn, vision_layers=4, next=True, image_size=16)
    return build_tiny_llava(attn, vision_layers=4)


@pytest.mark.parametrize("T,r", [(8, 0.5), (6, 1.0), (10, 0.0), (4, 0.75)])
def test_selection_equals_paper_and_official(T, r):
    g = torch.Generator().manual_seed(T)
    attn = torch.softmax(torch.randn(4, 16, generator=g), -1)
    feats = torch.randn(16, 8, generator=g)
    feats[9] = feats[2] * 3.0  # a duplicate pair
    want = oracle.paper_select((attn.mean(0)).tolist(), feats, T, r)
    assert want == oracle.official_mask(attn, feats, T, r).nonzero().flatten().tolist()
    f = feats / feats.norm(dim=-1, keepdim=True)
    assert sorted(select_patches(attn.mean(0), f, T, r)) == want and len(want) == T


def test_a_duplicate_is_dropped():
    """Six tokens, two identical ones, no important tokens, keep 5: one of the duplicates goes."""
    feats = torch.eye(6)
    feats[4] = feats[1]
    attn = torch.tensor([[0.3, 0.25, 0.2, 0.1, 0.1, 0.05]])
    kept = oracle.paper_select(attn.mean(0).tolist(), feats, 5, 0.0)
    assert len({1, 4} & set(kept)) == 1 and sorted(select_patches(attn.mean(0), feats, 5, 0.0)) == kept


def _check(model, inputs, T, r, positions):
    policy = {"criterion": "vispruner", "site": "vision", "tokens": T, "important_ratio": r, "positions": positions}
    with vtp.patch(model, {"stages": [policy]}) as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    feats, kept = oracle.encode(model, fc.all_crops(model, inputs), T, r)
    for b, (x, pos, sources) in enumerate(fc.reduced_rows(model, inputs, feats, kept)):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        assert [q - pad for q in st.kept_positions[b]] == sorted(sources), f"row {b}"
        want = pl.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - want.shape[0]:], want, atol=1e-5, rtol=0)
    return st


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("positions", ["repack", "gaps"])
def test_prefill_matches_oracle(attn, positions):
    model = tiny(attn)
    st = _check(model, make_batch(model, ROWS), 9, 0.5, positions)
    assert st.visual_after == [9, 18]


def test_other_splits():
    model = tiny("eager")
    inputs = make_batch(model, ROWS, seed=3)
    _check(model, inputs, 6, 1.0, "repack")
    _check(model, inputs, 12, 0.25, "repack")


@pytest.mark.parametrize("attn", ["sdpa", FLASH])
def test_generate_with_cache_matches_oracle(attn):
    model = tiny(attn)
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "vispruner:tokens=9"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    L = inputs["input_ids"].shape[1]
    feats, kept = oracle.encode(model, fc.all_crops(model, inputs), 9, 0.5)
    for b, (x, pos, _) in enumerate(fc.reduced_rows(model, inputs, feats, kept)):
        n = int(inputs["attention_mask"][b].sum())
        assert out[b, L:].tolist() == pl.greedy(model, x, pos, "repack", n, 4), f"row {b}"


def test_llava_next_every_crop_keeps_its_budget():
    model = tiny("sdpa", next=True)
    inputs = make_batch(model, [[1, "img", 5]], image_sizes=[[20, 36]])
    with vtp.patch(model, "vispruner:tokens=2") as h, torch.no_grad():
        model(**inputs)
        st = h.last_trace().stages[0]
    crops = fc.all_crops(model, inputs)
    feats, kept = oracle.encode(model, crops, 2, 0.5)
    (x, pos, sources), = fc.reduced_rows(model, inputs, feats, kept)
    assert st.kept_positions[0] == sorted(sources)


def test_presets_and_fixed_count_flag():
    assert CRITERIA.get("vispruner").image_only_fixed_count is True
    st = vtp.Policy.parse("vispruner_64").stages[0]
    assert st.site == "vision" and st.budget.keep == 64 / 576 and st.params["important_ratio"] == 0.75
