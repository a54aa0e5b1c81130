"""SparseVLM (arXiv 2410.04417) == an independent oracle (tests/reference/sparsevlm_oracle.py): text raters from
layer 0, head-mean rater attention in layer K-1, rank-based or top-k counts, DPC-kNN recycling of the best pruned
tokens merged back at their centres. The library runs it as an LLM-site merge inside the real batched,
left-padded forward and generate under every attention backend; an official-parity test replays the official
code's steps (``Gumpest/SparseVLMs``, written here from reading it) on the same tensors."""
from __future__ import annotations

import math

import pytest
import torch

import vlm_tokenprune as vtp
from kit import BACKENDS, FLASH, left_padding, n_image_tokens, patched_prefill, row_alone, tiny_llava
from kit.runs import generate_rows
from reference import sparsevlm_oracle as oracle
from vlm_tokenprune.errors import PolicyError
from vlm_tokenprune.eval.flops import policy_flops
from vlm_tokenprune.eval.tiny_models import make_batch
from vlm_tokenprune.methods.sparsevlm import dpc_knn, text_raters

ATOL = 2e-5
ROWS = [[5, "img", 7], [2, "img", 3, "img", 4]]  # 36 and 72 visual tokens: rows keep different counts


def model_of(attn: str):
    return tiny_llava(attn, tweaks=("sharp_llm",))


def k_of(keep: float, n: int) -> int:
    return max(1, math.floor(keep * n + 0.5))


def stage(layer, count="topk", cap=1 << 30, scale=13.5, bias=0.0, recycle=0.3, cluster_size=10, seed=0):
    return dict(layer=layer, count=count, cap=cap, scale=scale, bias=bias, recycle=recycle, cluster_size=cluster_size,
                seed=seed)


def check_batch(model, inputs, policy, stages_of, atol=ATOL):
    """Every row of the padded batch == the oracle on the row alone: kept positions, sources, logits."""
    logits, trace = patched_prefill(model, inputs, policy)
    L = inputs["input_ids"].shape[1]
    for b in range(inputs["input_ids"].shape[0]):
        alone = row_alone(inputs, ROWS, b)
        pad = left_padding(inputs, b)
        want, kept, sources, _ = oracle.sparsevlm(model, alone, stages_of(n_image_tokens(alone)))
        assert [st.kept_positions[b] for st in trace.stages] == [[p + pad for p in s] for s in kept], f"row {b}"
        assert [[[p - pad for p in src] for src in st.sources[b]] for st in trace.stages] == sources, f"row {b}"
        torch.testing.assert_close(logits[b, -want.shape[1]:], want[0], atol=atol, rtol=0, msg=f"row {b}")
    assert logits.shape[1] <= L
    return trace


@pytest.mark.parametrize("attn", BACKENDS)
def test_topk_with_recycling_matches_oracle(attn):
    """Top-k count (v1.5) at layer 2, 30 % of the pruned recycled: rows keep 18 + 1 (6 of 18 pruned in 1 cluster)
    and 36 + 2 (11 of 36 in 2) visual tokens."""
    model = model_of(attn)
    inputs = make_batch(model, ROWS, seed=2)
    trace = check_batch(model, inputs, "sparsevlm:layer=2,keep=0.5,count=topk",
                        lambda n: [stage(2, cap=k_of(0.5, n))])  # keep counts the row's original tokens
    assert trace.stages[0].visual_after == [18 + 1, 36 + 2]
    assert any(len(src) > 1 for src in trace.stages[0].sources[1]), "a recycled token stands for several"


@pytest.mark.parametrize("attn", BACKENDS)
def test_rank_count_matches_oracle(attn):
    """Rank-based count (v1.0): k = int(rank * scale + bias) per row, capped at n - 1 as the official code (the
    presets' cap: keep=0.999 of the current tokens, floored)."""
    model = model_of(attn)
    inputs = make_batch(model, ROWS, seed=3)
    trace = check_batch(model, inputs, "sparsevlm:layer=1,keep=0.99,of=current,rounding=floor,scale=2.5,bias=1.0",
                        lambda n: [stage(1, "rank", cap=n - 1, scale=2.5, bias=1.0)])
    after = trace.stages[0].visual_after
    assert after[0] < 36 and after[1] < 72


def test_two_stages_merge_again_and_a_prune_after():
    """Merged tokens are rated, pruned or merged again at a later stage; a prune after a merge carries sources."""
    model = model_of("eager")
    inputs = make_batch(model, ROWS, seed=4)
    check_batch(model, inputs, "sparsevlm:layer=1,keep=0.5,count=topk+sparsevlm:layer=3,keep=0.2,count=topk",
                lambda n: [stage(1, cap=k_of(0.5, n)), stage(3, cap=k_of(0.2, n))])
    logits, trace = patched_prefill(model, inputs, "sparsevlm:layer=1,keep=0.5,count=topk+fastv:layer=2,keep=0.1")
    merged = [src for src in trace.stages[0].sources[1] if len(src) > 1]
    kept = trace.stages[1].kept_positions[1]
    for pos, src in zip(kept, trace.stages[1].sources[1]):
        assert pos in src and (len(src) == 1 or src in merged)


@pytest.mark.parametrize("attn", ["sdpa", FLASH])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_oracle(attn, use_cache):
    """With the cache: layers below the stage cache the whole prompt, later ones the kept and merged tokens (the
    prompt's decisions replayed); without it every step re-runs the prefill, raters included."""
    model = model_of(attn)
    inputs = make_batch(model, ROWS, seed=2)
    eos = model.generation_config.eos_token_id
    got = generate_rows(model, inputs, "sparsevlm:layer=2,keep=0.25,count=topk", steps=5, use_cache=use_cache)
    for b in range(len(ROWS)):
        alone = row_alone(inputs, ROWS, b)
        want = oracle.sparsevlm_generate(model, alone, [stage(2, cap=k_of(0.25, n_image_tokens(alone)))], 5,
                                         rescore=not use_cache, eos_token_id=eos)
        assert got[b] == want, f"row {b}"


@pytest.mark.parametrize("count", ["topk", "rank"])
def test_keep_everything_is_the_unpatched_model(count):
    model = model_of("sdpa")
    inputs = make_batch(model, ROWS, seed=2)
    with torch.no_grad():
        want = model(**inputs).logits
    logits, trace = patched_prefill(model, inputs, f"sparsevlm:layer=2,keep=1.0,count={count}")
    assert torch.equal(logits, want) and trace.tokens_per_layer == [inputs["input_ids"].shape[1]] * 4


def test_oracle_distinguishes_settings():
    """The oracle's kept sets move with the count, the seed-free recycling share and the layer."""
    model = model_of("eager")
    alone = row_alone(make_batch(model, ROWS, seed=2), ROWS, 1)
    runs = [oracle.sparsevlm(model, alone, [st])[1] for st in
            (stage(2, cap=36), stage(2, cap=20), stage(2, cap=36, recycle=0.0), stage(1, cap=36))]
    assert len({str(r) for r in runs}) == 4


def test_not_image_only_and_flops_counts():
    from vlm_tokenprune.registry import CRITERIA

    crit = CRITERIA.get("sparsevlm")
    assert crit.image_only_fixed_count is False and crit.op == "merge" and crit.sites == ("llm",)
    model = model_of("sdpa")
    inputs = make_batch(model, [[5, "img", 7]], seed=2)
    _, trace = patched_prefill(model, inputs, "sparsevlm:layer=2,keep=0.5,count=topk")
    pred = policy_flops(model.config, "sparsevlm:layer=2,keep=0.5,count=topk", n_text=13, n_visual=36)
    assert pred["tokens_per_layer"] == trace.tokens_per_layer == [49, 49, 32, 32]
    rank = policy_flops(model.config, "sparsevlm:layer=2,keep=0.5", n_text=13, n_visual=36)
    assert rank["upper_bound_stages"] == [0] and rank["lower_bound_stages"] == []
    assert rank["tokens_per_layer"] == [49, 49, 32, 32]  # the cap (18) + its recycled token: at most this many


def test_presets_are_depth_aware():
    pol = vtp.Policy.parse("sparsevlm")
    assert [st.layer for st in pol.stages] == [3, 7, 16, 20] and {st.depth for st in pol.stages} == {32}
    assert [st.layer for st in pol.at_depth(4).stages] == [1, 2, 3]
    assert [(st.params["scale"], st.params["bias"]) for st in vtp.Policy.parse("sparsevlm_128").stages][0] == (9.0, 6.0)
    v15 = vtp.Policy.parse("sparsevlm_v15_192").stages
    assert [st.budget.count(576) for st in v15] == [300, 200, 110] and [st.layer for st in v15] == [3, 7, 16]


def test_bad_params_name_the_field():
    for text, field in (("sparsevlm:layer=2,keep=0.5,count=half", "stages[0].count"),
                        ("sparsevlm:layer=2,keep=0.5,recycle=1.5", "stages[0].recycle"),
                        ("sparsevlm:layer=2,keep=0.5,cluster_size=0", "stages[0].cluster_size"),
                        ("sparsevlm:layer=2,keep=0.5,scale=0", "stages[0].scale"),
                        ("sparsevlm:layer=2,keep=0.5,scale=inf", "stages[0].scale"),
                        ("sparsevlm:layer=2,keep=0.5,bias=-1", "stages[0].bias"),
                        ("sparsevlm:layer=2,keep=0.5,site=pre_llm", "stages[0].site")):
        with pytest.raises(PolicyError) as e:
            vtp.Policy.parse(text)
        assert e.value.field == field


# -- official parity: the official code's steps (Gumpest/SparseVLMs v1.0, written here from reading it) -----------
def official_raters(hidden, v_start, n_vis):
    """``modelling_sparse_llama.py``: raters from the layer-0 input (batch 1)."""
    v_t = hidden[:, v_start: v_start + n_vis, :]
    t_t = hidden[:, v_start + n_vis:, :]
    m = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    return torch.where(m > m.mean())[1]


def official_rank_mask(attn, v_start, n_vis, t_start, t_idx, scale, bias):
    """``score.py: attn_postprocess_rank``: attn [B, H, L, L] post-softmax."""
    a = attn.mean(1)[:, t_idx + t_start, v_start: v_start + n_vis]
    rank = torch.linalg.matrix_rank(a.float())
    rel = a.mean(1)
    if n_vis - rank.item() != 0:
        mask = torch.zeros_like(rel, dtype=torch.bool)
        mask[0][torch.topk(rel, min(int(rank.item() * scale + bias), n_vis - 1), dim=1)[1]] = True
        return mask, True, rel
    return torch.ones_like(rel, dtype=torch.bool), False, rel


def official_cluster_and_merge(x, cluster_num, noise):
    """``utils.py: cluster_and_merge`` with the density noise given instead of drawn."""
    B, N, C = x.shape
    dist = (x[:, :, None] - x[:, None]).norm(dim=-1, p=2) / (C ** 0.5)
    near = torch.topk(dist, k=cluster_num, dim=-1, largest=False)[0]
    density = (-(near ** 2).mean(dim=-1)).exp() + noise
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dmax = dist.flatten(1).max(dim=-1)[0][:, None, None]
    d, _ = (dist * mask + dmax * (1 - mask)).min(dim=-1)
    centres = torch.topk(d * density, k=cluster_num, dim=-1)[1]
    assign = dist[0][centres[0]][None].argmin(dim=1)
    assign[0, centres[0]] = torch.arange(cluster_num)
    w = x.new_zeros(cluster_num, 1).index_add_(0, assign[0], x.new_ones(N, 1)) + 1e-6
    merged = x.new_zeros(cluster_num, C).index_add_(0, assign[0], x[0] / w[assign[0]])
    return merged[None], centres[0]


def test_official_parity_first_stage():
    """One prompt, batch 1: the official steps (raters, rank count, top 30 % of the pruned, DPC-kNN, cluster means)
    on the tensors the patched model sees give the same kept tokens and the same merged hidden states."""
    model = model_of("eager")
    inputs = make_batch(model, [[5, "img", 9]], seed=5)
    layer, scale, bias = 2, 2.5, 1.0
    box = {}

    def grab(name):
        def hook(module, args, kwargs):
            box[name] = (kwargs.get("hidden_states", args[0] if args else None)).detach().clone()
        return hook

    lm = model.model.language_model
    with vtp.patch(model, f"sparsevlm:layer={layer},keep=0.99,of=current,rounding=floor,scale={scale},bias={bias}"
                   ) as h, torch.no_grad():
        hooks = [lm.layers[0].register_forward_pre_hook(grab("in0"), with_kwargs=True),
                 lm.layers[layer].register_forward_pre_hook(grab("in_k"), with_kwargs=True)]
        try:
            model(**inputs)
        finally:
            for hk in hooks:
                hk.remove()
        st = h.last_trace().stages[0]
    embeds = box["in0"]
    ids = inputs["input_ids"][0].tolist()
    v0 = ids.index(model.config.image_token_id)
    n = 36
    t_idx = official_raters(embeds, v0, n)
    # the official "pruning layer" is our layer - 1: its full attention and output, from an unpatched eager run
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    attn, h_out = out.attentions[layer - 1], out.hidden_states[layer]
    mask, pruned_any, rel = official_rank_mask(attn, v0, n, v0 + n, t_idx, scale, bias)
    assert pruned_any
    idx_pruned = torch.where(~mask[0])[0]
    n_sel = int(idx_pruned.shape[0] * 0.3) + 1
    top = rel[0][idx_pruned].topk(n_sel)[1]
    chosen = idx_pruned[top]
    noise = torch.rand(n_sel, generator=torch.Generator().manual_seed(0)) * 1e-6
    merged, centres = official_cluster_and_merge(h_out[:, v0 + chosen], n_sel // 10 + 1, noise[None])
    kept = (torch.where(mask[0])[0] + v0).tolist()
    centre_pos = (chosen[centres] + v0).tolist()
    assert st.kept_positions[0] == sorted(kept + centre_pos)
    # the library's merged tokens: the stage layer's input at their centres' slots
    slot = {p: i for i, p in enumerate(sorted(set(range(len(ids))) - set(range(v0, v0 + n)) | set(kept + centre_pos)))}
    got = torch.stack([box["in_k"][0, slot[p]] for p in centre_pos])
    torch.testing.assert_close(got, merged[0], atol=1e-5, rtol=1e-5)


def test_official_parity_components():
    """Raters and DPC-kNN alone on random tensors (several sizes), against the official formulas above."""
    g = torch.Generator().manual_seed(7)
    for n_vis, n_txt, n_sel in ((12, 6, 9), (30, 11, 25), (7, 1, 3)):
        h = torch.randn(1, 3 + n_vis + n_txt, 16, generator=g)
        want = official_raters(h, 3, n_vis)
        got = text_raters(h[0, 3:3 + n_vis], h[0, 3 + n_vis:]).nonzero().flatten()
        if want.numel():
            assert torch.equal(got, want)
        else:  # a single text token is never above its own mean: the library lets every text token rate
            assert got.tolist() == list(range(n_txt))
        x = torch.randn(n_sel, 16, generator=g)
        noise = torch.rand(n_sel, generator=g) * 1e-6
        c = n_sel // 10 + 1
        merged, centres = official_cluster_and_merge(x[None], c, noise[None])
        got_c, assign = dpc_knn(x, c, noise)
        assert torch.equal(got_c, centres)
        means = torch.stack([x[assign == i].mean(0) for i in range(c)])
        torch.testing.assert_close(means, merged[0], atol=1e-5, rtol=1e-5)


def test_viz_picture_shows_kept_and_recycled_tokens(tmp_path):
    """``viz``: one panel per stage on the shipped tiny VLM; recycled clusters are merge groups on the patch grid."""
    from vlm_tokenprune.eval import visualize as V
    from vlm_tokenprune.eval.synthetic import make_example
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm

    model, processor = load_tiny_vlm()
    ex = make_example(2_000_000_001, "location")
    policy = "sparsevlm:layer=1,keep=0.25,count=topk+sparsevlm:layer=2,keep=0.11,count=topk"
    out = tmp_path / "kept.png"
    fig = V.kept_tokens_figure(model, processor, image=ex["image"], question=ex["question"], policy=policy, out=out)
    _, panels = V.kept_tokens(model, processor, ex["image"], ex["question"], policy)
    assert len(panels) == 2 and out.exists() and fig.size[0] == 2 * (288 + 8) + 8
    assert panels[0].visual_after == 64 + 6  # 64 of 256 kept; the 58 best of the 192 pruned recycled as 58 // 10 + 1
    assert panels[0].groups and all(len(g) >= 2 for g in panels[0].groups)


def test_catalogue_row_names_existing_tests():
    """docs/bad-inputs.md: the SparseVLM row (152) names tests that exist."""
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert "SparseVLM" in catalogue_rows()[152]
    assert_rows_name_existing_tests((152,))


def test_qwen2_vl_batch_equals_rows_alone():
    """Qwen2-VL (M-RoPE; a library extension, the official code is LLaVA-1.5 only): each padded row gives what it
    gives alone, merged tokens included."""
    from kit import tiny_qwen
    from vlm_tokenprune.eval.tiny_models import make_qwen_batch

    model = tiny_qwen("sdpa")
    rows = [[5, "img", 7], [2, "img", 3, "img", 4]]
    inputs = make_qwen_batch(model, rows, seed=1)
    policy = "sparsevlm:layer=2,keep=0.25,count=topk"
    logits, trace = patched_prefill(model, inputs, policy)
    assert trace.stages[0].visual_after == [2 + 1, 3 + 1]
    for b in range(len(rows)):
        alone, pad = row_alone(inputs, rows, b), left_padding(inputs, b)
        got, tr = patched_prefill(model, alone, policy)
        assert [p + pad for p in tr.stages[0].kept_positions[0]] == trace.stages[0].kept_positions[b]
        torch.testing.assert_close(logits[b, -got.shape[1]:], got[0], atol=1e-5, rtol=0)
