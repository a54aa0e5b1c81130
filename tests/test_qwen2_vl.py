"""Qwen2-VL / Qwen2.5-VL adapter: FastV == an independent M-RoPE oracle (tests/reference/fastv_qwen_oracle.py).

Tiny models from configs (both versions, every backend in ``conftest.BACKENDS``), inputs built by
hand (flattened patches + ``image_grid_thw`` / ``video_grid_thw``, several images and videos of
different sizes per prompt). The oracle runs an eager copy layer by layer without a cache, builds
the M-RoPE cos/sin itself from the model's 3-D positions and keeps the original positions of the
kept tokens.
"""
from __future__ import annotations

import inspect
import types

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

import vlm_tokenprune as vtp
from kit import (
    BACKENDS, assert_budgets_honoured, assert_batch_matches_rows_alone, assert_clear_cut, assert_generate_matches_rows_alone, generate_rows,
    kept_count, n_visual, patched_prefill, row_alone, tiny_qwen,
)
from reference import fastv_qwen_oracle as oracle
from vlm_tokenprune import InputError, UnsupportedModelError
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_models import (
    IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_END_ID, QWEN_VISION_START_ID, build_tiny_qwen2_vl,
    make_qwen_batch,
)

torch.set_num_threads(1)

ATOL = 1e-5
VERSIONS = ("2", "2.5")

# (rows, image grids (h, w), video grids (t, h, w)) in LLM tokens, after the 2x2 merge
CASES = {
    "image": ([[4, "img", 5]], [(3, 4)], []),
    "two_images": ([[3, "img", 2, "img", 4]], [(2, 3), (4, 2)], []),
    "image+video": ([[3, "img", 2, "vid", 4]], [(3, 2)], [(2, 2, 3)]),
    "video": ([[2, "vid", 5]], [], [(3, 2, 2)]),
}
BATCH = [[3, "img", 2, "vid", 4], [2, "img", 1, "img", 3]]  # row 0 shorter: left padded
BATCH_IMAGES = [(2, 3), (3, 2), (1, 4)]
BATCH_VIDEOS = [(2, 2, 3)]
# transformers >= 5.2x: generate() passes precomputed encoder outputs instead of pixels and grids
HAS_MM_ENCODER_OUTPUTS = "mm_encoder_outputs" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters
# a generated image / video placeholder id would be a new (pixel-less) image to a cache-free forward and
# the model itself refuses it: generation tests never emit special ids
SPECIAL = (IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID)


def tiny(attn: str, version: str):
    return tiny_qwen(attn, version)


def case(model, name: str, seed: int = 0) -> dict:
    rows, imgs, vids = CASES[name]
    return make_qwen_batch(model, rows, seed=seed, image_grids=imgs, video_grids=vids, seconds_per_grid=[2.0] * len(vids))


def batch(model, seed: int = 0) -> dict:
    return make_qwen_batch(model, BATCH, seed=seed, image_grids=BATCH_IMAGES, video_grids=BATCH_VIDEOS)


def assert_well_separated(model, inputs, layer: int, k: int) -> None:
    assert_clear_cut(oracle.fastv_scores(model, inputs, layer).values(), k, 1e-7)


# ------------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_oracle_mrope_and_attention_row_match_the_model(version):
    """The oracle's own M-RoPE == the model's rotary; its attention row == eager output_attentions."""
    model = tiny("eager", version)
    inputs = case(model, "image+video")
    embeds, pos = oracle.prompt_inputs(model, inputs)
    assert len(set(pos[0].tolist())) < pos.shape[1]  # really 3-D: visual tokens share temporal ids
    cos, sin = oracle.mrope_cos_sin(model, pos, embeds.dtype)
    ref_cos, ref_sin = model.model.language_model.rotary_emb(embeds, pos[:, None])
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
    copy = oracle.eager_copy(model)
    with torch.no_grad():
        att = copy(**inputs, output_attentions=True).attentions
    vis = oracle.visual_positions(model, inputs["input_ids"])
    for layer in (1, 3):
        scores = oracle.fastv_scores(model, inputs, layer)
        row = att[layer - 1][0, :, -1].mean(0)
        torch.testing.assert_close(torch.tensor([scores[p] for p in vis]), row[vis], atol=1e-6, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_oracle_keeping_everything_is_the_plain_model(attn, version):
    model = tiny(attn, version)
    inputs = case(model, "image+video")
    with torch.no_grad():
        plain = model(**inputs).logits
    every = oracle.visual_positions(model, inputs["input_ids"])
    torch.testing.assert_close(oracle.fastv_logits(model, inputs, 2, every), plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_oracle_is_discriminating(version):
    """Other layers choose other tokens; pruning changes logits; re-packed positions change them too
    (so matching the oracle proves original 3-D positions); cached and cache-free generation differ."""
    model = tiny("eager", version)
    inputs = case(model, "image+video")
    keeps = {layer: oracle.fastv_keep(model, inputs, layer, 8) for layer in (1, 2, 3)}
    assert len({tuple(v) for v in keeps.values()}) == 3, keeps
    with torch.no_grad():
        plain = model(**inputs).logits
    gapped = oracle.fastv_logits(model, inputs, 2, keeps[2])
    repacked = oracle.fastv_logits(model, inputs, 2, keeps[2], repack=True)
    assert (gapped[0, -1] - plain[0, -1]).abs().max() > 1e-3
    assert (gapped[0, -1] - repacked[0, -1]).abs().max() > 1e-3
    _, trace = patched_prefill(model, inputs, "fastv:layer=2,tokens=8")
    assert trace.stages[0].kept_positions[0] == keeps[2] != keeps[1]
    eos = model.generation_config.eos_token_id
    assert oracle.fastv_generate(model, inputs, 2, 9, 8, False, eos) != oracle.fastv_generate(model, inputs, 2, 9, 8, True, eos)


# ------------------------------------------------------------------------------------------------
# keep-all exactness, unpatch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_is_exactly_unpatched(attn, version):
    model = tiny(attn, version)
    inputs = batch(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        with vtp.patch(model, "fastv:keep=1+uniform:layer=3,keep=1") as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert all(s.visual_before == s.visual_after for s in h.last_trace().stages)


@pytest.mark.parametrize("version", VERSIONS)
def test_unpatch_restores_exactly(version):
    model = tiny("sdpa", version)
    inputs = batch(model)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for policy in ("fastv:layer=1,keep=0.25", "uniform:layer=2,tokens=3+fastv:layer=3,tokens=2"):
            h = vtp.patch(model, policy)
            pruned = model(**inputs).logits
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
            h.unpatch()
            assert pruned.shape[1] < ref.shape[1]
        assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)


# ------------------------------------------------------------------------------------------------
# prefill == oracle
# ------------------------------------------------------------------------------------------------
def check_single_vs_oracle(model, inputs, layer: int, budget: str) -> None:
    k = kept_count(budget, n_visual(inputs))
    assert_well_separated(model, inputs, layer, k)
    want_keep = oracle.fastv_keep(model, inputs, layer, k)
    want = oracle.fastv_logits(model, inputs, layer, want_keep)
    logits, trace = patched_prefill(model, inputs, f"fastv:layer={layer},{budget}")
    assert trace.stages[0].kept_positions[0] == want_keep
    assert logits.shape == want.shape == (1, inputs["input_ids"].shape[1] - n_visual(inputs) + k, 128)
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,layer,budget", [
    ("image", 2, "keep=0.25"), ("two_images", 1, "tokens=7"), ("image+video", 3, "keep=0.5"), ("video", 2, "tokens=3"),
])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_prefill_matches_oracle(attn, version, name, layer, budget):
    model = tiny(attn, version)
    check_single_vs_oracle(model, case(model, name), layer, budget)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_prefill_matches_rows_alone(attn, version):
    """Batch 2, left padding, different image sizes, a video in one row: each row == its oracle alone."""
    model = tiny(attn, version)
    inputs = batch(model, seed=1)
    for layer, budget in ((2, "keep=0.25"), (3, "keep=0.6")):
        def row_oracle(alone):
            k = kept_count(budget, n_visual(alone))
            assert_well_separated(model, alone, layer, k)
            keep = oracle.fastv_keep(model, alone, layer, k)
            return [keep], oracle.fastv_logits(model, alone, layer, keep)[0]

        assert_batch_matches_rows_alone(model, inputs, BATCH, f"fastv:layer={layer},{budget}", row_oracle, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_generate_matches_oracle(attn, version, use_cache):
    """Cached: the prompt's kept set serves every step (decode continues at the original positions,
    rope_deltas); cache-free: re-chosen each step."""
    model = tiny(attn, version)
    inputs = case(model, "image+video")
    eos = model.generation_config.eos_token_id
    want = oracle.fastv_generate(model, inputs, 2, 9, 8, rescore=not use_cache, eos_token_id=eos, suppress=SPECIAL)
    assert generate_rows(model, inputs, "fastv:layer=2,tokens=9", use_cache=use_cache, suppress_tokens=list(SPECIAL)) == [want]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("attn", BACKENDS)
def test_left_padded_batch_generate_matches_rows_alone(attn, version, use_cache):
    model = tiny(attn, version)
    eos = model.generation_config.eos_token_id
    assert_generate_matches_rows_alone(
        model, batch(model, seed=2), BATCH, "fastv:layer=2,keep=0.25",
        lambda alone: oracle.fastv_generate(model, alone, 2, kept_count("keep=0.25", n_visual(alone)), 6,
                                            rescore=not use_cache, eos_token_id=eos, suppress=SPECIAL),
        use_cache=use_cache, steps=6, suppress_tokens=list(SPECIAL))


def _rope_positions(model, inputs) -> torch.Tensor:
    kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        attention_mask=inputs["attention_mask"], **kw)
    return pos  # [3, B, L]


def _cache_name(model) -> str:
    """The forward's cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _greedy_manual(model, inputs, steps):
    """One prefill forward, then cached one-token forwards at the next 3-D positions (last + 1).
    (Positions are passed: transformers 5.24's own Qwen continuation with a 2-D mask and no positions
    builds positions for the whole mask and fails, patched or not.)"""
    pos = _rope_positions(model, inputs)[:, :, -1:]
    out = model(**inputs, use_cache=True)
    name = _cache_name(model)
    cache, mask = out[name], inputs["attention_mask"]
    toks = [out.logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = model(input_ids=toks[-1][:, None], attention_mask=mask, position_ids=pos, **{name: cache})
        toks.append(out.logits[:, -1].argmax(-1))
    return torch.stack(toks, 1), cache


@pytest.mark.parametrize("attn", BACKENDS)
def test_multi_stage_manual_continuation_equals_generate_and_rows_alone(attn):
    model = tiny(attn, "2.5")
    inputs = batch(model, seed=3)
    policy = "fastv:layer=1,keep=0.5+uniform:layer=2,keep=0.3+fastv:layer=3,tokens=2"
    with torch.no_grad(), vtp.patch(model, policy) as h:
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, -5:]
        kept = [s.kept_positions for s in h.last_trace().stages]
        manual, _ = _greedy_manual(model, inputs, 5)
        assert h.last_trace().phase == "decode"
        assert torch.equal(gen, manual)
        L = inputs["input_ids"].shape[1]
        for b in range(len(BATCH)):
            alone = row_alone(inputs, BATCH, b)
            pad = L - alone["input_ids"].shape[1]
            g1 = model.generate(**alone, max_new_tokens=5, do_sample=False)[:, -5:]
            assert torch.equal(g1[0], gen[b]), f"row {b}"
            for s, stage in enumerate(h.last_trace().stages):
                assert [p + pad for p in stage.kept_positions[0]] == kept[s][b]


@pytest.mark.parametrize("version", VERSIONS)
def test_kept_tokens_keep_their_original_3d_positions(version):
    """What the pruned layers receive: cos/sin (and text position ids) of the ORIGINAL 3-D positions of the
    kept tokens in prefill, and the original next position (rope_deltas) for decoded tokens."""
    model = tiny("eager", version)
    inputs = batch(model)
    pos = _rope_positions(model, inputs)  # [3, B, L]
    rotary = model.model.language_model.rotary_emb
    seen = []

    def spy(module, args, kwargs):
        seen.append((kwargs["position_embeddings"], kwargs.get("position_ids"), args[0].shape[1] if args else None))

    with torch.no_grad(), vtp.patch(model, "fastv:layer=2,keep=0.3") as h:
        spy_h = model.model.language_model.layers[3].register_forward_pre_hook(spy, with_kwargs=True)  # after ours
        try:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        finally:
            spy_h.remove()
        kept = h.last_state.prefill.records[0]
    k, ok = kept.kept, kept.kept_ok
    (cos, sin), text_pos, _ = seen[0]
    want_pos = torch.gather(pos, 2, k[None].expand(3, -1, -1))
    want_cos, want_sin = rotary(cos, want_pos)
    torch.testing.assert_close(cos[ok], want_cos[ok], atol=0, rtol=0)
    torch.testing.assert_close(sin[ok], want_sin[ok], atol=0, rtol=0)
    if text_pos is not None:  # generate passes text positions to the layers: gathered too
        text = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        assert torch.equal(text_pos[ok], torch.gather(text, 1, k)[ok])
    L = inputs["input_ids"].shape[1]
    for step, ((c, s), _, _) in enumerate(seen[1:], start=1):  # decode steps: q_len 1 at last + step
        nxt = pos[:, :, -1:] + step
        wc, ws = rotary(c, nxt)
        assert c.shape[1] == 1
        torch.testing.assert_close(c, wc, atol=0, rtol=0)
        torch.testing.assert_close(s, ws, atol=0, rtol=0)
    assert int(pos[:, :, -1].max()) + 1 < L  # M-RoPE positions really are compressed (rope_deltas < 0)


# ------------------------------------------------------------------------------------------------
# layout, uniform on the grids
# ------------------------------------------------------------------------------------------------
def test_visual_layout_of_images_and_videos():
    model = tiny("sdpa", "2")
    inputs = batch(model)
    lay = resolve_adapter(model).visual_layout(model, inputs["input_ids"], inputs)
    L = inputs["input_ids"].shape[1]
    # (item, segment, row, col) per visual token: row 0 = image 2x3, then a video of 2 frames of 2x3;
    # row 1 = image 3x2, then image 1x4
    rows_expect = {
        0: [(0, 0, r, c) for r in range(2) for c in range(3)]
        + [(1, 1 + t, r, c) for t in range(2) for r in range(2) for c in range(3)],
        1: [(0, 0, r, c) for r in range(3) for c in range(2)] + [(1, 1, 0, c) for c in range(4)],
    }
    for b, expect in rows_expect.items():
        vis = lay.is_visual[b]
        got = list(zip(lay.image[b][vis].tolist(), lay.segment[b][vis].tolist(), lay.row[b][vis].tolist(),
                       lay.col[b][vis].tolist()))
        assert got == expect, b
        assert not lay.is_newline[b].any() and (lay.segment[b][~vis] == -1).all()
    assert lay.coords_known and lay.is_visual.shape == (2, L)


@pytest.mark.parametrize("version", VERSIONS)
def test_uniform_spreads_over_every_grid_and_frame(version):
    from reference.pre_llm_oracle import split
    from vlm_tokenprune.methods.baselines import grid_points

    model = tiny("sdpa", version)
    inputs = make_qwen_batch(model, [[2, "img", 3, "vid", 2, "img", 1]], image_grids=[(4, 6), (3, 3)],
                             video_grids=[(2, 4, 4)])
    with vtp.patch(model, "uniform:layer=2,tokens=14") as h, torch.no_grad():
        model(**inputs)
        kept = h.last_trace().stages[0].kept_positions[0]
    ids = inputs["input_ids"][0]
    vis = ((ids == IMAGE_TOKEN_ID) | (ids == QWEN_VIDEO_TOKEN_ID)).nonzero().flatten().tolist()
    grids = [(4, 6), (4, 4), (4, 4), (3, 3)]  # image, video frame 0, video frame 1, image (prompt order)
    quota = split(14, [r * c for r, c in grids])  # the oracle's reading of the documented split
    expect, start = [], 0
    for (r, c), q in zip(grids, quota):
        expect += [vis[start + i * c + j] for i, j in grid_points(r, c, q)]
        start += r * c
    assert sorted(expect) == kept
    assert quota == [5, 4, 3, 2]  # every frame of the video is a grid of its own
    # generate() passes encoder outputs and 3-D positions instead of pixels and grids: same selection
    with vtp.patch(model, "uniform:layer=2,tokens=14") as h, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert h.last_state.prefill.records[0].kept_visual[0].tolist() == kept


@pytest.mark.parametrize("version", VERSIONS)
def test_layout_from_generate_kwargs_equals_layout_from_grids(version):
    """generate() pops pixels and grids and passes mm_encoder_outputs + [4, B, L] positions instead;
    the adapter reads counts from the former and each frame's h x w from the latter."""
    model = tiny("sdpa", version)
    inputs = batch(model)
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    hook = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    assert seen["position_ids"].shape[0] == 4
    if HAS_MM_ENCODER_OUTPUTS:  # transformers >= 5.2x; earlier generate passes pixels and grids
        assert "image_grid_thw" not in seen and "mm_encoder_outputs" in seen
    adapter = resolve_adapter(model)
    want = adapter.visual_layout(model, inputs["input_ids"], inputs)
    got = adapter.visual_layout(model, seen["input_ids"], seen)
    for name in ("is_visual", "image", "segment", "row", "col", "is_newline"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.coords_known and want.coords_known
    if HAS_MM_ENCODER_OUTPUTS:
        no_pos = dict(seen, position_ids=None)  # counts alone: order known, grid not
        assert not adapter.visual_layout(model, seen["input_ids"], no_pos).coords_known


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def test_sliding_window_layers_are_refused():
    model = build_tiny_qwen2_vl("sdpa", "2", use_sliding_window=True, max_window_layers=2)
    assert "sliding_attention" in model.config.text_config.layer_types
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(model, "fastv")
    assert e.value.field == "config.text_config.use_sliding_window" and "qwen2_vl" in str(e.value)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["pixel_values", "pixel_values_videos", "mm_encoder_outputs"])
def test_new_pixels_in_a_cached_chunk_are_refused(kind):
    model = tiny("sdpa", "2.5")
    inputs = case(model, "image+video")
    with torch.no_grad(), vtp.patch(model, "fastv:keep=0.5"):
        out = model(**inputs, use_cache=True)
        name = _cache_name(model)
        cache = {name: out[name]}
        pos = _rope_positions(model, inputs)[:, :, -1:] + 1
        if kind == "mm_encoder_outputs":
            if not HAS_MM_ENCODER_OUTPUTS:
                pytest.skip("this transformers version has no mm_encoder_outputs")
            extra = {kind: {"image": out.image_outputs}}
            # an empty dict carries no features: a plain continuation
            model(input_ids=torch.tensor([[9]]), position_ids=pos, mm_encoder_outputs={}, **cache)
            pos = pos + 1
        else:
            extra = {kind: inputs[kind]}
        with pytest.raises(InputError) as e:
            model(input_ids=torch.tensor([[9]]), position_ids=pos, **cache, **extra)
        assert e.value.field == kind
        # the refused call left no state behind: a plain continuation still works
        model(input_ids=torch.tensor([[9]]), position_ids=pos, **cache)


def test_placeholder_grid_mismatch_is_refused():
    model = tiny("sdpa", "2")
    inputs = case(model, "image")
    inputs["image_grid_thw"] = torch.tensor([[1, 6, 6]])  # 9 tokens, prompt holds 12
    with vtp.patch(model, "fastv"), pytest.raises(InputError) as e:
        model(**inputs)
    assert e.value.field == "input_ids" and "image_grid_thw" in str(e.value)


@pytest.mark.parametrize("model_type,reason", [
    ("internvl_chat", "remote code"),
    ("llava_mpt", "original LLaVA code base"),
])
def test_known_unsupported_model_types_say_why(model_type, reason):
    fake = torch.nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type=model_type)
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(fake, "fastv")
    msg = str(e.value)
    assert model_type in msg and reason in msg and "qwen2_5_vl" in msg and "llava" in msg
    assert not fake._forward_pre_hooks


# ------------------------------------------------------------------------------------------------
# fuzz: random prompts of images and videos of random sizes
# ------------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

_segments = hs.one_of(hs.integers(1, 4), hs.just("img"), hs.just("vid"))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=hs.lists(hs.lists(_segments, min_size=1, max_size=4), min_size=1, max_size=2),
    sizes=hs.lists(hs.tuples(hs.integers(1, 3), hs.integers(1, 4), hs.integers(1, 4)), min_size=8, max_size=8),
    layer=hs.integers(1, 3),
    budget=hs.one_of(hs.floats(0.05, 1.0).map(lambda r: f"keep={r}"), hs.integers(1, 12).map(lambda t: f"tokens={t}")),
    method=hs.sampled_from(["fastv", "random", "uniform"]),
    version=hs.sampled_from(VERSIONS),
    attn=hs.sampled_from(BACKENDS),
)
def test_fuzz_layout_matches_mrope_positions_and_budgets_hold(rows, sizes, layer, budget, method, version, attn):
    """The adapter's grid coordinates are the model's own M-RoPE (h, w) offsets within each item, frames
    are the distinct temporal ids; every row keeps exactly its budget."""
    model = tiny(attn, version)
    n_img = sum(s == "img" for r in rows for s in r)
    n_vid = sum(s == "vid" for r in rows for s in r)
    assume(n_img + n_vid <= len(sizes))
    imgs = [s[1:] for s in sizes[:n_img]]
    vids = sizes[n_img:n_img + n_vid]
    inputs = make_qwen_batch(model, rows, image_grids=imgs, video_grids=vids, seconds_per_grid=[1.0] * n_vid)
    lay = resolve_adapter(model).visual_layout(model, inputs["input_ids"], inputs)
    if n_img + n_vid:
        pos = _rope_positions(model, inputs)
        for b in range(len(rows)):
            for i in lay.image[b][lay.is_visual[b]].unique().tolist():
                sel = lay.is_visual[b] & (lay.image[b] == i)
                ph, pw = pos[1, b, sel], pos[2, b, sel]
                assert torch.equal(lay.row[b, sel], ph - ph.min()) and torch.equal(lay.col[b, sel], pw - pw.min())
                frames = lay.segment[b, sel] - lay.segment[b, sel].min()
                t = pos[0, b, sel]
                assert torch.unique_consecutive(t).numel() == int(frames.max()) + 1
    n_vis = [n_visual(inputs, b) for b in range(len(rows))]
    assert_budgets_honoured(model, inputs, f"{method}:layer={layer},{budget}", n_vis)
