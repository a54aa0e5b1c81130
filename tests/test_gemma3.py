"""Gemma 3 adapter (arXiv 2503.19786): sliding window over ORIGINAL positions and the bidirectional image block
over the kept image tokens, in prefill and in cached decoding, against the independent masked oracle
(tests/reference/gemma3_oracle.py: the unpruned sequence with the pruned tokens masked out, plain loops).

Tiny Gemma 3 from a config (real transformers classes, random weights): 6 text layers (0-4 slide over 8
positions, 5 is full attention), 16 image tokens per image (4 x 4 after the projector's pooling), prompts of
25-45 tokens, so the window bites. eager and sdpa; flash-attention-style backends are refused by name.
"""
from __future__ import annotations

import functools

import pytest
import torch
from kit import (FLASH, assert_generate_matches_rows_alone, assert_unpatch_restores, k_of, no_hook_left,
                 positions_of, row_alone)
from reference import gemma3_oracle as oracle
from reference import uniform_oracle

import vlm_tokenprune as vtp
from vlm_tokenprune import IncompatiblePolicyError, InputError, UnsupportedModelError
from vlm_tokenprune.adapters import resolve_adapter
from vlm_tokenprune.eval.tiny_gemma3 import build_tiny_gemma3, make_gemma3_batch, tiny_gemma3_config
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID
from vlm_tokenprune.methods.base import Criterion
from vlm_tokenprune.registry import CRITERIA

torch.set_num_threads(1)

ATOL = 1e-5
ROWS = [[3, "img", 2, "img", 6], [2, "img", 5]]  # row 1 shorter: left padded
BACKENDS = ("eager", "sdpa")
GEN = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN_ID]}


@functools.cache
def tiny(attn: str, window: int = 8):
    return build_tiny_gemma3(attn, sliding_window=window)


def batch(model, seed: int = 0) -> dict:
    return make_gemma3_batch(model, ROWS, seed=seed)


def image_positions(inputs: dict) -> list[int]:
    return positions_of(inputs, (IMAGE_TOKEN_ID,))


def assert_rows_match_oracle(model, inputs, trace, logits, layer_of=None):
    """Every row of a padded batch: the library's kept sets (per stage, from the trace), fed to the oracle on the
    row alone, give the library's logits."""
    L = inputs["input_ids"].shape[1]
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        stages = [(0 if st.site == "pre_llm" else st.layer, [p - pad for p in st.kept_positions[b]])
                  for st in trace.stages]
        want = oracle.logits(model, alone, stages)
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0, msg=f"row {b}")


# ------------------------------------------------------------------------------------------------
# layout, oracle
# ------------------------------------------------------------------------------------------------
def test_every_image_is_a_pooled_square_grid():
    model = tiny("sdpa")
    inputs = batch(model)
    lay = resolve_adapter(model).visual_layout(model, inputs["input_ids"], inputs)
    v0 = lay.is_visual[0]
    assert lay.image[0][v0].tolist() == [0] * 16 + [1] * 16 and torch.equal(lay.segment, lay.image)
    assert lay.row[0][v0][:16].tolist() == [i // 4 for i in range(16)]
    assert lay.col[0][v0][:16].tolist() == [i % 4 for i in range(16)]


def test_oracle_is_the_plain_model_and_the_window_is_over_original_positions():
    """Nothing pruned: the oracle == the model. Pruned: the patched model == the oracle, and NOT the language
    model run on the shortened sequence with its own masks (a window over kept slots, the wrong semantics)."""
    model = tiny("eager")
    inputs = batch(model)
    alone = row_alone(inputs, ROWS, 0)
    with torch.no_grad():
        torch.testing.assert_close(oracle.logits(model, alone, []), model(**alone).logits[0], atol=ATOL, rtol=0)
    img = image_positions(alone)
    keep = img[::4]
    with vtp.patch(model, {"stages": [{"criterion": "uniform", "site": "pre_llm", "tokens": len(keep),
                                       "positions": "gaps"}]}) as h, torch.no_grad():
        got = model(**alone).logits[0]
        kept = h.last_trace().stages[0].kept_positions[0]
    want = oracle.logits(model, alone, [(0, kept)])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    n = alone["input_ids"].shape[1]
    seq = [p for p in range(n) if p not in set(img) or p in set(kept)]
    emb = oracle.prompt_embeds(model, alone)[:, seq]
    with torch.no_grad():  # the text model on the shortened sequence, its own masks: windows over kept slots
        hs = model.model.language_model(inputs_embeds=emb, attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                                        position_ids=torch.tensor([seq])).last_hidden_state
        compacted = model.lm_head(hs)[0]
    assert (compacted - got).abs().max() > 1e-3  # the test can fail: kept slots are not original positions


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_keep_all_is_exactly_unpatched(attn):
    """Forward, cached generate, and the cache itself (sliding layers back, holding what the unpatched prefill holds)."""
    model = tiny(attn)
    inputs = batch(model)
    with torch.no_grad():
        ref = model(**inputs, use_cache=True)
        ref_gen = model.generate(**inputs, max_new_tokens=6, **GEN)
        for policy in ("fastv:keep=1+uniform:layer=3,keep=1", "uniform:site=pre_llm,keep=1,positions=gaps"):
            with vtp.patch(model, policy):
                out = model(**inputs, use_cache=True)
                assert torch.equal(out.logits, ref.logits)
                cache, want = out.past_key_values, ref.past_key_values
                assert [type(x) for x in cache.layers] == [type(x) for x in want.layers]
                assert all(torch.equal(a.keys, b.keys) and a.get_seq_length() == b.get_seq_length()
                           for a, b in zip(cache.layers, want.layers))
                assert torch.equal(model.generate(**inputs, max_new_tokens=6, **GEN), ref_gen)


def test_unpatch_restores_exactly():
    model = tiny("sdpa")
    assert_unpatch_restores(model, batch(model), ("fastv:layer=2,keep=0.25",
                                                  "uniform:site=pre_llm,keep=0.5,positions=gaps+fastv:layer=2,keep=0.3"))


def test_a_pruned_prefill_leaves_full_cache_layers_with_the_kept_tokens():
    model = tiny("sdpa")
    inputs = batch(model)
    with vtp.patch(model, "fastv:layer=2,keep=0.25") as h, torch.no_grad():
        out = model(**inputs, use_cache=True)
        n = h.last_trace().tokens_per_layer
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = out.past_key_values.layers
    assert not any(isinstance(x, DynamicSlidingWindowLayer) for x in layers)
    assert all(isinstance(x, DynamicLayer) for x in layers)
    assert [x.get_seq_length() for x in layers] == n  # layers 0-1 the whole prompt, 2-5 the kept tokens


# ------------------------------------------------------------------------------------------------
# FastV and uniform pre-LLM == oracle (selection and logits), padded batch, both backends
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("layer,keep", [(2, 0.25), (4, 0.5)])
def test_fastv_prefill_matches_oracle_row_by_row(attn, layer, keep):
    """A 24-position window at the (sliding) scoring layer: row 0's last token sees its second image only, so the
    first image scores 0 and the cut falls inside the second (the scores are the layer's own attention row)."""
    model = tiny(attn, 24)
    inputs = batch(model)
    with vtp.patch(model, f"fastv:layer={layer},keep={keep}") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        scores = oracle.fastv_scores(model, alone, layer)
        k = k_of(keep, len(scores))
        s = sorted(scores.values(), reverse=True)
        assert s[k - 1] - s[k] > 1e-6, "ill-conditioned case"
        want_keep = oracle.top_k(scores, k)
        assert trace.stages[0].kept_positions[b] == [p + pad for p in want_keep], f"row {b}"
    assert_rows_match_oracle(model, inputs, trace, logits)


@pytest.mark.parametrize("attn", BACKENDS)
def test_uniform_pre_llm_matches_oracle(attn):
    model = tiny(attn)
    inputs = batch(model)
    keep = 0.3
    with vtp.patch(model, f"uniform:site=pre_llm,keep={keep},positions=gaps") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        vis = image_positions(alone)
        grids = [{"cells": {(i // 4, i % 4): vis[t * 16 + i] for i in range(16)}, "other": []}
                 for t in range(len(vis) // 16)]
        want_keep = uniform_oracle.kept(grids, k_of(keep, len(vis)))
        assert [p - pad for p in trace.stages[0].kept_positions[b]] == want_keep, f"row {b}"
    assert_rows_match_oracle(model, inputs, trace, logits)


def test_without_token_type_ids_there_is_no_image_block_and_the_oracle_agrees():
    """No ``token_type_ids`` (the model then builds no bidirectional block): the patched model == the oracle without
    a block, and differs from the run with the block (the block is really in the masks the layers get)."""
    model = tiny("sdpa")
    inputs = batch(model)
    plain = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with vtp.patch(model, "fastv:layer=2,keep=0.25") as h, torch.no_grad():
        logits = model(**plain).logits
        trace = h.last_trace()
        with_block = model(**inputs).logits
    assert_rows_match_oracle(model, plain, trace, logits)
    assert (with_block - logits).abs().max() > 1e-3


# every other LLM-site / pre-LLM method: its kept sets (selection proven against its own oracle on other families)
# through Gemma 3's masks == the masked oracle given those sets
METHODS = [
    "aim:layer=2,keep=0.3", "dart:layer=2,keep=0.3", "divprune:site=llm,layer=2,keep=0.3,positions=gaps",
    "efficientvla:layer=2,keep=0.3", "feather:layer=2,keep=0.3", "flowcut_llm:layer=2,keep=0.3",
    "random:layer=3,keep=0.3", "uniform:layer=2,keep=0.3", "pdrop",
    "fastv:layer=2,keep=0.5+visual_drop:layer=4",
    "divprune:site=pre_llm,keep=0.3,positions=gaps", "random:site=pre_llm,keep=0.3",
    "uniform:site=pre_llm,keep=0.5,positions=gaps+fastv:layer=1,keep=0.4",
]


@pytest.mark.parametrize("policy", METHODS)
def test_method_matches_masked_oracle_given_its_kept_sets(policy):
    model = tiny("sdpa")
    inputs = batch(model)
    with vtp.patch(model, policy) as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    assert any(st.visual_after != st.visual_before for st in trace.stages)
    assert_rows_match_oracle(model, inputs, trace, logits)


# ------------------------------------------------------------------------------------------------
# several query rows at a sliding scoring layer: each row its own window of original positions
# ------------------------------------------------------------------------------------------------
class ProbeRows(Criterion):
    """Test criterion: records ``ctx.attention`` of EVERY current token (text, image and padding slots) as query rows."""

    name = "test_gemma3_probe_rows"
    seen: dict = {}

    def score(self, ctx):
        B, M = ctx.seq_valid.shape
        ProbeRows.seen = {"att": ctx.attention(query=torch.arange(M).expand(B, M), query_ok=ctx.seq_valid),
                          "vis": ctx.visual_idx, "vis_ok": ctx.visual_ok, "valid": ctx.seq_valid}
        return ctx.visual_ok.float()


@pytest.fixture
def probe_rows():
    CRITERIA.register(ProbeRows.name, ProbeRows())
    yield ProbeRows
    CRITERIA.unregister(ProbeRows.name)


@pytest.mark.parametrize("attn", BACKENDS)
def test_every_query_row_reads_the_sliding_layers_own_row(attn, probe_rows):
    """All 48 rows of the padded batch at once (the prompt is 6x the window): the rows a criterion reads == the unpatched
    eager model's own attention probabilities of that sliding layer (``output_attentions``): per-row windows, the image
    rows' bidirectional block (keys after the query), padding."""
    model = tiny(attn)
    inputs = batch(model)
    with torch.no_grad():
        own = tiny("eager")(**inputs, output_attentions=True).attentions[1]  # layer 1 scores a stage at layer 2
    with vtp.patch(model, f"{probe_rows.name}:layer=2,keep=0.5"), torch.no_grad():
        model(**inputs)
    seen = probe_rows.seen
    vis, ok, valid = seen["vis"], seen["vis_ok"], seen["valid"]
    H, L = own.shape[1], own.shape[2]
    want = torch.gather(own, 3, vis[:, None, None, :].expand(-1, H, L, -1)) * ok[:, None, None, :] * valid[:, None, :, None]
    torch.testing.assert_close(seen["att"], want, atol=ATOL, rtol=0)
    img0 = vis[0, 0]
    assert float(want[0, :, -1, 0].abs().max()) == 0.0  # the window bites: the last row does not see the first image
    assert float(want[0, :, img0, 1:16].min()) > 0  # an image row sees the later tokens of its block


@pytest.mark.parametrize("softmax_over", ["row", "keys"])
def test_row_keys_replace_the_causal_rule(softmax_over):
    """``ops.attention_scores(row_keys=...)``: the causal rows as row_keys reproduce the causal result; a row's own key
    set renormalises over it (the Triton kernel == this reference: test_kernels::test_attention_scores_with_row_keys_match_reference)."""
    from vlm_tokenprune import ops

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, R, L, d = 2, 4, 2, 3, 9, 8
    q, k = torch.randn(B, H, R, d, generator=g), torch.randn(B, Hkv, L, d, generator=g)
    q_idx = torch.tensor([[4, 6, 8], [2, 7, 8]])
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 0] = False
    sub, sub_ok = torch.tensor([[0, 1, 3, 5]] * B), torch.ones(B, 4, dtype=torch.bool)
    kw = dict(scaling=0.3, subset=sub, subset_ok=sub_ok, softmax_over=softmax_over, reduce="none")
    causal = torch.arange(L)[None, None, :] <= q_idx[:, :, None]
    want = ops.attention_scores(q, k, q_idx, valid, backend="torch", **kw)
    torch.testing.assert_close(ops.attention_scores(q, k, q_idx, valid, row_keys=causal, backend="torch", **kw),
                               want, atol=0, rtol=0)
    window = causal & (torch.arange(L)[None, None, :] > q_idx[:, :, None] - 4)  # each row its own 4 keys
    got = ops.attention_scores(q, k, q_idx, valid, row_keys=window, backend="torch", **kw)
    assert float(got[..., 0].abs().max()) == 0 and bool((got[0, :, 0, 1:3] > 0).all())  # row 0 (q=4): keys 1..4
    assert not torch.allclose(got, want)


@pytest.mark.parametrize("attn", BACKENDS)
def test_efficientvla_at_a_sliding_layer_on_a_long_prompt_matches_oracle(attn):
    """EfficientVLA's instruction rows (the prompt is 6x the window): relevance from each row's own window of original
    positions (oracle: the written-out layer, itself == ``output_attentions``): same kept sets, same logits, padded
    batch. Scoring every row over its whole causal prefix (ignoring the window) would keep other tokens."""
    model = tiny(attn)
    inputs = batch(model)
    with vtp.patch(model, "efficientvla:layer=2,keep=0.3") as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        k = k_of(0.3, len(image_positions(alone)))
        want = oracle.efficientvla_keep(model, alone, 2, k)
        assert trace.stages[0].kept_positions[b] == [p + pad for p in want], f"row {b}"
        assert oracle.efficientvla_keep(tiny(attn, 64), alone, 2, k) != want  # the windows change the selection
    assert_rows_match_oracle(model, inputs, trace, logits)
    if attn == "eager":  # the oracle's written-out rows are the model's own
        alone = row_alone(inputs, ROWS, 0)
        with torch.no_grad():
            own = model(**alone, output_attentions=True).attentions[1][0]
        x = oracle.prompt_embeds(model, alone)[0]
        T = x.shape[0]
        every = set(range(T))
        h0 = oracle.layer_forward(model, 0, x, every, oracle.image_blocks(alone))
        torch.testing.assert_close(oracle.layer_probs(model, 1, h0, every, oracle.image_blocks(alone)), own,
                                   atol=ATOL, rtol=0)


def test_efficientvla_after_a_pre_llm_prune_windows_over_original_positions():
    """Holes left by a pre-LLM prune: each instruction row's window is over ORIGINAL positions (a pruned token pulls
    nothing older in) == oracle given the first stage's kept set, selection and logits."""
    model = tiny("sdpa")
    inputs = batch(model)
    with vtp.patch(model, "uniform:site=pre_llm,keep=0.5,positions=gaps+efficientvla:layer=2,keep=0.25") as h, \
            torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        first = [p - pad for p in trace.stages[0].kept_positions[b]]
        want = oracle.efficientvla_keep(model, alone, 2, trace.stages[1].visual_after[b], [(0, first)])
        assert trace.stages[1].kept_positions[b] == [p + pad for p in want], f"row {b}"
    assert_rows_match_oracle(model, inputs, trace, logits)


@pytest.mark.parametrize("attn", BACKENDS)
def test_pre_llm_merge_matches_oracle_given_the_assignment(attn):
    """AIM before the LLM (``mode=size``: a fused token is the plain mean of its sources), at the representative's
    original position; == the oracle on the unpruned sequence with that row written in and the rest masked out."""
    model = tiny(attn)
    inputs = batch(model)
    with vtp.patch(model, "aim_merge:keep=0.25,mode=size,positions=gaps") as h, torch.no_grad():
        logits = model(**inputs).logits
        st = h.last_trace().stages[0]
    assert any(len(src) > 1 for row in st.sources for src in row)
    L = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = row_alone(inputs, ROWS, b)
        pad = L - alone["input_ids"].shape[1]
        emb = oracle.prompt_embeds(model, alone).clone()
        for p, src in zip(st.kept_positions[b], st.sources[b]):
            emb[0, p - pad] = emb[0, [q - pad for q in src]].mean(0)
        want = oracle.logits(model, alone, [(0, [p - pad for p in st.kept_positions[b]])], embeds=emb)
        torch.testing.assert_close(logits[b, -want.shape[0]:], want, atol=ATOL, rtol=0, msg=f"row {b}")


# ------------------------------------------------------------------------------------------------
# cached generate == oracle (decode masks over original positions, sliding layers kept whole)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fastv:layer=2,keep=0.25", "uniform:site=pre_llm,keep=0.3,positions=gaps",
                                    "uniform:site=pre_llm,keep=0.5,positions=gaps+fastv:layer=3,keep=0.4"])
def test_cached_generate_matches_oracle(policy):
    model = tiny("sdpa")
    inputs = make_gemma3_batch(model, [[4, "img", 9]], seed=1)
    L = inputs["input_ids"].shape[1]
    with vtp.patch(model, policy) as h, torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=6, **GEN)
        model(**inputs)
        trace = h.last_trace()
    stages = [(0 if st.site == "pre_llm" else st.layer, st.kept_positions[0]) for st in trace.stages]
    want = oracle.generate(model, inputs, stages, 6, model.generation_config.eos_token_id, suppress=(IMAGE_TOKEN_ID,))
    assert g[0, L:].tolist()[:len(want)] == want


@pytest.mark.parametrize("policy", ["fastv:layer=2,keep=0.25",
                                    "uniform:site=pre_llm,keep=0.5,positions=gaps+fastv:layer=3,keep=0.4"])
def test_a_chunk_appended_to_the_cache_matches_oracle(policy):
    """Three tokens at once after a pruned prompt (decode masks with several query rows, sliding layers kept whole)."""
    from kit import cache_kwargs

    model = tiny("sdpa")
    inputs = make_gemma3_batch(model, [[4, "img", 9]], seed=3)
    L = inputs["input_ids"].shape[1]
    new = torch.tensor([[17, 23, 41]])
    with vtp.patch(model, policy) as h, torch.no_grad():
        out = model(**inputs, use_cache=True)
        stages = [(0 if st.site == "pre_llm" else st.layer, st.kept_positions[0]) for st in h.last_trace().stages]
        got = model(input_ids=new, attention_mask=torch.ones(1, L + 3, dtype=torch.long), use_cache=True,
                    **cache_kwargs(out)).logits[0]
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], new], 1),
            "token_type_ids": torch.cat([inputs["token_type_ids"], torch.zeros_like(new)], 1)}
    torch.testing.assert_close(got, oracle.logits(model, full, stages)[-3:], atol=ATOL, rtol=0)


def test_patched_generate_logs_no_deprecation_warning(monkeypatch):
    """With and without the cache: the hooks ask transformers' outputs for the cache under its current name only."""
    import logging

    seen = []

    class Record(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, *a, **k: self.warning(*a, **k))  # not cached
    handler = Record()
    logging.getLogger("transformers").addHandler(handler)
    try:
        model = tiny("sdpa")
        inputs = make_gemma3_batch(model, [[4, "img", 9]], seed=1)
        with vtp.patch(model, "fastv:layer=2,keep=0.25"), torch.no_grad():
            for use_cache in (False, True):
                model.generate(**inputs, max_new_tokens=2, use_cache=use_cache, **GEN)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in seen if "deprecated" in m], seen


def test_padded_batch_generate_matches_rows_alone_on_the_oracle():
    model = tiny("eager")
    inputs = batch(model, seed=2)
    policy = "fastv:layer=2,keep=0.25"

    def row_generate(alone):
        with vtp.patch(model, policy) as h, torch.no_grad():
            model(**alone)
            stages = [(st.layer, st.kept_positions[0]) for st in h.last_trace().stages]
        return oracle.generate(model, alone, stages, 5, model.generation_config.eos_token_id, suppress=(IMAGE_TOKEN_ID,))

    assert_generate_matches_rows_alone(model, inputs, ROWS, policy, row_generate, steps=5,
                                       suppress_tokens=[IMAGE_TOKEN_ID])


# ------------------------------------------------------------------------------------------------
# refusals (docs/bad-inputs.md)
# ------------------------------------------------------------------------------------------------
def test_flash_style_backend_is_refused_by_name():
    model = build_tiny_gemma3(FLASH, layers=2)
    with no_hook_left(model), pytest.raises(UnsupportedModelError) as e:
        vtp.patch(model, "fastv:layer=1,keep=0.5")
    assert e.value.field == "attn_implementation" and "sliding window" in str(e.value)


@pytest.mark.parametrize("policy,field,match", [
    ("mctf:keep=0.5", "stages[0].criterion", "towers with a CLS token only"),  # vispruner runs: test_gemma3_vision_site
    ("visionzip:keep=0.5", "stages[0].criterion", "'visionzip' needs the vision tower's CLS token"),
    ("flowcut_vit:keep=0.5", "stages[0].criterion", "SigLIP tower has no CLS token"),
    ("fastv:layer=2,keep=0.5,positions=repack", "stages[0].positions", "original positions"),
    ("uniform:site=pre_llm,keep=0.5,positions=repack", "stages[0].positions", "original positions"),
    ("fastv:layer=6,keep=0.5", "stages[0].layer", "allowed: 1..5"),
])
def test_policies_refused_by_name_before_any_hook(policy, field, match):
    model = tiny("sdpa")
    with no_hook_left(model), pytest.raises((IncompatiblePolicyError, vtp.PolicyError)) as e:
        vtp.patch(model, policy)
    assert e.value.field == field and match in str(e.value), str(e.value)


def test_bidirectional_text_model_is_refused():
    from transformers import Gemma3ForConditionalGeneration

    cfg = tiny_gemma3_config(layers=2)
    cfg.text_config.use_bidirectional_attention = True
    model = Gemma3ForConditionalGeneration._from_config(cfg).eval()
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(model, "fastv:layer=1,keep=0.5")
    assert e.value.field == "config.text_config.use_bidirectional_attention"


def test_partial_image_names_input_ids():
    model = tiny("sdpa")
    inputs = batch(model)
    ids = inputs["input_ids"].clone()
    ids[1, -1] = IMAGE_TOKEN_ID
    with vtp.patch(model, "fastv:layer=2,keep=0.5"), pytest.raises(InputError, match=r"mm_tokens_per_image"):
        model(**{**inputs, "input_ids": ids})


def test_catalogue_rows_of_gemma3_name_existing_tests():
    """docs/bad-inputs.md rows 149-151 (Gemma 3) each name tests that exist."""
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert all("Gemma 3" in catalogue_rows()[n] for n in (149, 150, 151))
    assert_rows_name_existing_tests((149, 150, 151))


# ------------------------------------------------------------------------------------------------
# profile / explain geometries (numbers of the released configs; see vlm_tokenprune/eval/loading.py)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,layers,width,heads,kv,head_dim,mlp", [
    ("gemma-3-4b", 34, 2560, 8, 4, 256, 10240), ("gemma-3-12b", 48, 3840, 16, 8, 256, 15360),
    ("gemma-3-27b", 62, 5376, 32, 16, 128, 21504),
])
def test_profile_and_explain_geometries(capsys, name, layers, width, heads, kv, head_dim, mlp):
    from vlm_tokenprune.cli import main
    from vlm_tokenprune.eval import profiler

    m = profiler.build_geometry(name, device="meta", dtype="bf16")
    tc, vc = m.config.text_config, m.config.vision_config
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim,
            tc.intermediate_size, tc.sliding_window, tc.vocab_size) == (layers, width, heads, kv, head_dim, mlp, 1024, 262208)
    assert tc.layer_types[5] == "full_attention" and tc.layer_types.count("full_attention") == layers // 6
    assert (vc.num_hidden_layers, vc.hidden_size, vc.image_size // vc.patch_size, m.config.mm_tokens_per_image) \
        == (27, 1152, 64, 256)
    assert main(["explain", "fastv:layer=2,keep=0.25", "--model-config", name]) == 0
    out = capsys.readouterr().out
    assert "256 visual" in out and f"d={width}, m={mlp}, {layers} layers, {heads} heads / {kv} kv heads x {head_dim}" in out


def test_profile_random_inputs_run_patched():
    from vlm_tokenprune.eval import profiler

    model = tiny("sdpa")  # the 4B geometry at full size takes minutes on a CPU; its build is checked above
    inputs = profiler.random_inputs(model, n_text=12, batch=2)
    assert torch.equal(inputs["token_type_ids"], (inputs["input_ids"] == model.config.image_token_id).long())
    with vtp.patch(model, "fastv:layer=2,keep=0.25") as h, torch.no_grad():
        model(**inputs)
    assert h.last_trace().stages[0].visual_after == [4, 4]


def test_flops_count_the_window_of_sliding_layers():
    """QK^T and AV of a sliding layer count min(n, W) keys per token; full layers n (the module docstring's formula)."""
    from vlm_tokenprune.eval.flops import TextGeometry, layer_flops, prefill_flops
    from vlm_tokenprune.eval.loading import KNOWN_GEOMETRIES

    g = TextGeometry.of(KNOWN_GEOMETRIES["gemma-3-4b"]["text"])  # the pattern (6) without layer_types
    assert g.sliding_window == 1024 and g.sliding_layers == tuple(j for j in range(34) if (j + 1) % 6)
    n, q = 3000, 8 * 256
    assert layer_flops(g, n, 0) - layer_flops(g, n, 5) == 2 * 2 * n * (1024 - n) * q
    assert layer_flops(g, 500, 0) == layer_flops(g, 500, 5)  # shorter than the window: no difference
    assert prefill_flops(g, [n] * 34) == sum(layer_flops(g, n, j) for j in range(34)) + 2 * 2560 * 262208
    assert TextGeometry.of(tiny("sdpa").config).sliding_layers == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("query", ["last", "text"])
def test_covipal_guidance_targets_are_the_sliding_layers_own_rows(query):
    """CoViPAL's stage-1 targets at a sliding guidance layer on a prompt 6x the window: the attention of the layer's
    own rows (each query its own window) == the eager model's ``output_attentions``, renormalised over the image."""
    from vlm_tokenprune.train.covipal import guidance_targets

    model = tiny("sdpa")
    inputs = batch(model)
    with torch.no_grad():
        _, valid, vis_idx, vis_ok, target = guidance_targets(model, inputs, 2, query=query)
        own = tiny("eager")(**inputs, output_attentions=True).attentions[2].mean(1)  # [B, L, L], heads averaged
    vis = (inputs["input_ids"] == IMAGE_TOKEN_ID) & valid
    for b in range(len(ROWS)):
        first = int(vis[b].nonzero()[0])
        rows = [int(valid[b].nonzero()[-1])] if query == "last" else \
            [p for p in range(first, valid.shape[1]) if valid[b, p] and not vis[b, p]]
        a = own[b, rows][:, vis[b]].mean(0)
        want = a / a.sum()
        torch.testing.assert_close(target[b][vis_ok[b]], want, atol=1e-5, rtol=1e-5)
        assert vis_idx[b][vis_ok[b]].tolist() == vis[b].nonzero().flatten().tolist()


def test_atp_training_is_refused_by_name():
    """ATP's training forward builds one causal mask for the layers after its module: not Gemma 3's per-layer masks."""
    from vlm_tokenprune.train.atp import soft_forward

    model = tiny("sdpa")
    with pytest.raises(InputError) as e:
        soft_forward(model, None, batch(model))  # refused before the module is used
    assert e.value.field == "model" and "gemma3" in str(e.value)
