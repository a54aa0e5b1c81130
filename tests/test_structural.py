"""Structural ops (skip layers, prune heads, visual FFN cut, neighbour attention, visual drop)
against the independent masked eager oracle: prefill logits and cached greedy generate(),
batch 2 with left padding; composition with token pruning; exact unpatch."""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, PolicyError, UnsupportedModelError
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, make_batch

from kit import FLASH, tiny_llava, tiny_qwen
from reference import structural_oracle as O

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]  # batch 2, left padding, 1 and 2 images of 6 x 6 patches
SIDE = 6
STEPS = 4
ALL = range(4)

# policy -> what the oracle simulates (tiny model: 4 layers, 4 heads in 2 KV groups, MLP 128)
CASES = {
    "skip_layers:layers=2": {"skip_all": {2}},
    "skip_layers:layers=1;3,scope=visual": {"skip_visual": {1, 3}},
    # layer 1: uneven KV groups (per-head KV copies); layer 2: a whole KV group gone
    "prune_heads:heads=1/0;2/2;2/3,scope=all": {"heads_all": {1: (0,), 2: (2, 3)}},
    "prune_heads:heads=1/0;2/3,scope=visual": {"heads_visual": {1: (0,), 2: (3,)}},
    # layer 2: KV group 1 fully pruned (k/v_proj of visual rows sliced); layer 3: every head pruned for visual rows
    "prune_heads:heads=2/2;2/3;3/0;3/1;3/2;3/3,scope=visual": {"heads_visual": {2: (2, 3), 3: (0, 1, 2, 3)}},
    "ffn_cut": {"ffn": {j: 64 for j in ALL}},
    "ffn_cut:ratio=3,layers=0;2": {"ffn": {0: 42, 2: 42}},
    "neighbor_attention:window=3": {"neighbor": {j: 3 for j in ALL}},
}


@pytest.fixture(scope="module")
def models():
    return {impl: tiny_llava(impl) for impl in ("eager", "sdpa", FLASH)}


def _setup(model):
    inputs = make_batch(model, ROWS)
    ids = inputs["input_ids"]
    vis = ids == IMAGE_TOKEN_ID
    k = torch.cumsum(vis.long(), 1) - 1  # index among the row's visual tokens
    within = k % (SIDE * SIDE)
    grid = (torch.where(vis, within // SIDE, -1), torch.where(vis, within % SIDE, -1), torch.where(vis, k // (SIDE * SIDE), -1))
    return inputs, vis, inputs["attention_mask"].bool(), grid


def _run(model, policy, inputs):
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtp.patch(model, policy) as h:
        logits = model(**inputs).logits
        trace = h.last_trace()
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)[:, L:]
    return logits, gen, trace


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", list(CASES))
def test_matches_masked_oracle(models, impl, policy):
    model = models[impl]
    inputs, vis, valid, grid = _setup(model)
    cap = O.capture(model, inputs)
    logits, gen, _ = _run(model, policy, inputs)
    with torch.no_grad():
        exp = O.forward(model, cap["h"], cap["pos"], valid, vis, grid, CASES[policy])
        base = O.forward(model, cap["h"], cap["pos"], valid, vis, grid)
    assert logits.shape == exp.shape
    torch.testing.assert_close(logits[valid], exp[valid], atol=2e-5, rtol=1e-4)
    assert (exp - base)[valid].abs().max() > 1e-2  # the oracle tells the op from the plain model
    assert torch.equal(gen, O.greedy(model, inputs, STEPS, vis, grid, CASES[policy]))


@pytest.mark.parametrize("policy", ["skip_layers:layers=2", "prune_heads:heads=1/0;2/2;2/3,scope=all", "ffn_cut",
                                    "skip_layers:layers=1;3,scope=visual", "prune_heads:heads=1/0;2/3,scope=visual",
                                    "prune_heads:heads=2/2;2/3;3/0;3/1;3/2;3/3,scope=visual"])
def test_flash_standin(models, policy):
    model = models[FLASH]
    inputs, vis, valid, grid = _setup(model)
    cap = O.capture(model, inputs)
    logits, gen, _ = _run(model, policy, inputs)
    with torch.no_grad():
        exp = O.forward(model, cap["h"], cap["pos"], valid, vis, grid, CASES[policy])
    torch.testing.assert_close(logits[valid], exp[valid], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, O.greedy(model, inputs, STEPS, vis, grid, CASES[policy]))


@pytest.mark.parametrize("policy", ["neighbor_attention", "prune_heads:heads=1/0+neighbor_attention:layers=2"])
def test_mask_ops_refuse_2d_masks(models, policy):
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(models[FLASH], policy)
    assert e.value.field == "attn_implementation"
    assert not vtp.patching.is_patched(models[FLASH])


@pytest.mark.parametrize("impl", ["eager", "sdpa", FLASH])
def test_visual_drop_removes_visual_tokens(models, impl):
    model = models[impl]
    inputs, vis, valid, grid = _setup(model)
    cap = O.capture(model, inputs)
    logits, gen, trace = _run(model, "visual_drop:layer=2", inputs)
    n_text = int((valid & ~vis).sum(1).max())
    assert trace.tokens_per_layer == [inputs["input_ids"].shape[1]] * 2 + [n_text] * 2  # really removed
    assert trace.stages[0].visual_after == [0, 0] and trace.stages[0].criterion == "visual_drop"
    with torch.no_grad():
        exp = O.forward(model, cap["h"], cap["pos"], valid, vis, grid, None, {2: vis})
    torch.testing.assert_close(logits[:, -1], exp[:, -1], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, O.greedy(model, inputs, STEPS, vis, grid, None, {2: vis}))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_composes_with_token_pruning(models, impl):
    model = models[impl]
    inputs, vis, valid, grid = _setup(model)
    cap = O.capture(model, inputs)
    policy = "fastv:layer=1,keep=0.5+ffn_cut+prune_heads:heads=2/1;3/0+neighbor_attention:window=3,layers=2;3" \
             "+skip_layers:layers=3,scope=visual"
    logits, gen, trace = _run(model, policy, inputs)
    kept = torch.zeros_like(vis)
    for b, pos in enumerate(trace.stages[0].kept_positions):
        kept[b, pos] = True
    removed = {1: vis & ~kept}
    ops = {"ffn": {j: 64 for j in ALL}, "heads_visual": {2: (1,), 3: (0,)}, "neighbor": {2: 3, 3: 3}, "skip_visual": {3}}
    with torch.no_grad():
        exp = O.forward(model, cap["h"], cap["pos"], valid, vis, grid, ops, removed)
    torch.testing.assert_close(logits[:, -1], exp[:, -1], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, O.greedy(model, inputs, STEPS, vis, grid, ops, removed))
    # and visual_drop after a token stage
    logits, gen, trace = _run(model, "fastv:layer=1,keep=0.5+visual_drop:layer=3+ffn_cut", inputs)
    kept = torch.zeros_like(vis)
    for b, pos in enumerate(trace.stages[0].kept_positions):
        kept[b, pos] = True
    removed = {1: vis & ~kept, 3: vis}
    ops = {"ffn": {j: 64 for j in ALL}}
    with torch.no_grad():
        exp = O.forward(model, cap["h"], cap["pos"], valid, vis, grid, ops, removed)
    torch.testing.assert_close(logits[:, -1], exp[:, -1], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, O.greedy(model, inputs, STEPS, vis, grid, ops, removed))


def _snapshot(model):
    mods = {n: m for n, m in model.named_modules()}
    return (mods, {n: sorted(vars(m)) for n, m in mods.items()},
            {n: m.forward for n, m in mods.items()},
            {n: p.detach().clone() for n, p in model.state_dict().items()},
            {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in mods.items()},
            {n: m.num_key_value_groups for n, m in mods.items() if hasattr(m, "num_key_value_groups")})


def test_unpatch_is_exact(models):
    model = models["sdpa"]
    inputs, *_ = _setup(model)
    mods, attrs, fwd, state, hooks, groups = _snapshot(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        for policy in [*CASES, "fastv:layer=1,keep=0.5+prune_heads:heads=1/0;2/2,scope=all+skip_layers:layers=3+ffn_cut"]:
            h = vtp.patch(model, policy)
            assert not torch.equal(model(**inputs).logits[:, -1], ref[:, -1])
            h.unpatch()
            h.unpatch()
        out = model(**inputs).logits
    assert torch.equal(out, ref)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert model.config.text_config._attn_implementation == "sdpa"
    assert not [k for k in (*AttentionInterface._global_mapping, *AttentionMaskInterface._global_mapping) if k.startswith("vtp_structural")]
    m2, a2, f2, s2, h2, g2 = _snapshot(model)
    assert all(m2[n] is m for n, m in mods.items()) and set(m2) == set(mods)
    assert a2 == attrs and h2 == hooks and g2 == groups
    assert all(f2[n] == f for n, f in fwd.items())  # bound methods of the class again
    assert all("forward" not in vars(m) for m in model.modules())
    assert all(torch.equal(s2[k], v) for k, v in state.items())


@pytest.mark.parametrize("policy, exc, field", [
    ("skip_layers:layers=0", IncompatiblePolicyError, "stages[0].layers"),
    ("skip_layers:layers=4", IncompatiblePolicyError, "stages[0].layers"),
    ("prune_heads:heads=1/4", IncompatiblePolicyError, "stages[0].heads"),
    ("prune_heads:heads=1/0;1/1;1/2;1/3,scope=all", IncompatiblePolicyError, "stages[0].heads"),
    ("ffn_cut:layers=9", IncompatiblePolicyError, "stages[0].layers"),
    ("visual_drop:layer=4", IncompatiblePolicyError, "stages[0].layer"),
    ("prune_heads:calibration=/nonexistent.json,top_n=2", PolicyError, "stages[0].calibration"),
])
def test_validation_before_touching_the_model(models, policy, exc, field):
    model = models["sdpa"]
    before = _snapshot(model)
    with pytest.raises(exc) as e:
        vtp.patch(model, policy)
    assert e.value.field == field, str(e.value)
    after = _snapshot(model)
    assert after[1] == before[1] and after[4] == before[4] and all(after[0][n] is m for n, m in before[0].items())


def test_query_subset_attention_is_installed_only_where_useful(models):
    with vtp.patch(models["sdpa"], "neighbor_attention:window=3") as h:
        assert h.structural_attention and models["sdpa"].config.text_config._attn_implementation.startswith("vtp_structural_")
        assert "real: visual queries attend in chunks" in h.describe()
    with vtp.patch(models["sdpa"], "ffn_cut") as h:
        assert not h.structural_attention and models["sdpa"].config.text_config._attn_implementation == "sdpa"
    with vtp.patch(models[FLASH], "skip_layers:layers=1,scope=visual") as h:
        assert not h.structural_attention and "partial" in h.describe()


def test_skip_visual_layer0_allowed_and_text_only_prompt(models):
    model = models["sdpa"]
    inputs = make_batch(model, [[6], [4]])
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, "skip_layers:layers=0,scope=visual+ffn_cut+neighbor_attention+prune_heads:heads=1/0"):
            out = model(**inputs).logits
    assert torch.equal(out, ref)  # no visual token: the visual-only ops change nothing


@pytest.mark.parametrize("policy", ["prune_heads:heads=1/0;2/3,scope=visual", "skip_layers:layers=1;3,scope=visual",
                                    "skip_layers:layers=2", "neighbor_attention:window=3"])
def test_generate_without_cache(models, policy):
    """use_cache=False: every step is a fresh prefill over prompt + generated tokens (text)."""
    model = models["sdpa"]
    inputs, vis, valid, grid = _setup(model)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtp.patch(model, policy):
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, use_cache=False)[:, L:]
    assert torch.equal(gen, O.greedy(model, inputs, STEPS, vis, grid, CASES[policy]))


def test_qwen2_vl_neutral_settings_are_exact():
    """On Qwen2-VL (M-RoPE, 2x3 grids): a window covering the grid and ratio 1 change nothing."""
    from vlm_tokenprune.eval.tiny_models import make_qwen_batch

    model = tiny_qwen("sdpa")
    inputs = make_qwen_batch(model, [[5, "img", 7], [3, "img", 4]])
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        for policy in ["neighbor_attention:window=5", "ffn_cut:ratio=1", "prune_heads:heads=1/0,scope=visual"]:
            with vtp.patch(model, policy):
                out = model(**inputs).logits
                gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
            if policy.startswith("prune"):
                assert not torch.allclose(out[:, -1], ref[:, -1], atol=1e-3)
            else:
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
                assert torch.equal(gen, ref_gen)
        with vtp.patch(model, "neighbor_attention:window=1"):
            assert not torch.allclose(model(**inputs).logits[:, -1], ref[:, -1], atol=1e-3)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_unpadded_batch_one_with_token_stage(models, impl):
    """No padding: sdpa layers get no mask at all (prefill and decode); masks are built per kept set."""
    model = models[impl]
    inputs = make_batch(model, [[5, "img", 7]])
    vis = inputs["input_ids"] == IMAGE_TOKEN_ID
    k = torch.cumsum(vis.long(), 1) - 1
    grid = (torch.where(vis, k // SIDE, -1), torch.where(vis, k % SIDE, -1), torch.where(vis, 0, -1))
    policy = "fastv:layer=2,keep=0.5+prune_heads:heads=1/0;3/0+neighbor_attention:window=3"
    logits, gen, trace = _run(model, policy, inputs)
    kept = torch.zeros_like(vis)
    kept[0, trace.stages[0].kept_positions[0]] = True
    ops, removed = {"heads_visual": {1: (0,), 3: (0,)}, "neighbor": {j: 3 for j in ALL}}, {2: vis & ~kept}
    cap = O.capture(model, inputs)
    with torch.no_grad():
        exp = O.forward(model, cap["h"], cap["pos"], inputs["attention_mask"].bool(), vis, grid, ops, removed)
    torch.testing.assert_close(logits[:, -1], exp[:, -1], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, O.greedy(model, inputs, STEPS, vis, grid, ops, removed))


def test_failed_install_rolls_back(models, monkeypatch):
    from vlm_tokenprune.structural import hooks

    model = models["sdpa"]
    before = _snapshot(model)

    def boom(handle, plan):
        raise RuntimeError("boom")

    monkeypatch.setattr(hooks, "install_attention", boom)
    with pytest.raises(RuntimeError, match="boom"):
        vtp.patch(model, "prune_heads:heads=1/0,scope=all+skip_layers:layers=2+ffn_cut+neighbor_attention")
    after = _snapshot(model)
    assert after[1] == before[1] and after[4] == before[4] and after[5] == before[5]
    assert all(after[0][n] is m for n, m in before[0].items()) and set(after[0]) == set(before[0])
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_visual_head_pruning_really_slices(models, impl, monkeypatch):
    """YOPO heads, compute path: visual rows get no query in pruned heads, no key/value in a fully
    pruned KV group, and o_proj reads no pruned-head column of theirs; the pruned heads' text
    queries attend the text keys only (one backend call of T text rows x T text keys)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = models[impl]
    inputs, vis, valid, grid = _setup(model)
    attn = model.model.language_model.layers[2].self_attn
    calls = []
    if impl == "sdpa":
        fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa",
                            lambda mod, q, k, v, m, **kw: calls.append((q.shape, k.shape)) or fn(mod, q, k, v, m, **kw))
    else:
        mod_llama = sys.modules[type(attn).__module__]
        fn = mod_llama.eager_attention_forward
        monkeypatch.setattr(mod_llama, "eager_attention_forward",
                            lambda mod, q, k, v, m, **kw: calls.append((q.shape, k.shape)) or fn(mod, q, k, v, m, **kw))
    seen = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    try:
        with torch.no_grad(), vtp.patch(model, "prune_heads:heads=2/2;2/3,scope=visual") as h:
            assert h.structural_attention and "real: visual rows skip the pruned heads" in h.describe()
            model(**inputs)
    finally:
        for x in hooks:
            x.remove()
    d = attn.head_dim
    assert seen["q_proj"][1][vis][:, 2 * d:].abs().max() == 0 and seen["q_proj"][1][vis][:, :2 * d].abs().max() > 0
    for n in ("k_proj", "v_proj"):  # KV head 1 = query heads 2, 3: text rows only
        assert seen[n][1][vis][:, d:].abs().max() == 0 and seen[n][1][~vis][:, d:].abs().max() > 0
    assert seen["o_proj"][0][vis][:, 2 * d:].abs().max() == 0  # attention output of pruned heads for visual rows
    B, L = vis.shape
    n_text = int((~vis).sum(1).max())
    calls = [c for c in calls if c[0][0] == B and c[0][-1] == d]  # the language model's (not the vision tower's)
    assert len(calls) == 5  # layers 0, 1, 3: one call; layer 2: kept heads over everything + pruned heads text x text
    assert (torch.Size([B, 2, L, d]), torch.Size([B, 2, L, d])) in calls
    assert (torch.Size([B, 2, n_text, d]), torch.Size([B, 2, n_text, d])) in calls


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_yopo_composition_matches_oracle(models, impl):
    """The four YOPO parts together (as the yopo presets compose them): neighbour window, visual FFN cut,
    visual heads (compute path, with neighbour chunks for the kept heads), visual tokens dropped at layer 3."""
    model = models[impl]
    inputs, vis, valid, grid = _setup(model)
    cap = O.capture(model, inputs)
    policy = "neighbor_attention:window=3+ffn_cut+prune_heads:heads=1/1;2/2;2/3,scope=visual+visual_drop:layer=3"
    logits, gen, trace = _run(model, policy, inputs)
    ops = {"neighbor": {j: 3 for j in ALL}, "ffn": {j: 64 for j in ALL}, "heads_visual": {1: (1,), 2: (2, 3)}}
    with torch.no_grad():
        exp = O.forward(model, cap["h"], cap["pos"], valid, vis, grid, ops, {3: vis})
        plain = O.forward(model, cap["h"], cap["pos"], valid, vis, grid, {k: v for k, v in ops.items() if k != "heads_visual"},
                          {3: vis})
    torch.testing.assert_close(logits[:, -1], exp[:, -1], atol=2e-5, rtol=1e-4)
    assert (exp - plain)[:, -1].abs().max() > 1e-3  # the heads part matters here
    assert torch.equal(gen, O.greedy(model, inputs, STEPS, vis, grid, ops, {3: vis}))


def test_criteria_read_unsliced_keys(models):
    """A token stage's criterion reads layer K-1's keys: there k/v_proj stay whole even when a KV group's heads
    are all pruned for visual rows, so the kept set is the one without head pruning (layer K-1's own head
    pruning acts on its output, after the criterion's inputs)."""
    model = models["sdpa"]
    inputs, *_ = _setup(model)
    kept = []
    for policy in ("fastv:layer=3,keep=0.5", "fastv:layer=3,keep=0.5+prune_heads:heads=2/2;2/3,scope=visual"):
        with torch.no_grad(), vtp.patch(model, policy) as h:
            model(**inputs)
            kept.append(h.last_trace().stages[0].kept_positions)
    assert kept[0] == kept[1]
