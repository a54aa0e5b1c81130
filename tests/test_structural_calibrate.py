"""calibrate(): YOPO head ratios and EfficientVLA layer importance against eager attention /
hidden states read independently; artifacts referenced by policies; config-hash mismatch."""
from __future__ import annotations

import json

import pytest
import torch

import vlm_tokenprune as vtp
from kit import tiny_llava
from vlm_tokenprune import IncompatiblePolicyError, Policy
from vlm_tokenprune.structural.calibration import select_heads, select_layers
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, make_batch

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager")


@pytest.fixture(scope="module")
def batches(model):
    return [make_batch(model, ROWS, seed=s) for s in range(2)]


def test_head_ratios_match_eager_attention(model, batches, tmp_path):
    art = vtp.calibrate(model, batches, what="heads", path=str(tmp_path / "h.json"), progress=False)
    assert art["samples"] == 4 and json.load(open(tmp_path / "h.json"))["config_hash"] == art["config_hash"]
    got = torch.tensor(art["ratios"])  # [samples, layers, heads]
    exp = []
    for inputs in batches:
        with torch.no_grad():
            att = model(**inputs, output_attentions=True).attentions  # per layer [B, H, L, L]
        valid = inputs["attention_mask"].bool()
        vis = (inputs["input_ids"] == IMAGE_TOKEN_ID) & valid
        for b in range(valid.shape[0]):
            per_layer = []
            for a in att:
                a = a[b][:, valid[b]][:, :, valid[b]].double()  # real queries x real keys
                v = vis[b][valid[b]]
                per_layer.append(a[:, :, v].sum((1, 2)) / a[:, :, ~v].sum((1, 2)))
            exp.append(torch.stack(per_layer))
    torch.testing.assert_close(got.double(), torch.stack(exp), rtol=1e-4, atol=1e-6)


def test_layer_importance_matches_hidden_states(model, batches):
    art = vtp.calibrate(model, batches, what="layers", progress=False)
    imp = []
    for inputs in batches:
        with torch.no_grad():
            hs = model(**inputs, output_hidden_states=True).hidden_states  # embeddings, then after each layer
        valid = inputs["attention_mask"].bool()
        for b in range(valid.shape[0]):
            row = [1 - torch.cosine_similarity(hs[j][b][valid[b]], hs[j + 1][b][valid[b]], dim=-1).mean()
                   for j in range(len(hs) - 2)]  # the last entry is after the final norm
            imp.append(torch.stack(row))
    exp = torch.stack(imp).mean(0)
    torch.testing.assert_close(torch.tensor(art["importance"])[:-1], exp.float(), rtol=1e-4, atol=1e-5)


def test_selection_rules():
    art = {"ratios": [[[0.1, 0.5, 0.3], [0.9, 0.05, 0.2], [0.01, 0.3, 0.2]],
                      [[0.1, 0.5, 0.3], [0.1, 0.06, 0.3], [0.02, 0.1, 0.4]]]}
    # threshold 0.15, majority (>= half of 2 samples): layer 1 keeps heads 0 and 2; layer 2 keeps 1, 2
    assert select_heads(art, threshold=0.15, keep_first=1) == ((1, 1), (2, 0))
    assert select_heads(art, threshold=0.15, keep_first=3) == ()
    # top_n=1: votes, ties broken by mean ratio
    assert select_heads(art, top_n=1, keep_first=1) == ((1, 1), (1, 2), (2, 0), (2, 1))
    # kept=0.5 of the 6 heads in layers >= 1, ranked by the majority-vote score (here the max of 2 samples):
    # 0.9 (1/0), 0.4 (2/2), then 0.3 twice: 1/2 wins on mean ratio (0.25 vs 0.2)
    assert select_heads(art, kept=0.5, keep_first=1) == ((1, 1), (2, 0), (2, 1))
    assert select_heads(art, kept=2 / 6, keep_first=1) == select_heads(art, threshold=0.35, keep_first=1)  # one global tau
    assert select_layers({"importance": [0.9, 0.1, 0.5, 0.05]}, 2) == (1, 3)
    assert select_layers({"importance": [0.0, 0.1, 0.5, 0.05]}, 1) == (3,)  # never layer 0
    with pytest.raises(IncompatiblePolicyError):
        select_layers({"importance": [0.0, 0.1]}, 2)


def test_policies_from_artifacts(model, batches, tmp_path):
    h, lyr = str(tmp_path / "h.json"), str(tmp_path / "l.json")
    vtp.calibrate(model, batches, what="heads", path=h, progress=False)
    art = vtp.calibrate(model, batches, what="layers", path=lyr, progress=False)
    inputs = batches[0]
    pol = Policy.parse(f"efficientvla_layers:calibration={lyr},layers_kept=3,of=4")
    assert Policy.from_dict(pol.to_dict()) == pol and pol.stages[0].op == "skip_layers"
    drop = min(range(1, 4), key=lambda j: art["importance"][j])
    with torch.no_grad():
        with vtp.patch(model, pol) as handle:
            a = model(**inputs).logits
            assert handle.structural.skip_all == (drop,)
        with vtp.patch(model, f"skip_layers:layers={drop}"):
            b = model(**inputs).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        with vtp.patch(model, f"prune_heads:calibration={h},top_n=2,keep_first=2") as handle:
            assert set(handle.structural.heads_visual) == {2, 3}
            assert all(len(v) == 2 for v in handle.structural.heads_visual.values())
            model(**inputs)
        assert "real: visual rows skip the pruned heads" in handle.describe()
    # a heads file where a layers file is expected
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(model, f"efficientvla_layers:calibration={h}")
    assert e.value.field == "stages[0].calibration.what"


def test_artifact_from_another_model_is_refused(model, batches, tmp_path):
    path = str(tmp_path / "h.json")
    vtp.calibrate(model, batches, what="heads", path=path, progress=False)
    other = tiny_llava("eager", layers=6)
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(other, f"prune_heads:calibration={path},threshold=0.1")
    assert e.value.field == "stages[0].calibration.config_hash"
    assert "num_hidden_layers" in str(e.value)
    assert not vtp.patching.is_patched(other)


def test_yopo_presets_on_the_shipped_tiny_vlm():
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm
    from vlm_tokenprune.methods.yopo import TINY_VLM_HEADS

    tiny, _ = load_tiny_vlm("sdpa")
    pol = Policy.parse("yopo_25:drop=3")
    assert [s.op for s in pol.stages] == ["neighbor_attention", "ffn_cut", "prune_heads", "visual_drop"]
    assert Policy.parse(pol.to_string()) == pol and Policy.from_dict(pol.to_dict()) == pol
    assert Policy.parse("yopo") == Policy.parse("yopo_25") != Policy.parse("yopo_12")
    assert Policy.parse("yopo_12:top_n=1,window=3").stages[2].params.get("kept") is None
    art = json.load(open(TINY_VLM_HEADS))
    with vtp.patch(tiny, pol) as h:
        plan = h.structural
        pruned = tuple((layer, x) for layer, hs in sorted(plan.heads_visual.items()) for x in hs)
        assert pruned == select_heads(art, kept=0.25, keep_first=2) and len(pruned) == 6  # 2 of 8 heads kept in layers 2-3
        assert plan.neighbor == {j: 5 for j in range(4)} and set(plan.ffn) == set(range(4))
        assert h.structural_attention and "mask-only" not in h.describe()
    # another model: the shipped file is refused by its config hash, naming calibration and how to make one
    other = tiny_llava("sdpa")
    with pytest.raises(IncompatiblePolicyError) as e:
        vtp.patch(other, "yopo_25:drop=3")
    assert e.value.field == "stages[2].calibration.config_hash" and "vlm_tokenprune.calibrate(model" in str(e.value)
    assert not vtp.patching.is_patched(other)
    with vtp.patch(tiny, "yopo") as h:  # the 7B drop layer (12 of 32) maps to 2 of the tiny model's 4
        assert h.policy.stages[3].layer == 2 and h.requested_policy.stages[3].layer == 12
    with pytest.raises(IncompatiblePolicyError) as e:  # an explicit drop layer is absolute
        vtp.patch(tiny, "yopo:drop=12")
    assert e.value.field == "stages[3].layer"
    with pytest.raises(vtp.PolicyError) as e:
        Policy.parse("yopo:layer=3")
    assert e.value.field == "stages[0].layer" and "drop" in str(e.value)
