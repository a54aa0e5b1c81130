"""DivPrune (arXiv 2503.02175) == the paper's greedy max-min diversity (plain loops) and the official
algorithm (tests/reference/divprune_oracle.py); before the LLM in the real batched, left-padded
forward / generate under every attention backend == the pre-LLM oracle run on the kept rows."""
from __future__ import annotations

import functools

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH
from reference import divprune_oracle as dp
from reference import pre_llm_oracle as oracle
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch
from vlm_tokenprune.methods.divprune import max_min_diverse
from vlm_tokenprune.registry import CRITERIA

torch.set_num_threads(1)

ATOL = 1e-5
BATCHES = {
    "1img+2img": [[5, "img", 7], [2, "img", 3, "img", 4]],
    "2img+1img+text": [[1, "img", "img", 5], [20, "img", 1], [12]],
}


@functools.lru_cache(maxsize=None)
def tiny(attn: str):
    return build_tiny_llava(attn)


def _pad(inputs, b: int) -> int:
    return int((inputs["attention_mask"][b] == 0).sum())


@pytest.mark.parametrize("k", [1, 5, 19])
def test_greedy_equals_paper_and_official(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(20, 8, generator=g)
    x[7] = x[3] * 2.0  # an exact duplicate direction: cosine distance 0
    ours = max_min_diverse(x, k)
    assert ours == dp.paper_select(x, k) == dp.official_select(x, k)
    assert len(set(ours)) == k
    if k >= 5:
        assert not {3, 7} <= set(ours[:5]), "the duplicate pair must not both be among the first picks"


def test_first_pick_is_the_most_isolated_token():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [-1.0, 0.05]])
    assert max_min_diverse(x, 1) == [4] == dp.official_select(x, 1)


def test_oracle_is_discriminating():
    """A different rule (first pick = token 0) gives a different set on the same data."""
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(3))
    picked = dp.paper_select(x, 5)
    assert picked[0] != 0
    f = x / x.norm(dim=1, keepdim=True)
    d = 1 - f @ f.T
    alt = [0]
    while len(alt) < 5:
        alt.append(int(d[alt].min(0).values.argmax()))
    assert set(alt) != set(picked)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("positions", ["repack", "gaps"])
def test_prefill_matches_oracle(attn, batch, positions):
    model = tiny(attn)
    inputs = make_batch(model, BATCHES[batch])
    with vtp.patch(model, f"divprune:keep=0.25,positions={positions}") as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    assert st.site == "pre_llm"
    for b in range(inputs["input_ids"].shape[0]):
        pad = _pad(inputs, b)
        want_kept = dp.kept_row(model, inputs, b, 0.25)
        assert [p - pad for p in st.kept_positions[b]] == want_kept, f"row {b}"
        x, pos, _ = oracle.reduce_row(model, inputs, b, 0.25, kept=want_kept)
        want = oracle.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - len(pos):], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", FLASH])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_oracle(attn, use_cache):
    model = tiny(attn)
    inputs = make_batch(model, BATCHES["1img+2img"])
    with vtp.patch(model, "divprune:keep=0.25"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache)
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        kept = dp.kept_row(model, inputs, b, 0.25)
        x, pos, _ = oracle.reduce_row(model, inputs, b, 0.25, kept=kept)
        assert out[b, L:].tolist() == oracle.greedy(model, x, pos, "repack", int(inputs["attention_mask"][b].sum()), 4)


def test_an_images_kept_set_depends_on_that_image_alone():
    """image_only_fixed_count: the same image keeps the same tokens whatever else is in the row or batch."""
    assert CRITERIA.get("divprune").image_only_fixed_count is True
    model = tiny("sdpa")
    a = make_batch(model, [[5, "img", 7]], seed=4)
    b = make_batch(model, [[2, "img", 3, "img", 4], [5, "img", 7]], seed=4)
    b["pixel_values"] = torch.cat([b["pixel_values"][:2], a["pixel_values"]])
    with vtp.patch(model, "divprune:keep=0.25") as h, torch.no_grad():
        model(**a)
        one = h.last_trace().stages[0].kept_positions[0]
        model(**b)
        two = h.last_trace().stages[0].kept_positions[1]
    first_a = int((a["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    first_b = int((b["input_ids"][1] == model.config.image_token_id).nonzero()[0])
    assert [p - first_a for p in one] == [p - first_b for p in two] and len(one) == 9


def test_presets_and_keep_everything():
    assert vtp.Policy.parse("divprune").stages[0].budget.keep == 0.098
    assert vtp.Policy.parse("divprune_128").stages[0].budget.keep == 128 / 576
    model = tiny("eager")
    inputs = make_batch(model, BATCHES["1img+2img"])
    with torch.no_grad():
        before = model(**inputs).logits
        with vtp.patch(model, "divprune:keep=1.0"):
            after = model(**inputs).logits
    assert torch.equal(before, after)
