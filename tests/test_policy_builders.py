"""Typed policy builders (issue 16): each equals its string form, they compose with ``+`` (validated like a
string), and ``Policy.to_yaml()`` round-trips every preset."""
from __future__ import annotations

import inspect

import pytest

import vlm_tokenprune as vtp
from vlm_tokenprune import Policy, PolicyError
from vlm_tokenprune.builders import BUILDERS

CASES = [
    (vtp.FastV(layer=2, keep=0.25), "fastv:layer=2,keep=0.25"),
    (vtp.FastV(), "fastv"),
    (vtp.FastV(layer=8, keep=0.5, depth=32, rounding="floor"), "fastv:layer=8,keep=0.5,depth=32,rounding=floor"),
    (vtp.FEATHER(rope=True), "feather:rope=true"),
    (vtp.PyramidDrop(), "pdrop"),
    (vtp.AIM(tau=0.2), "aim:tau=0.2"),
    (vtp.AIM(layer=2, keep=0.5), "aim:layer=2,keep=0.5"),
    (vtp.FlowCutLLM(layer=3, tokens=20), "flowcut_llm:layer=3,tokens=20"),
    (vtp.EfficientVLA(keep=0.3), "efficientvla:keep=0.3"),
    (vtp.Random(keep=0.1, seed=4), "random:keep=0.1,seed=4"),
    (vtp.Uniform(site="pre_llm", keep=0.5), "uniform:site=pre_llm,keep=0.5"),
    (vtp.ATP(), "atp"),
    (vtp.AIMMerge(keep=0.25, positions="gaps"), "aim_merge:keep=0.25,positions=gaps"),
    (vtp.CoViPAL(), "covipal"),
    (vtp.FlowCutViT(keep=0.25), "flowcut_vit:keep=0.25"),
    (vtp.MCTF(layer=2), "mctf:layer=2"),
    (vtp.FFNCut(ratio=2), "ffn_cut:ratio=2"),
    (vtp.SkipLayers(layers=[5, 9], scope="visual"), "skip_layers:layers=5;9,scope=visual"),
    (vtp.PruneHeads(heads={"2": [0], "3": [1]}), "prune_heads:heads=2/0;3/1"),
    (vtp.NeighborAttention(window=3), "neighbor_attention:window=3"),
    (vtp.VisualDrop(layer=6), "visual_drop:layer=6"),
    (vtp.YOPO(drop=3), "yopo:drop=3"),
]


@pytest.mark.parametrize("built, text", CASES, ids=[t for _, t in CASES])
def test_builder_equals_the_string_form(built, text):
    assert isinstance(built, Policy) and built == Policy.parse(text)


def test_every_builder_is_exported_typed_and_covered():
    covered = {type(b) for b, _ in CASES}
    assert covered == {Policy}
    for name in BUILDERS:
        fn = getattr(vtp, name)
        assert name in vtp.__all__ and fn.__doc__
        sig = inspect.signature(fn)
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD)


def test_plus_composes_and_validates():
    both = vtp.FastV(layer=2, keep=0.25) + vtp.FFNCut(ratio=2)
    assert both == Policy.parse("fastv:layer=2,keep=0.25+ffn_cut:ratio=2")
    assert vtp.Uniform(site="pre_llm", keep=0.5) + "fastv:layer=2,keep=0.25" == \
        Policy.parse("uniform:site=pre_llm,keep=0.5+fastv:layer=2,keep=0.25")
    assert "ffn_cut" + vtp.FastV() == Policy.parse("ffn_cut+fastv")
    with pytest.raises(PolicyError) as e:  # budgets never grow: checked on the sum as on a string
        vtp.FastV(layer=2, keep=0.25) + vtp.FastV(layer=3, keep=0.5)
    assert e.value.field == "stages[1].keep"
    with pytest.raises(PolicyError) as e:
        vtp.FastV(layer=2, keep=2.0)
    assert e.value.field == "stages[0].keep"
    with pytest.raises(TypeError):
        vtp.FastV() + 3


def _parses(name):
    try:
        return Policy.parse(name)
    except PolicyError:
        return None


@pytest.mark.parametrize("name", [n for n in vtp.PRESETS.names() if _parses(n) is not None])
def test_to_yaml_round_trips_every_preset(name):
    pol = Policy.parse(name)
    text = pol.to_yaml()
    assert text.startswith("stages:") and Policy.from_yaml(text) == pol
