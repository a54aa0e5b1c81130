"""Structural ops on Gemma 3 (arXiv 2503.19786; issue 21) against the independent masked oracle
(tests/reference/gemma3_oracle.py: Gemma 3's layers written out, sandwich norms, sliding window of original positions,
bidirectional image block, each op applied per its definition in ``structural.spec``).

Every op is defined on Gemma 3's decoder layer (input / post-attention / pre- and post-feed-forward RMSNorms):
removing a sublayer (``skip_sublayers``, ``scope=visual`` rows) adds nothing to the residual stream, as the post-norm
of a zero output is zero; ``skip_layers`` passes the layer's input through; ``prune_heads`` / ``ffn_cut`` /
``neighbor_attention`` act inside attention / the MLP, on sliding and full layers alike. Refused by name: skipping a
layer (or removing its attention) whose KV cache transformers reads the cache length and mask sizes from (the first
sliding and the first full-attention layer). Tiny Gemma 3: 6 text layers (0-4 slide over 8 positions, 5 is full).
"""
from __future__ import annotations

import functools

import pytest
import torch
from kit import assert_patch_refused, no_hook_left, row_alone
from reference import gemma3_oracle as oracle

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError
from vlm_tokenprune.eval.tiny_gemma3 import build_tiny_gemma3, make_gemma3_batch, tiny_gemma3_config
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID

torch.set_num_threads(1)

ATOL = 1e-5
ROWS = [[3, "img", 2, "img", 6], [2, "img", 5]]  # row 1 shorter: left padded; prompts of 48 / 25 tokens
GEN = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]}
STEPS = 3
M = 128  # the tiny model's intermediate size

# policy -> the oracle's ops (layers 0-4 slide, 5 is full attention)
CASES = {
    "skip_layers:layers=3": {"skip_all": {3}},
    "skip_layers:layers=1;5,scope=visual": {"skip_visual": {1, 5}},
    "prune_heads:heads=1/0;2/2;5/1;5/3,scope=all": {"heads_all": {1: (0,), 2: (2,), 5: (1, 3)}},
    "prune_heads:heads=1/0;2/2;2/3;5/1,scope=visual": {"heads_visual": {1: (0,), 2: (2, 3), 5: (1,)}},
    "ffn_cut:ratio=3": {"ffn": {j: M // 3 for j in range(6)}},
    "neighbor_attention:window=3": {"neighbor": {j: 3 for j in range(6)}},
    "skip_sublayers:attn=1;3,ffn=1;5": {"skip_attn": {1, 3}, "skip_ffn": {1, 5}},
    "skip_sublayers:attn=2;5,ffn=0;1,scope=visual": {"attn_visual": {2, 5}, "ffn_visual": {0, 1}},
}
# token stages with structural ops: the oracle takes the library's kept sets (their selection is proven elsewhere)
COMBINED = {
    "fastv:layer=2,keep=0.25+skip_layers:layers=3+ffn_cut:ratio=2": {"skip_all": {3}, "ffn": {j: M // 2 for j in range(6)}},
    "uniform:site=pre_llm,keep=0.5,positions=gaps+skip_layers:layers=2,scope=visual+prune_heads:heads=1/1;4/0;4/3,scope=visual":
        {"skip_visual": {2}, "heads_visual": {1: (1,), 4: (0, 3)}},
}


@functools.cache
def tiny(attn: str):
    return build_tiny_gemma3(attn)


def _check(model, policy: str, ops: dict, generate: bool) -> None:
    """Prefill logits of every row of the padded batch == the oracle on the row alone (given the token stages' kept
    sets), the op changes the logits, and cached greedy generate == the oracle's cache-free greedy tokens."""
    inputs = make_gemma3_batch(model, ROWS, seed=0)
    L = inputs["input_ids"].shape[1]
    with vtp.patch(model, policy) as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
        gen = model.generate(**inputs, max_new_tokens=STEPS, **GEN)[:, L:] if generate else None
    with torch.no_grad():
        plain = model(**inputs).logits
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        stages = [(0 if st.site == "pre_llm" else st.layer, [p - pad for p in st.kept_positions[b]])
                  for st in trace.stages]
        want = oracle.logits(model, alone, stages, ops=ops)
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0, msg=f"row {b}")
        if generate:
            toks = oracle.generate(model, alone, stages, STEPS, model.generation_config.eos_token_id,
                                   suppress=(IMAGE_TOKEN_ID,), ops=ops)
            assert gen[b].tolist()[:len(toks)] == toks, f"row {b}"
    assert (logits[:, -1] - plain[:, -1]).abs().max() > 1e-3  # the op does something the test can see


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", list(CASES))
def test_structural_op_matches_the_gemma3_oracle(policy, attn):
    """Each op, eager and sdpa, padded batch; cached generate (sliding cache layers, per-layer-type decode masks) on
    sdpa."""
    _check(tiny(attn), policy, CASES[policy], generate=attn == "sdpa")


@pytest.mark.parametrize("policy", list(COMBINED))
def test_structural_ops_with_token_stages_match_the_oracle(policy):
    """With an LLM-site prune (windows over original positions with holes) or a pre-LLM prune: logits and generate."""
    _check(tiny("sdpa"), policy, COMBINED[policy], generate=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_neutral_settings_and_text_only_prompts_are_exact(attn):
    """``ffn_cut:ratio=1`` keeps every channel: the unpatched logits and tokens, bit for bit; a 7 x 7 window covers the
    4 x 4 grid of a row's one image: the unpatched logits (1e-5: sdpa runs the visual queries in chunks) and tokens;
    on a text-only prompt every visual-scope op changes nothing, bit for bit."""
    model = tiny(attn)
    inputs = make_gemma3_batch(model, [[3, "img", 6], [2, "img", 5]], seed=1)
    text = make_gemma3_batch(model, [[9], [5]], seed=1)
    with torch.no_grad():
        ref, ref_text = model(**inputs).logits, model(**text).logits
        ref_gen = model.generate(**inputs, max_new_tokens=STEPS, **GEN)
        with vtp.patch(model, "ffn_cut:ratio=1"):
            assert torch.equal(model(**inputs).logits, ref)
            assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, **GEN), ref_gen)
        with vtp.patch(model, "neighbor_attention:window=7"):
            torch.testing.assert_close(model(**inputs).logits, ref, atol=ATOL, rtol=0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, **GEN), ref_gen)
        with vtp.patch(model, "skip_layers:layers=1,scope=visual+ffn_cut+neighbor_attention+prune_heads:heads=1/0"
                              "+skip_sublayers:attn=2,ffn=3,scope=visual"):
            assert torch.equal(model(**text).logits, ref_text)


def test_unpatch_restores_exactly():
    """After structural ops (sliced heads, wrapped MLPs, the query-subset attention backend, full cache layers kept
    for YOPO heads while decoding): the unpatched logits, cache layer types and generated tokens."""
    model = tiny("sdpa")
    inputs = make_gemma3_batch(model, ROWS, seed=0)
    with torch.no_grad():
        ref = model(**inputs, use_cache=True)
        ref_gen = model.generate(**inputs, max_new_tokens=STEPS, **GEN)
        with no_hook_left(model):
            for policy in [*CASES, *COMBINED]:
                h = vtp.patch(model, policy)
                model.generate(**inputs, max_new_tokens=2, **GEN)
                h.unpatch()
        out = model(**inputs, use_cache=True)
        assert torch.equal(out.logits, ref.logits)
        assert [type(x) for x in out.past_key_values.layers] == [type(x) for x in ref.past_key_values.layers]
        assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, **GEN), ref_gen)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert all("forward" not in vars(m) for m in model.modules())


def _two_full_layers():
    """6 layers, full attention at 1 and 3: skipping layer 1 would leave layer 3 a full mask sized from an empty
    cache layer."""
    from transformers import Gemma3ForConditionalGeneration

    cfg = tiny_gemma3_config()
    cfg.text_config.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                                   "sliding_attention", "sliding_attention"]
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("which,policy,field,match", [
    ("tiny", "skip_layers:layers=5", "stages[0].layers", "layer 5 cannot be skipped for all tokens"),
    ("tiny", "skip_sublayers:attn=3;5", "stages[0].attn", "layer 5's attention cannot be removed"),
    ("tiny", "skip_layers:layers=0", "stages[0].layers", "read at layers 0, 5); allowed: 1..4"),
    ("two_full", "skip_layers:layers=1", "stages[0].layers", "read at layers 0, 1); allowed: 2..5"),
    ("two_full", "skip_sublayers:attn=1", "stages[0].attn", "layer 1's attention cannot be removed"),
])
def test_layers_whose_cache_the_masks_read_are_refused_by_name(which, policy, field, match):
    """The first sliding and the first full-attention layer keep their attention (transformers sizes each layer
    type's mask from that layer's cache); refused in ``patch()`` before any hook. Layer 2 of the two-full-layer model
    is skippable: its cached generate == the oracle."""
    model = tiny("sdpa") if which == "tiny" else _two_full_layers()
    assert_patch_refused(model, policy, field, match)
    if which == "two_full" and field == "stages[0].layers":
        _check(model, "skip_layers:layers=2", {"skip_all": {2}}, generate=True)


def test_searches_and_calibrated_skips_leave_the_mask_layers_running():
    """FinerCut's candidates and the search's sublayer space offer no attention of layers 0 / 5; a calibrated
    ``skip_layers`` (``layers_kept`` of ``of``) never picks them, however unimportant the artifact says they are."""
    from vlm_tokenprune.search.api import build_space
    from vlm_tokenprune.search.finercut import candidates
    from vlm_tokenprune.structural.calibration import select_layers

    model = tiny("sdpa")
    assert [j for kind, j in candidates(model) if kind == "attn"] == [1, 2, 3, 4]
    assert [j for kind, j in candidates(model) if kind == "ffn"] == list(range(6))
    sub = next(p for p in build_space(model, ["sublayers"]).spaces if p.name == "sublayers")
    assert sub.attn_layers == (1, 2, 3, 4) and sub.ffn_layers == tuple(range(6))
    art = {"importance": [0.0, 0.9, 0.2, 0.8, 0.7, 0.0]}  # layers 0 and 5 the "least important"
    assert select_layers(art, 2, protect=(0, 5)) == (2, 4)
    with pytest.raises(IncompatiblePolicyError, match=r"layers 0, 5 always run"):
        select_layers(art, 5, protect=(0, 5), where="stages[0].layers_kept")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_yopo_head_calibration_reads_each_layers_own_rows(attn):
    """``calibrate(what="heads")`` (YOPO's ratio of attention to visual over text keys, every real query row): the
    attention of each layer's own rows, sliding window and image block included == the eager model's
    ``output_attentions`` on the padded batch (a prompt 6x the window)."""
    model = tiny(attn)
    inputs = make_gemma3_batch(model, ROWS, seed=0)
    art = vtp.calibrate(model, [inputs], what="heads", progress=False)
    with torch.no_grad():
        att = tiny("eager")(**inputs, output_attentions=True).attentions  # per layer [B, H, L, L]
    valid = inputs["attention_mask"].bool()
    vis = (inputs["input_ids"] == IMAGE_TOKEN_ID) & valid
    for b in range(len(ROWS)):
        for j, a in enumerate(att):
            rows = a[b][:, valid[b]]  # [H, real queries, L]
            want = rows[..., vis[b]].sum((1, 2)) / rows[..., valid[b] & ~vis[b]].sum((1, 2))
            torch.testing.assert_close(torch.tensor(art["ratios"][b][j]), want, atol=1e-5, rtol=1e-5)
