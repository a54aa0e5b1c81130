"""Models dispatched by accelerate (``from_pretrained(device_map=..., max_memory=..., offload_folder=...)``).

Offloaded decoder layers keep their weights on the meta device between calls and load them in
accelerate's ``AlignDevicesHook``; our hooks must run alongside, give the same outputs as the
in-memory model, and leave accelerate's hooks exactly as they were on ``unpatch()``. Ops that
slice weights (``ffn_cut``, ``prune_heads`` with ``scope=all``) are refused on offloaded layers.
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import UnsupportedModelError
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch

accelerate = pytest.importorskip("accelerate")

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]
# the vision tower and decoder layers 1 and 2 offloaded to disk, everything else in CPU memory
EXPLICIT = {
    "model.vision_tower": "disk", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
    "model.language_model.layers.2": "disk", "model.language_model.layers.3": "cpu",
    "model.language_model.norm": "cpu", "lm_head": "cpu",
}
POLICIES = [
    "fastv:keep=0.25",
    "feather:layer=1,keep=0.3,stride=3+feather:layer=2,keep=0.09,of=current,stride=0",  # multi-stage
    "fastv:layer=2,keep=0.5+skip_layers:layers=2",
    "skip_layers:layers=1;2,scope=visual+prune_heads:heads=1/0;2/3",  # wraps offloaded modules' forwards
    "neighbor_attention:window=3",
    "ffn_cut:layers=3",  # slices weights, but only of layer 3, which stays in memory
    "aim_merge",  # pre_llm
    "mctf:layer=0,keep=0.5",  # vision site (hooks on the offloaded vision tower's layers)
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    d = tmp_path_factory.mktemp("tiny_llava")
    ref = build_tiny_llava("sdpa")
    ref.save_pretrained(d)
    explicit = LlavaForConditionalGeneration.from_pretrained(
        d, device_map=EXPLICIT, offload_folder=str(d / "off_explicit"), attn_implementation="sdpa").eval()
    auto = LlavaForConditionalGeneration.from_pretrained(
        d, device_map="auto", max_memory={"cpu": 300_000}, offload_folder=str(d / "off_auto"),
        attn_implementation="sdpa").eval()
    inputs = make_batch(ref, ROWS)
    with torch.no_grad():  # transformers adds its output-recording hooks on a model's first call: warm up first
        for m in (ref, explicit, auto):
            m(**inputs)
    return ref, explicit, auto


def accelerate_state(model) -> dict:
    """Every module's accelerate hook, its instance ``forward`` / ``_old_forward`` and its torch hook dicts."""
    out = {}
    for name, m in model.named_modules():
        out[name] = (
            id(getattr(m, "_hf_hook", None)), id(m.__dict__.get("forward")), id(m.__dict__.get("_old_forward")),
            tuple(m._forward_pre_hooks), tuple(m._forward_hooks), type(m),
            tuple((n, p.device.type) for n, p in m.named_parameters(recurse=False)),  # offloaded ones are re-created per call
        )
    return out


def offloaded(model, name: str) -> bool:
    m = model.get_submodule(name)
    return getattr(m._hf_hook, "offload", False) and m.weight.is_meta


def test_layers_are_really_offloaded(models):
    _, explicit, auto = models
    assert offloaded(explicit, "model.language_model.layers.1.mlp.gate_proj")
    assert not offloaded(explicit, "model.language_model.layers.3.mlp.gate_proj")
    assert offloaded(explicit, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert "disk" in auto.hf_device_map.values()
    assert offloaded(auto, "model.language_model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("policy", POLICIES)
def test_offloaded_model_equals_in_memory_model(models, policy):
    ref, explicit, _ = models
    inputs = make_batch(ref, ROWS)
    before = accelerate_state(explicit)
    with torch.no_grad():
        with vtp.patch(ref, policy) as h_ref:
            want = ref(**inputs).logits
            want_gen = ref.generate(**inputs, max_new_tokens=4, do_sample=False)
            want_trace = h_ref.last_trace()
        h = vtp.patch(explicit, policy)
        got = explicit(**inputs).logits
        trace = h.last_trace()
        got_gen = explicit.generate(**inputs, max_new_tokens=4, do_sample=False)
        h.unpatch()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.equal(got_gen, want_gen)
    assert [s.kept_positions for s in trace.stages] == [s.kept_positions for s in want_trace.stages]
    assert accelerate_state(explicit) == before  # accelerate's hooks and forwards exactly as they were


def test_auto_device_map_with_max_memory(models):
    ref, _, auto = models
    inputs = make_batch(ref, ROWS)
    before = accelerate_state(auto)
    with torch.no_grad():
        plain = auto(**inputs).logits
        for policy in ("fastv:keep=0.25", "aim_merge"):
            with vtp.patch(ref, policy):
                want = ref(**inputs).logits
                want_gen = ref.generate(**inputs, max_new_tokens=3, do_sample=False)
            with vtp.patch(auto, policy):
                got = auto(**inputs).logits
                got_gen = auto.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert torch.allclose(got, want, atol=1e-5) and torch.equal(got_gen, want_gen)
        assert torch.equal(auto(**inputs).logits, plain)
    assert accelerate_state(auto) == before


@pytest.mark.parametrize("policy, layer", [
    ("ffn_cut", 1),  # every layer; 0 is in memory, 1 is the first offloaded one
    ("fastv:keep=0.5+ffn_cut:layers=2;3", 2),
    ("prune_heads:heads=1/0;3/1,scope=all", 1),
])
def test_weight_slicing_ops_are_refused_on_offloaded_layers(models, policy, layer):
    _, explicit, _ = models
    before = accelerate_state(explicit)
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(explicit, policy)
    assert e.value.field.endswith(".op") and f"decoder layer {layer}." in str(e.value) and "offloaded" in str(e.value)
    assert accelerate_state(explicit) == before  # refused before any hook exists


@pytest.mark.parametrize("policy", ["atp", "covipal:positions=gaps"])
def test_learned_selectors_on_an_offloaded_shipped_model(tmp_path, policy):
    """Learned modules load on the CPU in patch() and follow the hidden states' device on use (the first
    parameter of a dispatched model may be on the meta device)."""
    from transformers import LlavaForConditionalGeneration

    from vlm_tokenprune.eval.synthetic import make_example
    from vlm_tokenprune.eval.tiny_vlm import ASSET_DIR, load_tiny_vlm, prompts

    ref, processor = load_tiny_vlm()
    device_map = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu", "model.language_model": "cpu",
                  "lm_head": "cpu"}
    off = LlavaForConditionalGeneration.from_pretrained(ASSET_DIR, device_map=device_map, dtype=torch.float32,
                                                        offload_folder=str(tmp_path), attn_implementation="sdpa").eval()
    assert next(off.parameters()).device.type == "meta"
    exs = [make_example(2_000_000_000 + i) for i in range(2)]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[e["image"] for e in exs], text=prompts([e["question"] for e in exs]),
                       return_tensors="pt", padding=True)
    outs = []
    for m in (ref, off):
        with vtp.patch(m, policy) as h, torch.no_grad():
            logits = m(**inputs).logits[:, -1]
            outs.append((logits, h.last_trace().stages[0].kept_positions))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    assert outs[1][1] == outs[0][1]
