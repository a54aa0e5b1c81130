"""The original LLaVA code base (llava-torch 1.2.x, transformers 4.36) under ``vlm_tokenprune``.

Runs only where ``llava`` imports (CI: its own virtual environment, see .ci/run, which fails if
these tests are skipped there). Tiny random model from configs, offline. Proves: keep-all is
exact (forward and generate), unpatch restores exactly, FastV keeps the oracle's tokens and
gives its logits (eager and sdpa), greedy generate with the KV cache equals the cache-free
oracle, batch rows equal single rows, pre_llm reduction equals shrinking the spliced features,
and unsupported inputs / configurations are refused before anything changes.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

pytest.importorskip("llava.model.language_model.llava_llama", reason="needs the original LLaVA code base (llava-torch)")

import llava_oracle as oracle  # noqa: E402
import llava_tiny as tiny_lib  # noqa: E402
from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402

import vlm_tokenprune as vtp  # noqa: E402
from vlm_tokenprune.errors import IncompatiblePolicyError, InputError, UnsupportedModelError  # noqa: E402

torch.set_num_threads(1)
ATOL = 1e-5
P = tiny_lib.PATCHES
ATTN = ("eager", "sdpa")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return tiny_lib.save_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


@functools.lru_cache(maxsize=None)
def _model(clip: str, attn: str, **overrides):
    return tiny_lib.build(clip, attn, **overrides)


@pytest.fixture
def model(clip_dir):
    return lambda attn="eager", **kw: _model(clip_dir, attn, **kw)


def k_of(keep: float, n: int) -> int:
    return max(1, math.floor(keep * n + 0.5))


def gen(model, ids, images, steps=8, **kw):
    with torch.no_grad():
        out = model.generate(inputs=ids, images=images, max_new_tokens=steps, do_sample=False, eos_token_id=None, **kw)
    return out[:, -steps:]


def no_hooks(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
def test_oracle_keeping_everything_is_the_plain_model(model, attn):
    m = model(attn)
    ids, img = tiny_lib.prompt(5, 6, "img", 7, 8, 9)
    embeds = oracle.spliced(m, ids, img)
    pos = oracle.image_positions(ids, P, IMAGE_TOKEN_INDEX)
    assert pos == list(range(3, 3 + P)) and embeds.shape[1] == ids.shape[1] - 1 + P
    with torch.no_grad():
        plain = m(input_ids=ids, images=img).logits
    torch.testing.assert_close(oracle.logits(m, embeds, pos, 2, pos), plain, atol=ATOL, rtol=0)


def test_oracle_attention_matches_output_attentions(model):
    """The hand-written attention == the eager model's output_attentions (rotary, GQA, scaling, mask)."""
    m = model("eager")
    ids, img = tiny_lib.prompt(5, "img", 7, 8)
    embeds = oracle.spliced(m, ids, img)
    T = embeds.shape[1]
    with torch.no_grad():
        att = m(input_ids=ids, images=img, output_attentions=True).attentions
        hidden = embeds
        for i, layer in enumerate(m.get_model().layers):
            probs = oracle.attention_probs(m, layer, hidden, list(range(T)))
            torch.testing.assert_close(probs, att[i][0], atol=1e-6, rtol=0)
            hidden = oracle.layer_forward(m, layer, hidden, list(range(T)))


def test_oracle_is_discriminating(model):
    """Other layers choose other tokens, pruning changes the logits: equality with the oracle is not vacuous."""
    m = model("eager")
    ids, img = tiny_lib.prompt(5, 6, "img", 7, 8, 9)
    embeds = oracle.spliced(m, ids, img)
    pos = oracle.image_positions(ids, P, IMAGE_TOKEN_INDEX)
    keeps = {layer: oracle.top_k(oracle.fastv_scores(m, embeds, pos, layer), 4) for layer in (1, 2, 3)}
    assert len({tuple(v) for v in keeps.values()}) == 3, keeps
    full = oracle.logits(m, embeds, pos, 2, pos)
    pruned = oracle.logits(m, embeds, pos, 2, keeps[2])
    assert (pruned[0, -1] - full[0, -1]).abs().max() > 1e-3
    with vtp.patch(m, "fastv:layer=2,tokens=4") as h, torch.no_grad():
        m(input_ids=ids, images=img)
        assert h.last_trace().stages[0].kept_positions[0] != keeps[1]


# ------------------------------------------------------------------------------------------------
# exactness and undo
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
def test_keep_all_is_exact(model, attn):
    m = model(attn)
    ids, img = tiny_lib.prompt(5, 6, "img", 7, 8, 9)
    with torch.no_grad():
        plain = m(input_ids=ids, images=img).logits
    want = gen(m, ids, img)
    with vtp.patch(m, "fastv:layer=2,keep=1.0") as h, torch.no_grad():
        assert torch.equal(m(input_ids=ids, images=img).logits, plain)
        assert h.last_trace().stages[0].visual_before == [P]
        assert torch.equal(gen(m, ids, img), want)


def test_unpatch_restores_exactly(model):
    m = model("sdpa")
    ids, img = tiny_lib.prompt(5, "img", 7, 8)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        plain = m(input_ids=ids, images=img).logits
    h = vtp.patch(m, "fastv:layer=2,keep=0.25")
    assert "prepare_inputs_labels_for_multimodal" in vars(m) and not no_hooks(m)
    assert "instance-level wrapper" in h.describe() and "rotary_emb" in h.describe()
    with torch.no_grad():
        assert m(input_ids=ids, images=img).logits.shape[1] < plain.shape[1]
    h.unpatch()
    h.unpatch()  # idempotent
    assert "prepare_inputs_labels_for_multimodal" not in vars(m) and no_hooks(m)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, images=img).logits, plain)


# ------------------------------------------------------------------------------------------------
# FastV == oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("layer,keep", [(1, 0.25), (2, 0.5), (3, 0.125)])
def test_fastv_matches_oracle(model, attn, layer, keep):
    m = model(attn)
    ids, img = tiny_lib.prompt(5, 6, "img", 7, 8, 9)
    embeds = oracle.spliced(m, ids, img)
    pos = oracle.image_positions(ids, P, IMAGE_TOKEN_INDEX)
    k = k_of(keep, P)
    scores = oracle.fastv_scores(m, embeds, pos, layer)
    s = sorted(scores.values(), reverse=True)
    assert s[k - 1] - s[k] > 1e-7, "ill-conditioned case: the k-th and (k+1)-th scores tie"
    want_keep = oracle.top_k(scores, k)
    want = oracle.logits(m, embeds, pos, layer, want_keep)
    with vtp.patch(m, f"fastv:layer={layer},keep={keep}") as h, torch.no_grad():
        got = m(input_ids=ids, images=img).logits
        trace = h.last_trace()
    assert trace.stages[0].kept_positions[0] == want_keep
    assert trace.tokens_per_layer == [embeds.shape[1]] * layer + [embeds.shape[1] - P + k] * (4 - layer)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_fastv_with_several_crops_per_image(model):
    """``images`` as a list of [crops, 3, H, W] tensors (flat merge: crop after crop): every crop's features are
    visual tokens of that image; kept tokens and logits equal the oracle's."""
    m = model("eager")
    ids, _ = tiny_lib.prompt(5, 6, "img", 7, 8, 9)
    crops = [torch.randn(2, 3, tiny_lib.IMAGE, tiny_lib.IMAGE, generator=torch.Generator().manual_seed(3))]
    embeds = oracle.spliced(m, ids, crops)
    pos = oracle.image_positions(ids, 2 * P, IMAGE_TOKEN_INDEX)
    assert embeds.shape[1] == ids.shape[1] - 1 + 2 * P
    k = k_of(0.25, 2 * P)
    want_keep = oracle.top_k(oracle.fastv_scores(m, embeds, pos, 2), k)
    with vtp.patch(m, "fastv:layer=2,keep=0.25") as h, torch.no_grad():
        got = m(input_ids=ids, images=crops).logits
        stage = h.last_trace().stages[0]
    assert stage.visual_before == [2 * P] and stage.kept_positions[0] == want_keep
    torch.testing.assert_close(got, oracle.logits(m, embeds, pos, 2, want_keep), atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
def test_generate_matches_oracle(model, attn):
    """Greedy generate (KV cache, 8 steps) == the cache-free oracle keeping the prompt's selection."""
    m = model(attn)
    ids, img = tiny_lib.prompt(5, 6, "img", 7, 8, 9)
    embeds = oracle.spliced(m, ids, img)
    pos = oracle.image_positions(ids, P, IMAGE_TOKEN_INDEX)
    want, margins = oracle.generate(m, embeds, pos, 2, k_of(0.25, P), 8)
    assert min(margins) > 1e-4, margins  # no near-tie that rounding could flip
    assert want != oracle.generate(m, embeds, pos, 2, P, 8)[0], "pruning must change the generation here"
    with vtp.patch(m, "fastv:layer=2,keep=0.25") as h:
        got = gen(m, ids, img)
        assert h.last_trace().phase == "decode"
    assert got[0].tolist() == want


def test_batch_rows_equal_single_rows(clip_dir):
    """Left-padded batch of two prompts of different lengths: each row keeps what it keeps alone, same logits."""
    m = _model(clip_dir, "sdpa", tokenizer_padding_side="left")
    rows = [tiny_lib.prompt(5, "img", 7, 8, 9, 10, seed=1), tiny_lib.prompt(6, "img", 3, seed=2)]
    T = max(r[0].shape[1] for r in rows)
    ids = torch.full((2, T), tiny_lib.PAD)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, (r, _) in enumerate(rows):
        ids[b, T - r.shape[1]:], mask[b, T - r.shape[1]:] = r[0], 1
    img = torch.cat([r[1] for r in rows])
    policy = "fastv:layer=2,keep=0.25"
    with vtp.patch(m, policy) as h, torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, images=img).logits
        kept = h.last_trace().stages[0].kept_positions
        singles = []
        for r_ids, r_img in rows:
            singles.append((m(input_ids=r_ids, images=r_img).logits, h.last_trace().stages[0].kept_positions[0]))
        batch_gen = gen(m, ids, img, attention_mask=mask)
        single_gen = [gen(m, r_ids, r_img) for r_ids, r_img in rows]
    L = out.shape[1]
    for b, (logit, keep) in enumerate(singles):
        pad = (T - rows[b][0].shape[1])  # spliced rows differ by the same padding as the prompts
        assert kept[b] == [p + pad for p in keep]
        torch.testing.assert_close(out[b, L - logit.shape[1]:], logit[0], atol=ATOL, rtol=0)
        assert batch_gen[b].tolist() == single_gen[b][0].tolist()


def test_right_padded_batch_prefill(model):
    """The code base's default right padding (prefill): rows keep what they keep alone, at the same positions;
    kept rows come back left-padded (documented), so each row's real tokens end the row."""
    m = model("eager")
    rows = [tiny_lib.prompt(5, "img", 7, 8, 9, 10, seed=1), tiny_lib.prompt(6, "img", 3, seed=2)]
    T = max(r[0].shape[1] for r in rows)
    ids = torch.full((2, T), tiny_lib.PAD)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, (r, _) in enumerate(rows):
        ids[b, : r.shape[1]], mask[b, : r.shape[1]] = r[0], 1
    img = torch.cat([r[1] for r in rows])
    with vtp.patch(m, "fastv:layer=2,keep=0.25") as h, torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, images=img).logits
        kept = h.last_trace().stages[0].kept_positions
        singles = [(m(input_ids=i, images=x).logits, h.last_trace().stages[0].kept_positions[0]) for i, x in rows]
    L = out.shape[1]
    for b, (logit, keep) in enumerate(singles):
        assert kept[b] == keep
        torch.testing.assert_close(out[b, L - logit.shape[1]:], logit[0], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# pre-LLM: reducing the spliced features
# ------------------------------------------------------------------------------------------------
def test_pre_llm_prune_equals_shrinking_the_features(model):
    """uniform:site=pre_llm with positions=repack == the plain model on the spliced sequence without the dropped
    features (what shrinking them at the projector gives); generate continues it."""
    m = model("sdpa")
    ids, img = tiny_lib.prompt(5, 6, "img", 7, 8, 9)
    embeds = oracle.spliced(m, ids, img)
    pos = oracle.image_positions(ids, P, IMAGE_TOKEN_INDEX)
    with vtp.patch(m, "uniform:site=pre_llm,keep=0.25,positions=repack") as h, torch.no_grad():
        got = m(input_ids=ids, images=img).logits
        keep = h.last_trace().stages[0].kept_positions[0]
        got_gen = gen(m, ids, img)
    assert len(keep) == 4 and set(keep) <= set(pos)
    grid = [((p - pos[0]) // 4, (p - pos[0]) % 4) for p in keep]
    assert len({r for r, _ in grid}) == 2 and len({c for _, c in grid}) == 2  # an even 2x2 grid of the 4x4
    kept = [p for p in range(embeds.shape[1]) if p not in pos or p in keep]
    with torch.no_grad():
        want = m(inputs_embeds=embeds[:, kept]).logits
        embeds_now, want_gen = embeds[:, kept], []
        for _ in range(8):  # cache-free greedy on the shrunk sequence
            tok = int(m(inputs_embeds=embeds_now).logits[0, -1].argmax())
            want_gen.append(tok)
            embeds_now = torch.cat([embeds_now, m.get_model().embed_tokens(torch.tensor([[tok]]))], dim=1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert got_gen[0].tolist() == want_gen


# ------------------------------------------------------------------------------------------------
# refusals, before anything changes
# ------------------------------------------------------------------------------------------------
def test_labels_and_late_images_are_refused(model):
    m = model("sdpa")
    ids, img = tiny_lib.prompt(5, "img", 7, 8)
    with vtp.patch(m, "fastv:layer=2,keep=0.5"):
        with pytest.raises(InputError) as e:
            m(input_ids=ids, images=img, labels=ids)
        assert e.value.field == "labels"
        with torch.no_grad():
            out = m(input_ids=ids, images=img, use_cache=True)
        with pytest.raises(InputError) as e:
            m(input_ids=ids, images=img, past_key_values=out.past_key_values)
        assert e.value.field == "images"


@pytest.mark.parametrize("overrides,field", [
    ({"mm_patch_merge_type": "spatial_unpad"}, "config.mm_patch_merge_type"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "config.rope_scaling"),
])
def test_unsupported_configurations_are_refused(clip_dir, overrides, field):
    m = tiny_lib.build(clip_dir, "eager", **overrides)
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(m, "fastv")
    assert e.value.field == field
    assert no_hooks(m) and "prepare_inputs_labels_for_multimodal" not in vars(m)


def test_structural_ops_are_refused(model):
    m = model("eager")
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(m, "fastv:layer=2,keep=0.5+ffn_cut")
    assert e.value.field == "stages[1].op"
    assert no_hooks(m) and "prepare_inputs_labels_for_multimodal" not in vars(m)


def test_a_foreign_instance_wrapper_is_refused(clip_dir):
    m = tiny_lib.build(clip_dir, "eager")
    foreign = m.prepare_inputs_labels_for_multimodal
    m.__dict__["prepare_inputs_labels_for_multimodal"] = foreign  # e.g. another tool's instance-level wrapper
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(m, "fastv")
    assert e.value.field == "model.prepare_inputs_labels_for_multimodal"
    assert no_hooks(m) and vars(m)["prepare_inputs_labels_for_multimodal"] is foreign
