"""DART (arXiv 2502.11494) == an independent oracle (tests/reference/dart_oracle.py): keys of layer K-1
with RoPE, L1-norm pivots, the final norm of layer K's input, pivots visited in the official set order,
least-similar picks, layers >= K on the kept tokens with gapped positions. The library runs inside the
real batched, left-padded forward / generate under every attention backend (no attention map needed)."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH
from helpers import n_image_tokens, new_tokens
from reference import dart_oracle as oracle
from vlm_tokenprune.errors import PolicyError
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch
from vlm_tokenprune.methods.dart import pivot_order

torch.set_num_threads(1)

ATOL = 1e-5
BATCHES = {
    "1img+2img": [[5, "img", 7], [2, "img", 3, "img", 4]],
    "2img+1img": [[1, "img", "img", 5], [20, "img", 1]],
}


@functools.lru_cache(maxsize=None)
def tiny(attn: str):
    return build_tiny_llava(attn)


def row_alone(inputs: dict, rows: list, b: int) -> dict:
    first = sum(seg == "img" for r in rows[:b] for seg in r)
    n_img = sum(seg == "img" for seg in rows[b])
    ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": inputs["pixel_values"][first: first + n_img]}


def k_of(keep: float, n: int) -> int:
    return max(1, math.floor(keep * n + 0.5))


def check(model, inputs, rows, layer, keep, count, p_img=4, p_txt=4):
    policy = f"dart:layer={layer},keep={keep},count={count},pivot_image={p_img},pivot_text={p_txt}"
    # the pivots read RoPE'd keys: a left-padded row runs at its own positions (as generate() passes them)
    position_ids = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with vtp.patch(model, policy) as h, torch.no_grad():
        logits = model(**inputs, position_ids=position_ids).logits
        st = h.last_trace().stages[0]
    L = inputs["input_ids"].shape[1]
    for b in range(len(rows)):
        alone = row_alone(inputs, rows, b)
        pad = L - alone["input_ids"].shape[1]
        k = k_of(keep, n_image_tokens(alone))
        keep_pos = oracle.dart_keep(model, alone, layer, k, p_img=p_img, p_txt=p_txt, count=count)
        assert st.kept_positions[b] == [p + pad for p in keep_pos], f"row {b}"
        if count == "exact":
            assert len(keep_pos) == k
        want = oracle.dart_logits(model, alone, layer, keep_pos)[0]
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0, msg=f"row {b}")


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_prefill_matches_oracle(attn, batch):
    model = tiny(attn)
    rows = BATCHES[batch]
    inputs = make_batch(model, rows, seed=2)
    check(model, inputs, rows, 2, 0.5, "official")
    check(model, inputs, rows, 2, 0.25, "exact", p_img=2, p_txt=2)


def test_other_layer_and_official_count():
    """Layer 3; the official count keeps pivots + 8 * (k // 8) (132 for 128 of 576), here 4 + 8 * 2 = 20 of 36."""
    model = tiny("eager")
    rows = [[5, "img", 7]]
    inputs = make_batch(model, rows, seed=5)
    check(model, inputs, rows, 3, 0.5, "official")
    with vtp.patch(model, "dart:keep=0.5") as h, torch.no_grad():
        model(**inputs)
        assert h.last_trace().stages[0].visual_after == [4 + 8 * (18 // 8)]


def test_pivot_order_is_the_official_set_order():
    """Two pivots competing for the same dissimilar tokens: the set's iteration order decides, not the list's."""
    order = pivot_order([40, 8], [72, 33])
    assert order == list({40, 8, 72, 33}) and sorted(order) == [8, 33, 40, 72]


@pytest.mark.parametrize("attn", ["sdpa", FLASH])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_oracle(attn, use_cache):
    model = tiny(attn)
    rows = BATCHES["1img+2img"]
    inputs = make_batch(model, rows, seed=2)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    with vtp.patch(model, "dart:keep=0.5,count=exact"), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache)
    for b in range(len(rows)):
        alone = row_alone(inputs, rows, b)
        k = k_of(0.5, n_image_tokens(alone))
        want = oracle.dart_generate(model, alone, 2, k, 6, rescore=not use_cache, eos_token_id=eos, count="exact")
        assert new_tokens(g[b], L, eos, pad) == want, f"row {b}"


def test_bad_params_name_the_field():
    for text, field in (("dart:count=half", "stages[0].count"), ("dart:pivot_image=-1", "stages[0].pivot_image"),
                        ("dart:site=pre_llm", "stages[0].site")):
        with pytest.raises(PolicyError) as e:
            vtp.Policy.parse(text)
        assert e.value.field == field


def test_contested_token_goes_to_the_pivot_visited_first():
    """Two pivots whose least-similar candidate is the same token: the pivot visited first takes it, so the
    visiting order changes the kept set (why the official set order is reproduced)."""
    from vlm_tokenprune.methods.dart import duplicate_picks

    z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [-0.9, 0.2], [0.0, 1.0]])
    # pivots 0 and 4 both find token 2 least similar (cosine -1 and 0)
    assert duplicate_picks(z, [4, 0], [1, 2, 3], [1, 1]) == [2, 3]
    assert duplicate_picks(z, [0, 4], [1, 2, 3], [1, 1]) == [2, 1]
