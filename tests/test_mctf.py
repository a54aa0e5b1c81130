"""MCTF in the CLIP tower (``mctf``, arXiv 2403.10030) == an independent oracle (tests/reference/mctf_oracle.py:
plain loops for the attention statistics, matching and fusion; eager attention written out), on tiny LLaVA /
LLaVA-NeXT, batch 2, several images, tower under eager and sdpa: same fused groups (sources) per kept token,
same token counts per encoder layer, same logits.
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import FLASH, assert_policy_refused, tiny_llava
from reference import flowcut_vit_oracle as fc
from reference import mctf_oracle as oracle
from reference import pre_llm_oracle
from vlm_tokenprune.errors import IncompatiblePolicyError
from vlm_tokenprune.eval.tiny_models import make_batch
from vlm_tokenprune.methods.mctf import fewest_patches, mctf_schedule

torch.set_num_threads(1)

ATOL = 1e-5
ROWS = [[5, "img", 7], [2, "img", 3, "img", 4]]


def tiny(attn: str, next: bool = False):
    return tiny_llava(attn, vision_layers=6, next=next)  # feature layer 4: merging layers 1..4


def _check(model, inputs, policy, K, positions, **kw):
    with vtp.patch(model, policy) as h, torch.no_grad():
        logits = model(**inputs).logits
        trace = h.last_trace()
    feats, kept, sources, seen = oracle.mctf_encode(model, fc.all_crops(model, inputs), K, **kw)
    st = trace.stages[0]
    assert st.vision_tokens_per_layer == seen
    rows = fc.reduced_rows(model, inputs, feats, kept, sources)
    for b, (x, pos, src) in enumerate(rows):
        pad = int((inputs["attention_mask"][b] == 0).sum())
        vis = [p for p in pos if p in src]
        assert [p - pad for p in st.kept_positions[b]] == vis
        assert [[s - pad for s in g] for g in st.sources[b]] == [src[p] for p in vis]
        want = pre_llm_oracle.row_logits(model, x, pos, positions)
        torch.testing.assert_close(logits[b, logits.shape[1] - len(pos):], want, atol=ATOL, rtol=0)
    return trace, seen


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("extra,K,kw,positions", [
    ("tokens=8", 8, {}, "gaps"),
    ("keep=0.125,bidirection=false,positions=repack", 5, {"bidirection": False}, "repack"),
    ("r=5,tokens=1,prop_attn=false,tau_size=0", 1, {"r": 5, "prop_attn": False, "taus": (1.0, 20.0, 0.0)}, "gaps"),
    ("tokens=6,layer=2,tau_sim=2,tau_info=0", 6, {"start": 2, "taus": (2.0, 0.0, 40.0)}, "gaps"),
])
def test_mctf_matches_oracle(attn, extra, K, kw, positions):
    model = tiny(attn)
    inputs = make_batch(model, ROWS)
    trace, seen = _check(model, inputs, f"mctf:{extra}", K, positions, **kw)
    if "r=5" in extra:
        assert seen == [37, 32, 27, 22, 17, 17]  # 5 per layer, from layer 1
    else:
        assert seen[-1] == K + 1 and seen[0] == (37 if kw.get("start", 1) > 0 else seen[0])
    groups = trace.stages[0].sources
    assert any(len(g) > 1 for g in groups[0])  # tokens really were fused
    for b in range(2):  # the groups partition the row's visual tokens
        vis = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten().tolist()
        assert sorted(s for g in groups[b] for s in g) == vis


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mctf_llava_next_crops(attn):
    model = tiny(attn, next=True)
    s = model.config.vision_config.image_size
    inputs = make_batch(model, [[4, "img", 3], [2, "img", 5]], image_sizes=[[2 * s, s], [s, s]])
    _check(model, inputs, "mctf:tokens=9", 9, "gaps")


def test_generate_matches_oracle():
    model = tiny("sdpa")
    inputs = make_batch(model, ROWS)
    with vtp.patch(model, "mctf:tokens=8"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    feats, kept, sources, _ = oracle.mctf_encode(model, fc.all_crops(model, inputs), 8)
    L = inputs["input_ids"].shape[1]
    for b, (x, pos, _) in enumerate(fc.reduced_rows(model, inputs, feats, kept, sources)):
        assert out[b, L:].tolist() == pre_llm_oracle.greedy(model, x, pos, "gaps", int(inputs["attention_mask"][b].sum()), 4)


def test_keep_everything_and_unpatch_are_exact():
    model = tiny("sdpa")
    inputs = make_batch(model, ROWS)
    with torch.no_grad():
        before = model(**inputs).logits
        with vtp.patch(model, "mctf:keep=1.0") as h:
            assert torch.equal(model(**inputs).logits, before)
            assert h.last_trace().stages[0].vision_tokens_per_layer == [37] * 6
        with vtp.patch(model, "mctf"):
            assert model(**inputs).logits.shape[1] < before.shape[1]
        assert torch.equal(model(**inputs).logits, before)


def test_schedule_reaches_every_feasible_budget():
    for keep in range(1, 37):
        for layers in ([1, 2, 3, 4], [2, 3, 4], [0, 1, 2, 3, 4, 5, 6]):
            s = mctf_schedule(37, keep, layers, 0)
            T = 37
            for j in layers:
                assert s[j] <= (T - 1) // 2
                T -= s[j]
            assert T - 1 == max(keep, fewest_patches(37, len(layers)))
            if T - 1 == keep:  # reachable: the oracle's own reading of the documented rule agrees
                assert s == oracle.fusion_schedule(36, keep, layers, 0)
    assert mctf_schedule(577, 1, list(range(1, 23)), 16) == {j: 16 for j in range(1, 23)}  # paper: r = 16
    assert oracle.fusion_schedule(576, 1, list(range(1, 23)), 16) == {j: 16 for j in range(1, 23)}


@pytest.mark.parametrize("text,field", [
    ("mctf:r=-1", "stages[0].r"),
    ("mctf:tau_info=-2", "stages[0].tau_info"),
    ("mctf:layer=-1", "stages[0].layer"),
    ("mctf:bidirection=2", "stages[0].bidirection"),
    ("mctf:site=pre_llm", "stages[0].site"),
])
def test_policy_errors_name_the_field(text, field):
    assert_policy_refused(text, field)


def test_model_errors_name_the_field():
    model = tiny("sdpa")
    for text, field in (("mctf:tokens=2", "stages[0].tokens"),  # 4 halvings of 36 leave 3 at best
                        ("mctf:layer=5", "stages[0].layer"),  # beyond the feature layer (4)
                        ("mctf:keep=0.05,layer=4", "stages[0].keep")):
        with pytest.raises(IncompatiblePolicyError) as e:
            vtp.patch(model, text)
        assert e.value.field == field, str(e.value)
    flash = tiny_llava(FLASH, vision_layers=6)
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(flash, "mctf")
    assert e.value.field == "stages[0].prop_attn"
    with vtp.patch(flash, "mctf:prop_attn=false,tokens=8") as h, torch.no_grad():  # runs without the bias
        flash(**make_batch(flash, ROWS))
        assert h.last_trace().stages[0].vision_tokens_per_layer[-1] == 9
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_round_trip():
    for text in ("mctf", "mctf:r=16,tokens=64,layer=2,bidirection=false", "mctf:keep=0.25,positions=repack"):
        pol = vtp.Policy.parse(text)
        assert vtp.Policy.parse(pol.to_string()) == pol and vtp.Policy.from_dict(pol.to_dict()) == pol


def test_oracle_distinguishes_settings():
    """Each criterion term, the direction and proportional attention change the oracle's groups or outputs."""
    model = tiny("eager")
    crops = fc.all_crops(model, make_batch(model, ROWS))
    base = oracle.mctf_encode(model, crops, 8)
    for kw in ({"taus": (1.0, 0.0, 40.0)}, {"taus": (0.0, 20.0, 40.0)}, {"bidirection": False}):
        assert oracle.mctf_encode(model, crops, 8, **kw)[2] != base[2], kw
    other = oracle.mctf_encode(model, crops, 8, prop_attn=False)
    assert not torch.allclose(other[0][0], base[0][0])
