"""FinerCut's greedy sublayer selection (arXiv 2405.18218) as ``calibrate(what="sublayers")``: the order
equals a greedy loop written from the paper over the eager sublayer oracle; the ``finercut`` preset
applies its first entries; bad artifacts and counts are refused by name."""
from __future__ import annotations

import json

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError, PolicyError
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch

from reference import sublayer_oracle as O

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava("eager")


def _js(p_log, q_log):
    p, q = p_log.double().exp(), q_log.double().exp()
    m = (p + q) / 2
    return float((0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)).mean())


def _oracle_order(model, inputs, count):
    valid = inputs["attention_mask"].bool()
    ref = torch.log_softmax(O.logits(model, inputs)[valid], -1)
    cands = [("attn", j) for j in (1, 2, 3)] + [("ffn", j) for j in range(4)]
    removed = []
    for _ in range(count):
        scores = {}
        for c in cands:
            if c in removed:
                continue
            now = removed + [c]
            out = O.logits(model, inputs, {j for k, j in now if k == "attn"}, {j for k, j in now if k == "ffn"})
            scores[c] = _js(ref, torch.log_softmax(out[valid], -1))
        removed.append(min(scores, key=scores.get))
    return removed


def test_greedy_order_matches_oracle_and_preset_applies_it(model, tmp_path):
    inputs = make_batch(model, ROWS)
    path = tmp_path / "sub.json"
    art = vtp.calibrate(model, [inputs], what="sublayers", count=3, path=str(path), progress=False)
    want = _oracle_order(model, inputs, 3)
    assert [tuple(x) for x in art["order"]] == want
    assert art["distance"] == sorted(art["distance"])  # each removal adds to the change
    attn = sorted(j for k, j in want[:2] if k == "attn")
    ffn = sorted(j for k, j in want[:2] if k == "ffn")
    with torch.no_grad(), vtp.patch(model, f"finercut:calibration={path},removed=2,of=8") as h:
        got = model(**inputs).logits
        assert h.structural.skip_attn == tuple(attn) and h.structural.skip_ffn == tuple(ffn)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], O.logits(model, inputs, attn, ffn)[valid], atol=2e-5, rtol=1e-4)


def test_refusals(model, tmp_path):
    inputs = make_batch(model, ROWS)
    with pytest.raises(InputError) as e:
        vtp.calibrate(model, [inputs], what="sublayers", count=8, progress=False)
    assert e.value.field == "count"
    with pytest.raises(PolicyError) as e:
        vtp.calibrate(model, [inputs], what="layers", count=2, progress=False)
    assert e.value.field == "count"
    bad = tmp_path / "bad.json"
    art = vtp.calibrate(model, [inputs], what="sublayers", count=1, path=str(bad), progress=False)
    art["order"] = [["mlp", 1]]
    bad.write_text(json.dumps(art))
    with pytest.raises(PolicyError) as e:
        vtp.patch(model, f"finercut:calibration={bad},removed=1,of=8")
    assert e.value.field == "stages[0].calibration.order"
    with pytest.raises(PolicyError) as e:
        vtp.patch(model, "finercut")
    assert e.value.field == "stages[0].attn"
