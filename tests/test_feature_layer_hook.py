"""The vision site's feature-layer hook (``VisionCriterion.after_feature_layer``): a criterion that keeps
CLS + the top-K patches by CLS attention at the feature layer == an eager oracle that runs the tower layer
by layer (plain CLIP layers, its own attention), picks the same patches and runs the LLM on the kept rows."""
from __future__ import annotations

import functools

import pytest
import torch

import vlm_tokenprune as vtp
from reference import flowcut_vit_oracle as fc
from reference import pre_llm_fastv_oracle as pf
from reference import fastv_oracle as fv
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch
from vlm_tokenprune.methods.base import register_criterion
from vlm_tokenprune.registry import CRITERIA
from vlm_tokenprune.vision.base import VisionCriterion

torch.set_num_threads(1)
ROWS = [[5, "img", 7], [2, "img", 3]]


class ClsTopK(VisionCriterion):
    """Test criterion: CLS + the K patches the CLS query attends to most (mean over heads) at the feature layer."""

    name = "test_cls_topk_feature"

    def capture_layers(self, seams, stage):
        return (seams.feature_layer,)

    def after_feature_layer(self, run, hidden, seams):
        (jq, q), (_, k) = run.captured["q"], run.captured["k"]
        assert jq == seams.feature_layer
        attn = seams.layers[seams.feature_layer].self_attn
        n, T, D = q.shape
        H = attn.num_heads
        a = torch.softmax(torch.einsum("nhd,nthd->nht", q[:, 0].float().view(n, H, D // H),
                                       k.float().view(n, T, H, D // H)) * attn.scale, -1).mean(1)[:, 1:]
        K = run.keep_patches
        top = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :K].sort(dim=1).values + 1
        sel = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=top.device), top], 1)
        to = torch.full((n, T), -1, dtype=torch.long, device=sel.device)
        to.scatter_(1, sel, torch.arange(K + 1, device=sel.device).expand(n, K + 1))
        run.reassign(to, torch.gather(run.ident, 1, sel), torch.gather(run.size, 1, sel))
        return torch.gather(hidden, 1, sel[..., None].expand(-1, -1, hidden.shape[-1]))


@pytest.fixture(scope="module")
def criterion():
    register_criterion(ClsTopK)
    yield
    CRITERIA.unregister(ClsTopK.name)


@functools.lru_cache(maxsize=None)
def tiny(attn: str):
    return build_tiny_llava(attn, vision_layers=4)


def oracle_encode(model, crops: torch.Tensor, K: int):
    """Plain CLIP layers up to the feature layer; CLS + top-K patches by its mean-over-heads attention there."""
    tm = fc.tower_layers(model)
    F = fc.feature_layer(model)
    feats, kept = [], []
    with torch.no_grad():
        x = tm.pre_layrnorm(tm.embeddings(crops))
        for c in range(x.shape[0]):
            xc = x[c]
            for layer in tm.encoder.layers[: F + 1]:
                xc, probs = fc.clip_layer(layer, xc)[:2]
            a = [sum(float(probs[h, 0, j]) for h in range(probs.shape[0])) for j in range(1, xc.shape[0])]
            top = sorted(sorted(range(len(a)), key=lambda i: (-a[i], i))[:K])
            idx = [0] + [i + 1 for i in top]
            feats.append(xc[idx])
            kept.append(idx)
    return feats, kept


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_feature_layer_reduction_matches_oracle(criterion, attn):
    model = tiny(attn)
    inputs = make_batch(model, ROWS)
    K = 5
    with torch.no_grad():
        model(**inputs)  # transformers installs its output-recording hooks now, before ours (ours is prepended)
    with vtp.patch(model, {"stages": [{"criterion": ClsTopK.name, "site": "vision", "tokens": K, "positions": "gaps"}]}) as h, \
            torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
        assert "forward hook, prepended" in h.describe()
    feats, kept = oracle_encode(model, fc.all_crops(model, inputs), K)
    eager = fv.eager_copy(model)
    for b, (x, pos, sources) in enumerate(fc.reduced_rows(model, inputs, feats, kept)):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        assert [q - pad for q in trace.stages[0].kept_positions[b]] == sorted(sources)
        visual = [q in sources for q in pos]
        want = pf.logits(eager, x, pf.prompt_positions(pos, "gaps"), visual, 0, [i for i, v in enumerate(visual) if v])
        torch.testing.assert_close(logits[b, logits.shape[1] - want.shape[0]:], want, atol=1e-5, rtol=0)
