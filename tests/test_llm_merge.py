"""LLM-site merge stages (``op="merge"`` at site llm, ``engine._run_merge``), independent of any paper method: a
toy criterion fuses each pair of consecutive visual tokens into the pair's second token. Tested like the pre-LLM
merge: a left-padded batch whose rows keep different counts, every attention backend, ``generate`` with and
without the cache, all equal to the eager oracle replaying the same merges (tests/reference/sparsevlm_oracle.py's
runner, which applies a given merge decision); size-weighted merges after a pre_llm merge carry its sizes and
sources; a merge that touches text is refused."""
from __future__ import annotations

import pytest
import torch

from kit import BACKENDS, FLASH, left_padding, patched_prefill, row_alone, tiny_llava
from kit.runs import generate_rows
from reference import eager_runner as er
from reference import sparsevlm_oracle as oracle
from vlm_tokenprune.eval.tiny_models import make_batch
from vlm_tokenprune.methods.base import Criterion
from vlm_tokenprune.reduction import Reduction
from vlm_tokenprune.registry import CRITERIA

ROWS = [[5, "img", 7], [2, "img", 3, "img", 4]]


class PairMerge(Criterion):
    """Visual tokens 2i and 2i+1 of the current sequence -> one slot at 2i+1 (``weight``: mean or size)."""

    name = "test_pair_merge"
    op = "merge"
    sites = ("llm",)
    weight = "mean"
    touch_text = False

    def merge(self, ctx, **params):
        B, M = ctx.output.shape[:2]
        target = torch.where(ctx.seq_valid, torch.arange(M).expand(B, M), -1).clone()
        for b in range(B):
            vis = ctx.visual_idx[b][ctx.visual_ok[b]].tolist()
            for a, c in zip(vis[0::2], vis[1::2]):
                target[b, a] = c
            if self.touch_text:
                txt = ctx.text_idx[b][ctx.text_ok[b]].tolist()
                target[b, txt[0]] = -1
        return [Reduction.from_targets(target, weight=self.weight)]


class PairMergeSize(PairMerge):
    name = "test_pair_merge_size"
    weight = "size"


class PairMergeText(PairMerge):
    name = "test_pair_merge_text"
    touch_text = True


@pytest.fixture(autouse=True, scope="module")
def registered():
    for cls in (PairMerge, PairMergeSize, PairMergeText):
        CRITERIA.register(cls.name, cls())
    yield
    for cls in (PairMerge, PairMergeSize, PairMergeText):
        CRITERIA.unregister(cls.name)


def decision(img_pos: list[int]) -> dict:
    clusters = [(c, [a, c]) for a, c in zip(img_pos[0::2], img_pos[1::2])]
    return {"noop": False, "kept": img_pos[len(img_pos) // 2 * 2:], "clusters": clusters}


def oracle_run(model, alone: dict, layer: int, extra: torch.Tensor | None = None):
    eager = er.eager_copy(model)
    embeds = er.prompt_embeds(model, alone)
    if extra is not None:
        embeds = torch.cat([embeds, extra], dim=1)
    img = er.image_positions(model, alone["input_ids"])
    return oracle.run(eager, embeds, img, [{"layer": layer}], [decision(img)])


@pytest.mark.parametrize("attn", BACKENDS)
def test_padded_batch_every_backend_equals_the_oracle(attn):
    model = tiny_llava(attn)
    inputs = make_batch(model, ROWS, seed=1)
    logits, trace = patched_prefill(model, inputs, "test_pair_merge:layer=2,keep=0.5")
    st = trace.stages[0]
    assert st.visual_after == [18, 36] and trace.tokens_per_layer[2] == max(18 + 13, 36 + 10)
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        pad = left_padding(inputs, b)
        want, kept, sources, _ = oracle_run(model, alone, 2)
        assert st.kept_positions[b] == [p + pad for p in kept[0]]
        assert [[p - pad for p in s] for s in st.sources[b]] == sources[0]
        torch.testing.assert_close(logits[b, -want.shape[1]:], want[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", FLASH])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_equals_the_oracle(attn, use_cache):
    """Cached: layers < 2 cache the whole prompt, layers >= 2 the merged slots; uncached: re-merged every step."""
    model = tiny_llava(attn)
    inputs = make_batch(model, ROWS, seed=1)
    eos = model.generation_config.eos_token_id
    got = generate_rows(model, inputs, "test_pair_merge:layer=2,keep=0.5", steps=5, use_cache=use_cache)
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        eager = er.eager_copy(model)
        embeds = er.prompt_embeds(model, alone)
        img = er.image_positions(model, alone["input_ids"])
        want = er.greedy(eager, embeds, 5, eos,
                         lambda seq, step: oracle.run(eager, seq, img, [{"layer": 2}], [decision(img)])[0])
        assert got[b] == want, f"row {b}"


def test_size_weighted_merge_after_a_pre_llm_merge_carries_sizes_and_sources():
    model = tiny_llava("eager")
    inputs = make_batch(model, [[5, "img", 7]], seed=1)
    lm = model.model.language_model
    box = {}
    policy = "aim_merge:keep=0.5,mode=size,positions=gaps+test_pair_merge_size:layer=2,keep=0.25"
    import vlm_tokenprune as vtp

    with vtp.patch(model, policy) as h, torch.no_grad():
        hooks = [lm.layers[1].register_forward_hook(lambda m, a, o: box.__setitem__("out1", (o[0] if isinstance(o, tuple) else o).clone())),
                 lm.layers[2].register_forward_pre_hook(
                     lambda m, a, k: box.__setitem__("in2", k.get("hidden_states", a[0] if a else None).clone()),
                     with_kwargs=True)]
        try:
            model(**inputs)
        finally:
            for hk in hooks:
                hk.remove()
        pre, mrg = h.last_trace().stages
    size = {p: len(src) for p, src in zip(pre.kept_positions[0], pre.sources[0])}
    assert max(size.values()) > 1, "the pre_llm merge fused tokens"
    vis = pre.kept_positions[0]
    n_text_before = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])  # text before the image
    slot0 = {p: n_text_before + i for i, p in enumerate(vis)}  # layer-0 slot of each kept visual token
    out1 = box["out1"][0]
    for (a, c), (rep, src) in zip(zip(vis[0::2], vis[1::2]), zip(mrg.kept_positions[0], mrg.sources[0])):
        assert rep == c and sorted(src) == sorted(pre.sources[0][vis.index(a)] + pre.sources[0][vis.index(c)])
        want = (size[a] * out1[slot0[a]] + size[c] * out1[slot0[c]]) / (size[a] + size[c])
        got = box["in2"][0, n_text_before + vis[0::2].index(a)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_merge_touching_text_is_refused():
    model = tiny_llava("sdpa")
    inputs = make_batch(model, ROWS, seed=1)
    with pytest.raises(RuntimeError, match="text token"):
        patched_prefill(model, inputs, "test_pair_merge_text:layer=2,keep=0.5")
    patched_prefill(model, inputs, "test_pair_merge:layer=2,keep=0.5")  # the model still works after the refusal
