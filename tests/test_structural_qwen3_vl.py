"""Structural ops (YOPO arXiv 2410.06169, FinerCut arXiv 2405.18218, layer skips, visual_drop) on Qwen3-VL and
Qwen3-VL-MoE (issue 21) against the independent masked eager oracle (tests/reference/structural_oracle.py: Qwen3's
per-head q_norm / k_norm, the model's own MoE block for the FFN, DeepStack features captured from the unpatched
model and added after decoder layers 0 .. n - 1 whatever op those layers carry): prefill logits and cached greedy
generate(), eager and sdpa, batch 2 with left padding (``test_structural_models._check``, which also checks that
the oracle with no op is the unpatched model).

Tiny models (``eval.tiny_families.build_tiny_qwen3_vl``): 4 decoder layers, DeepStack injections after layers 0
and 1, so every op listed on layer 1 meets an injection (skip_layers all / visual, pruned heads, removed
sublayers, visual_drop:layer=1 before it); MoE: 4 experts, 2 per token, every layer sparse. On MoE ``ffn_cut``
(the only op that slices gate_proj / up_proj / down_proj) is refused by name, in ``patch()`` and in
``structural_flops`` / ``explain``. Also: composition with FastV below the last injection, videos (a grid per
frame), the flash-attention stand-in (2-D masks), calibration files read from Qwen3 layers, text-only / neutral
no-ops, exact unpatch.
"""
from __future__ import annotations

import functools

import pytest
import torch
from kit import FLASH, assert_patch_refused
from test_structural_models import BANNED, QWEN_POLICIES, STEPS, _check, _qwen_inputs

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError
from vlm_tokenprune.eval.flops import TextGeometry, lm_head_flops, structural_flops
from vlm_tokenprune.eval.tiny_families import build_tiny_qwen3_vl, make_qwen3_batch
from vlm_tokenprune.eval.tiny_models import QWEN_VIDEO_TOKEN_ID, make_qwen_batch
from reference import structural_oracle as O

torch.set_num_threads(1)

# beside test_structural_models.QWEN_POLICIES: ops on layer 1, which an injection follows, and FinerCut sublayers
EXTRA = ["skip_layers:layers=1", "visual_drop:layer=1", "skip_sublayers:attn=1;3,ffn=1;2",
         "skip_sublayers:attn=1;2,ffn=0;1,scope=visual"]
DENSE_POLICIES = QWEN_POLICIES + EXTRA
MOE_POLICIES = [p for p in DENSE_POLICIES if not p.startswith("ffn_cut")]


@functools.cache
def tiny(impl: str, moe: bool):
    return build_tiny_qwen3_vl(impl, moe=moe)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", DENSE_POLICIES)
def test_dense_matches_masked_oracle(impl, policy):
    model = tiny(impl, False)
    inputs, vis, grid = _qwen_inputs(model)
    _check(model, inputs, vis, grid, policy)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", MOE_POLICIES)
def test_moe_matches_masked_oracle(impl, policy):
    model = tiny(impl, True)
    inputs, vis, grid = _qwen_inputs(model)
    _check(model, inputs, vis, grid, policy)


@pytest.mark.parametrize("moe", [False, True])
def test_composes_with_fastv_below_the_last_injection(moe):
    """FastV at layer 1 (its kept set also takes the DeepStack features after layer 1) with YOPO heads, a visual
    layer skip and a visual MLP removal on layers an injection follows: == the oracle given the trace's kept set."""
    model = tiny("sdpa", moe)
    inputs, vis, grid = _qwen_inputs(model)
    valid = inputs["attention_mask"].bool()
    policy = ("fastv:layer=1,keep=0.5+prune_heads:heads=1/1;2/0+skip_layers:layers=1;3,scope=visual"
              "+skip_sublayers:ffn=0,scope=visual")
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), vtp.patch(model, policy) as h:
        logits = model(**inputs).logits
        trace = h.last_trace()
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, suppress_tokens=BANNED + [2])[:, L:]
    kept = torch.zeros_like(vis)
    for b, pos in enumerate(trace.stages[0].kept_positions):
        kept[b, pos] = True
    removed = {1: vis & ~kept}
    ops = {"heads_visual": {1: (1,), 2: (0,)}, "skip_visual": {1, 3}, "ffn_visual": {0}}
    cap = O.capture_rope(model, inputs)
    with torch.no_grad():
        exp = O.forward(model, cap["h"], None, valid, vis, grid, ops, removed, rope=cap["rope"], deepstack=O.deepstack_of(cap))
    torch.testing.assert_close(logits[:, -1], exp[:, -1], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, O.greedy_recapture(model, inputs, STEPS, vis, grid, ops, removed, BANNED + [2]))


VIDEO_ROWS = [[3, "vid", 4], [2, "vid", 3]]
VIDEO_GRIDS = [(2, 2, 3), (3, 3, 2)]  # (t, h, w) in LLM tokens


@pytest.mark.parametrize("policy", ["neighbor_attention:window=3", "skip_layers:layers=1;3,scope=visual",
                                    "prune_heads:heads=1/0;2/2;2/3,scope=visual"])
def test_video_frames_match_masked_oracle(policy):
    """Videos as Qwen3-VL's processor writes them (a timestamp token, then each frame in its own vision group):
    every frame is its own h x w grid (the neighbour window never crosses frames); DeepStack rows per frame."""
    model = tiny("sdpa", False)
    inputs = make_qwen3_batch(model, VIDEO_ROWS, video_grids=VIDEO_GRIDS)
    vis = inputs["input_ids"] == QWEN_VIDEO_TOKEN_ID
    B, L = vis.shape
    row, col, seg = (torch.full((B, L), -1) for _ in range(3))
    for b, (t, h, w) in enumerate(VIDEO_GRIDS):  # one video per row: frames in order, each in raster order
        for k, p in enumerate(vis[b].nonzero()[:, 0].tolist()):
            row[b, p], col[b, p], seg[b, p] = (k % (h * w)) // w, k % w, k // (h * w)
        assert k + 1 == t * h * w
    _check(model, inputs, vis, (row, col, seg), policy)


@pytest.mark.parametrize("moe", [False, True])
def test_visual_heads_and_skips_on_the_flash_standin(moe):
    """A 2-D-mask backend (flash-attention stand-in): YOPO heads split with right-aligned text keys, visual skips
    whose visual attention rows still run (zero queries, discarded), prefill and decode == the oracle."""
    model = tiny(FLASH, moe)
    inputs, vis, grid = _qwen_inputs(model)
    for policy in ("prune_heads:heads=1/0;2/2;2/3,scope=visual", "skip_layers:layers=1;3,scope=visual"):
        _check(model, inputs, vis, grid, policy)


@pytest.mark.parametrize("moe", [False, True])
def test_calibration_reads_the_qwen3_layers(moe):
    """``calibrate()`` on Qwen3-VL (what calibrated prune_heads / efficientvla_layers / finercut policies read):
    YOPO head ratios == the eager model's own attention maps (q_norm / k_norm, M-RoPE); EfficientVLA importance
    over each layer's input (its ``output_hidden_states`` entry + the DeepStack features injected below it) and
    its output (before the injection after it: skipping a layer does not skip the injection)."""
    model = tiny("eager", moe)
    inputs, vis, _ = _qwen_inputs(model)
    valid = inputs["attention_mask"].bool()
    vis = vis & valid
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    ratios = torch.tensor(vtp.calibrate(model, [inputs], what="heads", progress=False)["ratios"])  # [B, layers, heads]
    for b in range(2):
        for j, a in enumerate(out.attentions):
            a = a[b][:, valid[b]][:, :, valid[b]].double()  # real queries x real keys
            v = vis[b][valid[b]]
            torch.testing.assert_close(ratios[b, j].double(), a[:, :, v].sum((1, 2)) / a[:, :, ~v].sum((1, 2)),
                                       rtol=1e-4, atol=1e-6)
    ds = O.capture_rope(model, inputs)["deepstack"]
    hs = out.hidden_states  # embeddings, then each layer's output
    imp = torch.tensor(vtp.calibrate(model, [inputs], what="layers", progress=False)["importance"])
    exp = []
    for j in range(len(hs) - 2):  # the last entry may be after the final norm
        x = hs[j] + (ds[j - 1] if 0 < j <= len(ds) else 0)
        cos = torch.cosine_similarity(x, hs[j + 1], dim=-1)
        exp.append(torch.stack([1 - cos[b][valid[b]].mean() for b in range(2)]).mean())
    torch.testing.assert_close(imp[:-1], torch.stack(exp), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# no-ops and unpatch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("moe", [False, True])
def test_visual_ops_on_a_text_only_prompt_are_exact(moe):
    model = tiny("sdpa", moe)
    inputs = make_qwen_batch(model, [[6], [4]])
    policy = "skip_layers:layers=0;2,scope=visual+neighbor_attention:window=3+prune_heads:heads=1/0" \
             "+skip_sublayers:attn=1,ffn=2,scope=visual" + ("" if moe else "+ffn_cut")
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtp.patch(model, policy):
            out = model(**inputs).logits
    assert torch.equal(out, ref)  # no visual token: the visual-only ops change nothing


@pytest.mark.parametrize("moe", [False, True])
def test_neutral_settings_are_exact(moe):
    """One image per row: a window covering its grid (4 x 3: w = 7) and, dense, ratio 1 change nothing (two images
    in a row would not attend each other); window 1 does."""
    model = tiny("sdpa", moe)
    inputs = make_qwen_batch(model, [[5, "img", 7], [3, "img", 4]], image_grids=[(3, 4), (4, 3)])
    kw = {"max_new_tokens": STEPS, "do_sample": False, "suppress_tokens": BANNED}
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, **kw)
        for policy in ["neighbor_attention:window=7"] + ([] if moe else ["ffn_cut:ratio=1"]):
            with vtp.patch(model, policy):
                out = model(**inputs).logits
                gen = model.generate(**inputs, **kw)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            assert torch.equal(gen, ref_gen)
        with vtp.patch(model, "neighbor_attention:window=1"):
            assert not torch.allclose(model(**inputs).logits[:, -1], ref[:, -1], atol=1e-3)


def _state(model):
    mods = dict(model.named_modules())
    return ({n: sorted(vars(m)) for n, m in mods.items()},
            {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in mods.items()},
            {n: m.num_key_value_groups for n, m in mods.items() if hasattr(m, "num_key_value_groups")},
            model.config.text_config._attn_implementation)


@pytest.mark.parametrize("moe", [False, True])
def test_unpatch_restores_exactly(moe):
    model = tiny("sdpa", moe)
    inputs, *_ = _qwen_inputs(model)
    before = _state(model)
    policies = ["prune_heads:heads=1/0;2/2;2/3,scope=all+skip_layers:layers=1;3,scope=visual+neighbor_attention:window=3",
                "fastv:layer=1,keep=0.5+skip_sublayers:attn=2,ffn=1+prune_heads:heads=1/1"]
    with torch.no_grad():
        ref = model(**inputs).logits
        for policy in policies:
            h = vtp.patch(model, policy)
            assert not torch.equal(model(**inputs).logits[:, -1], ref[:, -1]), policy
            h.unpatch()
        out = model(**inputs).logits
    assert torch.equal(out, ref)
    assert _state(model) == before
    assert all("forward" not in vars(m) for m in model.modules())
    assert "_deepstack_process" not in vars(model.model.language_model)


# ------------------------------------------------------------------------------------------------
# MoE: ffn_cut refused by name
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,field", [
    ("ffn_cut", "stages[0].op"),
    ("ffn_cut:ratio=4,layers=2", "stages[0].op"),
    ("skip_layers:layers=2+ffn_cut:ratio=3", "stages[1].op"),
])
def test_moe_ffn_cut_is_refused_by_name_before_any_hook(policy, field):
    model = tiny("sdpa", True)
    err = assert_patch_refused(model, policy, field)
    msg = str(err)
    assert "Qwen3VLMoeTextSparseMoeBlock" in msg and "mixture of experts" in msg and "no gate_proj" in msg
    assert "allowed on this model: skip_layers, prune_heads, neighbor_attention, skip_sublayers" in msg
    assert "_deepstack_process" not in vars(model.model.language_model)
    assert all("forward" not in vars(m) for m in model.modules())


def test_moe_structural_flops_refuse_ffn_cut_and_count_the_active_experts():
    """``structural_flops`` (what ``explain`` prints) on a MoE geometry: ffn_cut refused by name; removing the
    MoE block removes the active experts' FLOPs (``k * moe_intermediate_size`` channels per token), by hand."""
    cfg = tiny("sdpa", True).config
    with pytest.raises(IncompatiblePolicyError) as e:
        structural_flops(cfg, "skip_layers:layers=2+ffn_cut", 10, 20)
    assert e.value.field == "stages[1].op" and "num_experts=4" in str(e.value)
    g = TextGeometry.of(cfg)
    d, t, v, n = 64, 10, 20, 30
    m = 2 * 64  # 2 experts per token x moe_intermediate_size 64
    assert g.intermediate_size == m
    q, kv = 4 * 16, 2 * 16  # query and KV widths: 4 heads, 2 KV heads of 16

    def layer(attn_rows_q, mlp_rows, attn=True):
        proj = d * q * attn_rows_q * 2 + 2 * d * kv * n  # q and o on the query rows; k, v on every row
        att = 2 * attn_rows_q * n * q  # QK^T + AV over all n keys (causality not counted, as layer_flops)
        return 2 * (proj * attn + 3 * d * m * mlp_rows) + 2 * att * attn

    full = layer(n, n)
    sf = structural_flops(cfg, "skip_sublayers:ffn=1;3", t, v)
    assert sf["flops"] == 2 * full + 2 * layer(n, 0) + lm_head_flops(g)
    assert sf["baseline_flops"] == 4 * full + lm_head_flops(g)
    # visual scope: the visual rows skip the MoE block (layer 2) / the whole layer (layer 3: text queries only)
    sf = structural_flops(cfg, "skip_sublayers:ffn=2,scope=visual+skip_layers:layers=3,scope=visual", t, v)
    text_queries = 2 * (d * q * t * 2 + 2 * d * kv * n + 3 * d * m * t) + 2 * (2 * t * n * q)
    assert sf["flops"] == 2 * full + layer(n, t) + text_queries + lm_head_flops(g)


def test_explain_on_a_moe_geometry(capsys):
    """``explain``: ffn_cut on Qwen3-VL-30B-A3B refused by name (exit 2); the expert line counts the experts a
    removed MoE block / a layer skipped for all tokens saves (by hand: 2 layers' visual rows + 1 layer's rows)."""
    from vlm_tokenprune.cli import main

    assert main(["explain", "skip_layers:layers=5+ffn_cut", "--model-config", "qwen3-vl-30b-a3b"]) == 2
    err = capsys.readouterr().err
    assert "stages[1].op" in err and "num_experts=128" in err and "allowed on this model: skip_layers" in err
    assert main(["explain", "skip_sublayers:ffn=5;9,scope=visual+skip_layers:layers=7",
                 "--model-config", "qwen3-vl-30b-a3b"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("experts"))
    per_token = 2 * 3 * 2048 * 8 * 768  # 8 active experts of width 768, SwiGLU
    saved = per_token * (1024 * 2 + (64 + 1024))
    assert f"saved {saved / 1e12:.4g} TFLOPs" in line


def test_catalogue_row_names_existing_tests():
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert "Qwen3-VL-MoE: `ffn_cut`" in catalogue_rows()[111]
    assert_rows_name_existing_tests((111, 115, 116))


@pytest.mark.parametrize("override,field", [({"mlp_only_layers": [0, 3]}, "text_config.mlp_only_layers"),
                                            ({"decoder_sparse_step": 2}, "text_config.decoder_sparse_step")])
def test_flops_refuse_a_moe_config_with_dense_layers(override, field):
    """FLOPs count one MLP width per layer: a MoE config mixing dense MLP layers is refused by name, not miscounted."""
    from vlm_tokenprune import InputError
    from vlm_tokenprune.eval.tiny_families import tiny_qwen3_vl_config

    cfg = tiny_qwen3_vl_config(moe=True)
    for k, v in override.items():
        setattr(cfg.text_config, k, v)
    with pytest.raises(InputError) as e:
        structural_flops(cfg, "skip_sublayers:ffn=1", 10, 20)
    assert e.value.field == field and "[0" in str(e.value)


@pytest.mark.parametrize("policy", ["skip_sublayers:ffn=1;2,scope=visual", "fastv:layer=2,keep=0.5"])
def test_router_logits_are_refused_by_name_while_patched(policy):
    """The MoE load-balancing loss covers every row of the unpruned sequence; a patched model routes only the rows
    its policy keeps: ``output_router_logits`` (the kwarg or the config's default) is refused by name, and the
    model is usable right after."""
    from vlm_tokenprune import InputError

    model = tiny("sdpa", True)
    inputs, *_ = _qwen_inputs(model)
    text = model.config.text_config
    with torch.no_grad(), vtp.patch(model, policy):
        want = model(**inputs).logits
        with pytest.raises(InputError) as e:
            model(**inputs, output_router_logits=True)
        assert e.value.field == "output_router_logits"
        text.output_router_logits = True
        try:
            with pytest.raises(InputError):
                model(**inputs)
        finally:
            text.output_router_logits = False
        assert torch.equal(model(**inputs).logits, want)
    with torch.no_grad():
        assert model(**inputs, output_router_logits=True).aux_loss is not None  # unpatched: as HF
