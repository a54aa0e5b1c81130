"""Structural ops as policy data: string grammar, dict/JSON round trips, field-named errors."""
from __future__ import annotations

import pytest

from kit import assert_policy_refused
from vlm_tokenprune import Policy, PolicyError

GOOD = [
    "skip_layers:layers=5;9,scope=visual",
    "skip_layers:layers=3",
    "prune_heads:heads=2/0;2/3;3/1,scope=all",
    "prune_heads:heads=2/0",
    "prune_heads:calibration=heads.json,top_n=8",
    "ffn_cut",
    "ffn_cut:ratio=4,layers=1;2",
    "neighbor_attention:window=7",
    "visual_drop:layer=6",
    "efficientvla_layers:calibration=layers.json",
    "prune_heads:calibration=heads.json,kept=0.25,keep_first=1",
    "yopo_12:calibration=heads.json,drop=2",
    "fastv:layer=2,keep=0.5+visual_drop:layer=8+ffn_cut+prune_heads:heads=3/1+neighbor_attention",
]


@pytest.mark.parametrize("text", GOOD)
def test_round_trips(text):
    p = Policy.parse(text)
    assert Policy.parse(p.to_string()) == p
    assert Policy.from_dict(p.to_dict()) == p
    assert Policy.from_json(p.to_json()) == p
    assert all(s.criterion is None and s.budget is None for s in p.structural_stages)


def test_normalised_params():
    p = Policy.parse("skip_layers:layers=9;5,scope=visual+prune_heads:heads=3/1;2/0+ffn_cut")
    s0, s1, s2 = p.stages
    assert s0.params["layers"] == (5, 9) and s0.layer is None
    assert s1.params["heads"] == ((2, 0), (3, 1)) and s1.params["scope"] == "visual"
    assert s1.to_dict()["params"]["heads"] == {"2": [0], "3": [1]}
    assert s2.params == {"ratio": 2.0, "layers": "all"}
    assert Policy.parse("efficientvla_layers:calibration=x.json").stages[0].params["layers_kept"] == 22


@pytest.mark.parametrize("text, field", [
    ("skip_layers", "stages[0].layers"),
    ("skip_layers:layers=a;b", "stages[0].layers"),
    ("skip_layers:layers=2;2", "stages[0].layers"),
    ("skip_layers:layers=2,scope=text", "stages[0].scope"),
    ("skip_layers:layers=2,layer=3", "stages[0].layer"),
    ("skip_layers:layers=2,layers_kept=3", "stages[0].layers_kept"),
    ("skip_layers:calibration=x.json", "stages[0].layers_kept"),
    ("prune_heads:heads=2", "stages[0].heads"),
    ("prune_heads:calibration=x.json", "stages[0].threshold"),
    ("prune_heads:heads=2/1,top_n=3", "stages[0].top_n"),
    ("prune_heads:heads=2/1,kept=0.5", "stages[0].kept"),
    ("prune_heads:calibration=x.json,kept=0", "stages[0].kept"),
    ("prune_heads:calibration=x.json,kept=1.5", "stages[0].kept"),
    ("prune_heads:calibration=x.json,kept=0.5,top_n=2", "stages[0].threshold"),
    ("yopo:heads=2/1", "stages[0].heads"),
    ("yopo_25:drop=0", "stages[0].drop"),
    ("yopo_12:kept=2", "stages[0].kept"),
    ("ffn_cut:ratio=0.5", "stages[0].ratio"),
    ("ffn_cut:what=1", "stages[0].what"),
    ("neighbor_attention:window=4", "stages[0].window"),
    ("visual_drop", "stages[0].layer"),
    ("visual_drop:layer=0", "stages[0].layer"),
    ("visual_drop:layer=4+fastv:layer=6", "stages[1].op"),
    ("fastv:layer=4+visual_drop:layer=3", "stages[1].layer"),
    ("ffn_cut+ffn_cut:ratio=3", "stages[1].op"),
    ("ffn_cut:keep=0.5", "stages[0].keep"),
])
def test_errors_name_the_field(text, field):
    assert_policy_refused(text, field)


def test_dict_errors():
    with pytest.raises(PolicyError) as e:
        Policy.from_dict({"stages": [{"op": "ffn_cut", "criterion": "fastv"}]})
    assert e.value.field == "stages[0].criterion"
    with pytest.raises(PolicyError) as e:
        Policy.from_dict({"stages": [{"op": "merge", "params": {}}]})
    assert e.value.field == "stages[0]" and "criterion" in str(e.value)  # merge is a criterion op (pre_llm)


# -- FLOPs ---------------------------------------------------------------------------------------
from vlm_tokenprune.eval.flops import TextGeometry, layer_flops, policy_flops, structural_flops  # noqa: E402

G = TextGeometry(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 vocab_size=128, num_key_value_heads=2, head_dim=16)


def test_structural_flops_without_structural_ops_is_the_token_formula():
    for pol in ["fastv:layer=2,keep=0.5", "visual_drop:layer=2", "fastv:layer=1,keep=0.5+visual_drop:layer=3"]:
        a, b = structural_flops(G, pol, 10, 36), policy_flops(G, pol, 10, 36)
        assert a["flops"] == a["nominal_flops"] == b["flops"] and a["tokens_per_layer"] == b["tokens_per_layer"]
    assert policy_flops(G, "visual_drop:layer=2", 10, 36)["tokens_per_layer"] == [46, 46, 10, 10]


def test_structural_flops_by_hand():
    t, v, n, d, m = 10, 36, 46, 64, 128
    base = 4 * layer_flops(G, n)
    head = 2 * 64 * 128
    # ffn_cut ratio 2 on layer 1: visual rows' MLP uses 64 of 128 channels
    r = structural_flops(G, "ffn_cut:layers=1", t, v)
    assert r["flops"] == base - 2 * 3 * v * d * (m - 64) + head and r["mask_only"] == []
    # skip layer 2 for all tokens
    assert structural_flops(G, "skip_layers:layers=2", t, v)["flops"] == 3 * layer_flops(G, n) + head
    # prune heads 2 and 3 (a whole KV group) of layer 1 for all tokens: q, o, k, v and attention lose half
    r = structural_flops(G, "prune_heads:heads=1/2;1/3,scope=all", t, v)
    half = 2 * (n * d * 32 + 2 * n * d * 16 + n * 32 * d + 2 * n * n * 32 + 3 * n * d * m)
    assert r["flops"] == 3 * layer_flops(G, n) + half + head
    # YOPO heads with the query-subset attention: visual rows skip head 0's q/o columns; head 0's text queries
    # attend t instead of n keys, its visual queries nothing
    r = structural_flops(G, "prune_heads:heads=1/0", t, v)
    assert r["mask_only"] == []
    assert r["flops"] == r["nominal_flops"] == base + head - 2 * 2 * d * 16 * v - 2 * 2 * 16 * (n * n - t * t)
    # a whole KV group (heads 2, 3): its k/v_proj skip the visual rows too
    r = structural_flops(G, "prune_heads:heads=1/2;1/3", t, v)
    assert r["flops"] == base + head - 2 * 2 * 2 * d * 16 * v - 2 * 2 * 2 * 16 * (n * n - t * t) - 2 * 2 * d * 16 * v
    # ... except where a token stage's criterion captures that layer's keys (fastv at layer 2 reads layer 1)
    r = structural_flops(G, "fastv:layer=2,keep=1.0+prune_heads:heads=1/2;1/3", t, v)
    kv = 2 * 2 * d * 16 * v  # k and v of one KV head for the visual rows
    assert r["flops"] == base + head - 2 * 2 * 2 * d * 16 * v - 2 * 2 * 2 * 16 * (n * n - t * t) == r["nominal_flops"] + kv
    # 2-D-mask backends (flash) split the heads too
    r2 = structural_flops(G, "prune_heads:heads=1/0", t, v, subset_attention=False)
    assert r2["flops"] == structural_flops(G, "prune_heads:heads=1/0", t, v)["flops"] and r2["mask_only"] == []
    # mask-only ops (without the query-subset attention): no change predicted, labelled, nominal below
    r = structural_flops(G, "neighbor_attention:window=3", t, v, subset_attention=False)
    assert r["flops"] == base + head and r["mask_only"] == ["neighbor_attention"]
    # neighbour attention, query-subset path: each visual query attends t + 3 grid rows of 6 keys
    r = structural_flops(G, "neighbor_attention:window=3,layers=1", t, v)
    assert r["mask_only"] == [] and r["flops"] == base + head - 2 * 2 * v * 16 * 4 * (v - 18)
    assert r["nominal_flops"] == base + head - 2 * 2 * v * 16 * 4 * (v - 9)
    # skip visual: real with subset attention (= nominal), partial without
    r = structural_flops(G, "skip_layers:layers=1,scope=visual", t, v)
    assert r["partial"] == [] and r["flops"] == r["nominal_flops"] < base + head
    r = structural_flops(G, "skip_layers:layers=1,scope=visual", t, v, subset_attention=False)
    assert r["partial"] == ["skip_layers(scope=visual)"] and r["nominal_flops"] < r["flops"] < base + head
