"""Qwen3-VL / Qwen3-VL-MoE adapter: DeepStack injections follow the kept set, interleaved M-RoPE keeps
original positions, decode continues at the model's next position; == the independent oracle
(tests/reference/qwen3_vl_oracle.py) for FastV below and above the last injection, a pre-LLM prune,
both combined, left-padded batches, cached generate; keep-all, unpatch, refusals.

Tiny models from configs: 4 decoder layers, DeepStack features of vision layers 0 and 1 injected after
decoder layers 0 and 1 (so FastV at K = 1 prunes before the last injection, K = 3 after it); MoE: 4
experts, 2 per token.
"""
from __future__ import annotations

import functools

import pytest
import torch
from kit import BACKENDS, assert_keep_all_exact, assert_patch_refused, assert_unpatch_restores, k_of, positions_of
from helpers import new_tokens
from reference import qwen3_vl_oracle as oracle
from reference import uniform_oracle

import vlm_tokenprune as vtp
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_families import build_tiny_qwen3_vl, make_qwen3_batch
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, QWEN_VISION_END_ID, QWEN_VISION_START_ID, make_qwen_batch

torch.set_num_threads(1)

ATOL = 1e-5
ROWS = [[3, "img", 2, "img", 4], [2, "img", 3]]  # row 1 shorter: left padded
GRIDS = [(3, 4), (2, 3), (4, 2)]  # (h, w) LLM tokens per image
BANNED = [IMAGE_TOKEN_ID, 4, QWEN_VISION_START_ID, QWEN_VISION_END_ID]


@functools.cache
def tiny(attn: str, moe: bool = False):
    return build_tiny_qwen3_vl(attn, moe=moe)


def batch(model, seed: int = 0) -> dict:
    return make_qwen_batch(model, ROWS, seed=seed, image_grids=GRIDS)


def row_alone(inputs: dict, b: int) -> dict:
    real = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][real][None]
    imgs = [(0, 2), (2, 3)][b]
    thw = inputs["image_grid_thw"]
    start = int(thw[:imgs[0]].prod(-1).sum())
    n = int(thw[imgs[0]:imgs[1]].prod(-1).sum())
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": inputs["mm_token_type_ids"][b][real][None],
            "image_grid_thw": thw[imgs[0]:imgs[1]], "pixel_values": inputs["pixel_values"][start:start + n]}


def visual(inputs) -> list[int]:
    return positions_of(inputs, (IMAGE_TOKEN_ID,))


def uniform_keep(alone: dict, b: int, keep: float) -> list[int]:
    """The uniform baseline's kept set on row b alone: each image one h x w raster grid (plain loops)."""
    vis = visual(alone)
    grids, i = [], 0
    for h, w in [GRIDS[:2], GRIDS[2:]][b]:
        grids.append({"cells": {(t // w, t % w): vis[i + t] for t in range(h * w)}, "other": []})
        i += h * w
    return uniform_oracle.kept(grids, k_of(keep, len(vis)))


def check_rows(model, inputs, policy: str, want_fn) -> None:
    """Patched batched prefill == ``want_fn(alone, b) -> (kept visual, logits)`` per row alone."""
    with vtp.patch(model, policy) as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, b)
        pad = L - alone["input_ids"].shape[1]
        kept, want = want_fn(alone, b)
        assert trace.stages[-1].kept_positions[b] == [p + pad for p in kept], f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0, msg=f"row {b}")


# ------------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------------
def test_oracle_is_the_plain_model_and_discriminating():
    """Keeping everything reproduces the model (so the oracle's own DeepStack / M-RoPE are the model's);
    skipping DeepStack or re-selecting at another layer changes the result."""
    model = tiny("eager")
    alone = row_alone(batch(model), 0)
    prompt = oracle.Prompt(model, alone)
    eager = oracle.eager_copy(model)
    with torch.no_grad():
        plain = model(**alone).logits[0]
    full, _ = oracle.forward(eager, prompt)
    torch.testing.assert_close(full, plain, atol=ATOL, rtol=0)
    no_ds, _ = oracle.forward(eager, prompt, skip_deepstack=True)
    assert (no_ds[-1] - plain[-1]).abs().max() > 1e-3
    _, k1 = oracle.forward(eager, prompt, fastv=(1, 5))
    _, k3 = oracle.forward(eager, prompt, fastv=(3, 5))
    assert k1 != k3


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_is_exactly_unpatched(attn, moe):
    model = tiny(attn, moe)
    assert_keep_all_exact(model, batch(model), ("fastv:layer=1,keep=1+uniform:layer=3,keep=1",
                                                "uniform:site=pre_llm,keep=1"),
                          {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": BANNED})


def test_unpatch_restores_exactly():
    model = tiny("sdpa")
    lm = model.model.language_model

    def wrapped(_):
        assert "_deepstack_process" in vars(lm)  # the instance wrapper

    def unwrapped(_):
        assert "_deepstack_process" not in vars(lm)

    assert_unpatch_restores(model, batch(model), ("fastv:layer=1,keep=0.25",
                                                  "uniform:site=pre_llm,keep=0.5+fastv:layer=1,keep=0.3"),
                            patched=wrapped, unpatched=unwrapped)


# ------------------------------------------------------------------------------------------------
# == oracle
# ------------------------------------------------------------------------------------------------
def _fastv_want(model, layer, keep, start_keep=None):
    def want(alone, b):
        start = None
        if start_keep is not None:
            kept0 = uniform_keep(alone, b, start_keep)
            start = [p for p in range(alone["input_ids"].shape[1]) if p not in visual(alone) or p in kept0]
        n = len([p for p in (start or range(alone["input_ids"].shape[1])) if p in visual(alone)])
        k = k_of(keep, len(visual(alone))) if start_keep is None else min(n, k_of(keep, len(visual(alone))))
        s = oracle.fastv_scores(model, alone, layer, start)
        assert s[k - 1] - s[k] > 1e-7, "ill-conditioned case"
        logits, kept = oracle.forward(oracle.eager_copy(model), oracle.Prompt(model, alone), start=start,
                                      fastv=(layer, k))
        return kept, logits
    return want


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("layer", [1, 3])  # below / above the last DeepStack injection (after layer 1)
def test_fastv_matches_oracle(attn, layer):
    model = tiny(attn)
    check_rows(model, batch(model), f"fastv:layer={layer},keep=0.3", _fastv_want(model, layer, 0.3))


def test_fastv_on_moe_matches_oracle():
    model = tiny("sdpa", moe=True)
    check_rows(model, batch(model), "fastv:layer=1,keep=0.3", _fastv_want(model, 1, 0.3))


@pytest.mark.parametrize("attn", BACKENDS)
def test_pre_llm_prune_matches_oracle(attn):
    model = tiny(attn)

    def want(alone, b):
        kept = uniform_keep(alone, b, 0.3)
        start = [p for p in range(alone["input_ids"].shape[1]) if p not in visual(alone) or p in kept]
        logits, _ = oracle.forward(oracle.eager_copy(model), oracle.Prompt(model, alone), start=start)
        return kept, logits

    check_rows(model, batch(model), "uniform:site=pre_llm,keep=0.3", want)


@pytest.mark.parametrize("attn", BACKENDS)
def test_pre_llm_merge_fuses_deepstack_features_with_the_same_assignment(attn):
    """AIM (size-weighted, so a fused token is the plain mean of its sources' embeddings) before the LLM: each fused
    token gets the mean of its sources' DeepStack rows; checked against the oracle given the library's assignment."""
    model = tiny(attn)
    inputs = batch(model)
    with vtp.patch(model, "aim_merge:keep=0.25,mode=size,positions=gaps") as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    assert any(len(src) > 1 for row in st.sources for src in row)  # real merges happened
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, b)
        pad = L - alone["input_ids"].shape[1]
        merged = {p - pad: [q - pad for q in src] for p, src in zip(st.kept_positions[b], st.sources[b])}
        start = [p for p in range(alone["input_ids"].shape[1]) if p not in visual(alone) or p in merged]
        want, _ = oracle.forward(oracle.eager_copy(model), oracle.Prompt(model, alone), start=start, merged=merged)
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0, msg=f"row {b}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pre_llm_then_fastv_below_the_last_injection_matches_oracle(attn):
    model = tiny(attn)
    check_rows(model, batch(model), "uniform:site=pre_llm,keep=0.6+fastv:layer=1,keep=0.3",
               _fastv_want(model, 1, 0.3, start_keep=0.6))


@pytest.mark.parametrize("moe", [False, True])
def test_cached_generate_matches_oracle(moe):
    """FastV below the last injection; decode continues at max(prompt positions) + 1 on every axis."""
    model = tiny("sdpa", moe)
    inputs = make_qwen_batch(model, [[4, "img", 3]], image_grids=[(4, 4)], seed=1)
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    k = k_of(0.25, 16)
    with vtp.patch(model, "fastv:layer=1,keep=0.25"), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=BANNED)
    want = oracle.greedy(model, inputs, 6, fastv=(1, k), eos=eos)
    assert new_tokens(g[0], L, eos, pad) == want


# ------------------------------------------------------------------------------------------------
# videos: every frame its own <timestamp> <vision_start> frame <vision_end> group (Qwen3-VL's processor)
# ------------------------------------------------------------------------------------------------
VROWS = [[3, "img", 2, "vid", 4], [2, "vid", 3]]
VGRIDS = [(2, 2, 3), (2, 3, 2)]  # (t, h, w) per video


def video_batch(model) -> dict:
    return make_qwen3_batch(model, VROWS, image_grids=[(3, 4)], video_grids=VGRIDS)


def video_row_alone(inputs: dict, b: int) -> dict:
    real = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][real][None]
    vthw = inputs["video_grid_thw"]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "mm_token_type_ids": inputs["mm_token_type_ids"][b][real][None], "video_grid_thw": vthw[b:b + 1]}
    start = int(vthw[:b].prod(-1).sum())
    out["pixel_values_videos"] = inputs["pixel_values_videos"][start:start + int(vthw[b].prod())]
    if b == 0:
        out.update(image_grid_thw=inputs["image_grid_thw"], pixel_values=inputs["pixel_values"])
    return out


def test_video_keep_all_is_exact_and_frames_are_grids():
    model = tiny("sdpa")
    inputs = video_batch(model)
    kw = {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": BANNED}
    with torch.no_grad():
        ref, ref_gen = model(**inputs).logits, model.generate(**inputs, **kw)
        with vtp.patch(model, "fastv:layer=1,keep=1+uniform:layer=3,keep=1") as h:
            assert torch.equal(model(**inputs).logits, ref) and torch.equal(model.generate(**inputs, **kw), ref_gen)
        # uniform's grids: the same from image / video grids (forward) and from the 3-D positions (generate)
        with vtp.patch(model, "uniform:layer=2,keep=0.5") as h:
            model(**inputs)
            from_grids = h.last_trace().stages[0].kept_positions
            model.generate(**inputs, **kw)
            assert h.last_trace().stages[0].kept_positions == from_grids
    lay = resolve_adapter(model).visual_layout(model, inputs["input_ids"], inputs)
    v = lay.is_visual[1]
    assert lay.segment[1][v].tolist() == [0] * 6 + [1] * 6 and lay.col[1][v].tolist() == [0, 1] * 6


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_video_fastv_matches_oracle(attn):
    model = tiny(attn)
    inputs = video_batch(model)
    with vtp.patch(model, "fastv:layer=1,keep=0.3") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = video_row_alone(inputs, b)
        pad = L - alone["input_ids"].shape[1]
        prompt = oracle.Prompt(model, alone)
        k = k_of(0.3, len(prompt.visual))
        s = oracle.fastv_scores(model, alone, 1)
        assert s[k - 1] - s[k] > 1e-7, "ill-conditioned case"
        want, kept = oracle.forward(oracle.eager_copy(model), prompt, fastv=(1, k))
        assert trace.stages[0].kept_positions[b] == [p + pad for p in kept], f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,field,text", [
    ("flowcut_vit:keep=0.5", "stages[0].criterion", "has no CLS token"),
    ("mctf:keep=0.5", "stages[0].criterion", "site vision with vispruner"),  # site vision runs VisPruner here
    ("uniform:site=pre_llm,keep=0.5,positions=repack", "stages[0].positions", "3-D"),
])
def test_refused_by_name_before_any_hook(policy, field, text):
    model = tiny("sdpa")
    assert_patch_refused(model, policy, field, text)
    assert "_deepstack_process" not in vars(model.model.language_model)
