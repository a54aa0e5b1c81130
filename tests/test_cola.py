"""CoLa (arXiv 2507.07996): the layer-chain op (skip / repeat decoder layers for one forward) against an eager
loop over the chain, exact restore; MCTS over chains finds the known best chain of a toy reward; the
per-sample analysis runs on the shipped tiny VLM."""
from __future__ import annotations

import itertools

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch
from vlm_tokenprune.search.layer_chain import chain_logits, layer_chain
from vlm_tokenprune.search.mcts import ACTIONS, chain_of, mcts

from reference import sublayer_oracle as O

ROWS = [[5, "img", 7], [3, "img", 2, "img", 4]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava("sdpa")


@pytest.mark.parametrize("chain", [(0, 1, 2, 3), (0, 2, 3), (0, 1, 1, 2, 3, 3), (0, 3, 1)])
def test_chain_matches_eager_loop(model, chain):
    inputs = make_batch(model, ROWS)
    valid = inputs["attention_mask"].bool()
    got = chain_logits(model, inputs, chain)
    torch.testing.assert_close(got[valid], O.chain_logits(model, inputs, chain)[valid], atol=2e-5, rtol=1e-4)


def test_full_chain_is_the_model_and_restore_is_exact(model):
    inputs = make_batch(model, ROWS)
    lm = model.model.language_model
    layers, n = lm.layers, lm.config.num_hidden_layers
    with torch.no_grad():
        base = model(**inputs, use_cache=False).logits
        assert torch.equal(chain_logits(model, inputs, (0, 1, 2, 3)), base)
        with pytest.raises(RuntimeError):
            with layer_chain(model, (0, 0)):
                raise RuntimeError("boom")
        assert lm.layers is layers and lm.config.num_hidden_layers == n
        assert torch.equal(model(**inputs).logits, base)
    for bad in ((), (0, 4), ("1",), (True,)):
        with pytest.raises(InputError) as e:
            chain_logits(model, inputs, bad)
        assert e.value.field == "chain"
    with pytest.raises(InputError):
        chain_logits(model, {**inputs, "use_cache": True}, (0, 1))
    with vtp.patch(model, "fastv:layer=1,keep=0.5"), pytest.raises(vtp.UnsupportedModelError):
        chain_logits(model, inputs, (0, 1))


def test_mcts_finds_the_best_chain_of_a_toy_reward():
    w = [(0.0, 0.3, 0.1), (0.2, 0.0, 0.5), (0.4, 0.1, 0.0), (0.0, 0.6, 0.2)]  # per layer: skip / run / loop

    def reward(chain):
        counts = [chain.count(i) for i in range(4)]
        return sum(w[i][c] for i, c in enumerate(counts))

    best = max((chain_of(a) for a in itertools.product(ACTIONS, repeat=4) if chain_of(a)), key=reward)
    res = mcts(reward, 4, simulations=300, seed=0)
    assert res.chain == best == (0, 1, 1, 3)
    assert mcts(reward, 4, simulations=300, seed=0).evaluated == res.evaluated  # seeded: the same run


def test_per_sample_on_the_tiny_vlm():
    from vlm_tokenprune.eval.synthetic import make_split
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm
    from vlm_tokenprune.search.cola import per_sample

    m, p = load_tiny_vlm()
    rows = per_sample(m, p, make_split("test", 1), simulations=20, progress=False)
    r = rows[0]
    assert 0 <= r["chain_probability"] <= 1 and len(r["chain"]) >= 1 and r["chains_scored"] <= 20
    assert r["chain_reward"] == pytest.approx(r["chain_probability"] - 0.1 * len(r["chain"]) / 4)
