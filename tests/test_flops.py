"""Theoretical FLOPs: the formula by hand, LLaVA-1.5-7B ratios, and prediction == real trace."""
from __future__ import annotations

import pytest
import torch
from kit import tiny_llava

from vlm_tokenprune import IncompatiblePolicyError, InputError, patch
from vlm_tokenprune.eval.flops import (
    TextGeometry,
    layer_flops,
    policy_flops,
    prefill_flops,
    trace_flops,
)
from vlm_tokenprune.eval.tiny_models import make_batch

# Vicuna-7B, the LLM of LLaVA-1.5-7B
LLAVA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000}


def test_layer_flops_by_hand_mha():
    d, m, n = 4096, 11008, 640
    assert layer_flops(LLAVA_7B, n) == 2 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)
    # 2*(4*640*4096^2 + 2*640^2*4096 + 3*640*4096*11008), written out
    assert layer_flops(LLAVA_7B, n) == 2 * (42_949_672_960 + 3_355_443_200 + 86_570_434_560)


def test_layer_flops_by_hand_gqa():
    # d=64, 4 heads x 16, 2 kv heads -> q,o: n*64*64 each; k,v: n*64*32 each
    g = TextGeometry(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     vocab_size=128, num_key_value_heads=2, head_dim=16)
    n = 10
    q_o = 2 * (10 * 64 * 64)        # 81_920
    k_v = 2 * (10 * 64 * 32)        # 40_960
    attn = 2 * (10 * 10 * 64)       # QK^T + AV: 12_800
    mlp = 3 * (10 * 64 * 128)       # 245_760
    assert layer_flops(g, n) == 2 * (q_o + k_v + attn + mlp) == 762_880


def test_prefill_adds_lm_head_for_logit_rows():
    per = layer_flops(LLAVA_7B, 100)
    assert prefill_flops(LLAVA_7B, [100] * 32) == 32 * per + 2 * 4096 * 32000
    assert prefill_flops(LLAVA_7B, [100] * 32, logits_tokens=100) == 32 * per + 100 * 2 * 4096 * 32000
    with pytest.raises(InputError, match="tokens_per_layer"):
        prefill_flops(LLAVA_7B, [100] * 31)


def test_llava_1_5_7b_fastv_ratio():
    out = policy_flops(LLAVA_7B, "fastv:layer=2,keep=0.5", n_text=64, n_visual=576)
    assert out["tokens_per_layer"] == [640, 640] + [352] * 30
    # methods.md section 12: 57.1 % with the 2-matrix MAC formula; the exact 3-matrix one is within 0.5 %
    assert out["ratio"] == pytest.approx(0.571, abs=0.005)
    assert out["baseline_flops"] == pytest.approx(8.50e12, rel=0.002)  # "8.50 TFLOPs (exact)"
    # scoring, separate: q_proj on the last row + one row of logits over the 640 captured keys
    assert out["scoring_flops"] == 2 * 4096 * 4096 + 2 * 640 * 4096
    assert out["lower_bound_stages"] == []
    k3 = policy_flops(LLAVA_7B, "fastv:layer=3,keep=0.5", 64, 576)["ratio"]
    assert k3 == pytest.approx(0.585, abs=0.005)
    r75 = policy_flops(LLAVA_7B, "fastv:layer=2,keep=0.25", 64, 576)["ratio"]
    assert r75 == pytest.approx(0.361, abs=0.005)


def test_policy_schedule_rules():
    out = policy_flops(LLAVA_7B, "fastv:layer=2,keep=0.5+random:layer=8,tokens=10", 64, 576)
    assert out["tokens_per_layer"] == [640] * 2 + [352] * 6 + [74] * 24
    assert policy_flops(LLAVA_7B, "uniform:layer=2,keep=0.001", 64, 576)["tokens_per_layer"][-1] == 65  # max(1, ...)
    keep_all = policy_flops(LLAVA_7B, "fastv:keep=1", 64, 576)
    assert keep_all["ratio"] == 1.0 and keep_all["scoring_flops"] == 0.0
    with pytest.raises(IncompatiblePolicyError, match=r"stages\[0\]\.layer"):
        policy_flops(LLAVA_7B, "fastv:layer=32", 64, 576)
    with pytest.raises(IncompatiblePolicyError, match=r"stages\[0\]\.tokens"):
        policy_flops(LLAVA_7B, "fastv:tokens=600", 64, 576)


def test_budget_of_current_and_lower_bounds():
    out = policy_flops(LLAVA_7B, "fastv:layer=2,keep=0.5+fastv:layer=4,keep=0.5,of=current", 64, 576)
    assert out["tokens_per_layer"] == [640] * 2 + [352] * 2 + [64 + 144] * 28
    feather = policy_flops(LLAVA_7B, "feather", 64, 576)  # top 30 % (+ a stride-3 grid), then 9 % of what is left
    assert feather["tokens_per_layer"][8] == 64 + 172 and feather["tokens_per_layer"][16] == 64 + 15  # int(), as FEATHER
    assert feather["lower_bound_stages"] == [0, 1]  # FEATHER's own select may keep more than the budget
    # softmax over the visual keys only: logits over 576 (then 173) keys
    assert feather["scoring_flops"] == 2 * (2 * 4096 * 4096) + 2 * 576 * 4096 + 2 * 172 * 4096
    assert policy_flops(LLAVA_7B, "aim", 64, 576)["scoring_flops"] is None  # no estimate: unknown, not 0


def test_geometry_from_configs():
    model = tiny_llava()
    g = TextGeometry.of(model.config)  # a VLM config -> its text_config
    assert (g.hidden_size, g.num_key_value_heads, g.head_dim) == (64, 2, 16)
    assert TextGeometry.of(model.config.to_dict()) == g  # a config.json-style mapping
    with pytest.raises(InputError, match="intermediate_size"):
        TextGeometry.of({"hidden_size": 8})


@pytest.mark.parametrize("policy", ["fastv:layer=2,keep=0.25", "fastv:layer=1,keep=0.5+uniform:layer=3,tokens=4"])
def test_trace_flops_matches_prediction(policy):
    torch.manual_seed(0)
    model = tiny_llava()
    batch = make_batch(model, [[5, "img", 7]])
    n_visual = int((batch["input_ids"] == model.config.image_token_id).sum())
    n_text = batch["input_ids"].shape[1] - n_visual
    with patch(model, policy) as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        trace = h.last_trace()
    measured = trace_flops(model.config, trace)
    predicted = policy_flops(model.config, policy, n_text, n_visual)
    assert measured["tokens_per_layer"] == predicted["tokens_per_layer"]
    assert measured["flops"] == predicted["flops"]
    assert measured["ratio"] == pytest.approx(predicted["ratio"])
    assert measured["scoring_flops"] == pytest.approx(predicted["scoring_flops"])


def test_trace_flops_counts_what_a_grid_union_really_kept():
    model = tiny_llava()
    batch = make_batch(model, [[5, "img", 7]])
    policy = {"stages": [{"criterion": "feather", "layer": 2, "keep": 0.25, "params": {"stride": 3}}]}
    with patch(model, policy) as h, torch.no_grad():
        model(**batch, logits_to_keep=1)
        trace = h.last_trace()
    predicted = policy_flops(model.config, policy, 13, 36)  # budget: 9 of 36 visual tokens
    measured = trace_flops(model.config, trace, policy=policy)
    assert predicted["tokens_per_layer"] == [49, 49, 22, 22]
    assert measured["tokens_per_layer"][2] == 13 + trace.stages[0].visual_after[0] >= 22
    assert measured["flops"] >= predicted["flops"]
    assert measured["scoring_flops"] == pytest.approx(2 * 64 * 64 + 2 * 36 * 64)  # last row over the 36 visual keys
