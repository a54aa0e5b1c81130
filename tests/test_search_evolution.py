"""EvoPress loop (arXiv 2410.14649) on toy objectives: it finds the known optimum under an exact level
budget, the level-switch mutation keeps every group's sum exactly, and a resumed run equals the straight run."""
from __future__ import annotations

import itertools
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_tokenprune.search import EvoConfig, JointSpace, SublayerSpace, TokenSpace, evolve, level_switch
from vlm_tokenprune.search.mutation import budget_trade

W = (3.0, 1.0, 2.0, 0.5, 4.0, 1.5)
T = (0, 3, 1, 4, 0, 2)
MAX = (4,) * 6
TOTAL = 9


def toy(levels, batch):  # separable convex; batches add a small level-dependent term (noisy small subsets)
    return sum(w * (x - t) ** 2 for w, x, t in zip(W, levels, T)) + 0.01 * ((batch * 7 + sum(levels) * 3) % 5)


def brute_force():
    best = None
    for lv in itertools.product(*(range(m + 1) for m in MAX)):
        if sum(lv) == TOTAL:
            f = sum(w * (x - t) ** 2 for w, x, t in zip(W, lv, T))
            if best is None or f < best[0]:
                best = (f, lv)
    return best[1]


def test_finds_the_known_optimum():
    start = (2, 2, 2, 1, 1, 1)
    cfg = EvoConfig(generations=60, offspring=8, steps=((1, 3), (2, 1)), seed=1)
    res = evolve(toy, start, MAX, [0] * 6, n_batches=4, config=cfg, progress=False)
    assert sum(res.best) == TOTAL
    assert res.best == brute_force()


def test_respects_feasibility():
    cfg = EvoConfig(generations=30, offspring=6, steps=((1, 2), (2, 1)), seed=3)
    feasible = lambda lv: lv[0] <= lv[1]  # noqa: E731
    res = evolve(toy, (1, 2, 2, 2, 1, 1), MAX, [0] * 6, n_batches=2, config=cfg, feasible=feasible, progress=False)
    assert all(feasible(tuple(lv)) for lv in res.evaluated)
    assert sum(res.best) == TOTAL


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=8), st.integers(0, 2 ** 32 - 1), st.integers(1, 5))
def test_level_switch_keeps_each_group_sum_exactly(levels, seed, switches):
    rng = random.Random(seed)
    max_levels = [5] * len(levels)
    groups = [i % 2 for i in range(len(levels))]
    out = level_switch(levels, max_levels, groups, rng, switches)
    for g in (0, 1):
        assert sum(x for x, gg in zip(out, groups) if gg == g) == sum(x for x, gg in zip(levels, groups) if gg == g)
    assert all(0 <= x <= 5 for x in out)


def test_level_switch_moves_levels():
    rng = random.Random(0)
    moved = {tuple(level_switch([2, 2, 2], [4, 4, 4], [0, 0, 0], rng)) for _ in range(50)}
    assert (2, 2, 2) not in moved and len(moved) == 6  # every (up, down) pair of distinct units


def test_resume_refuses_another_search(tmp_path):
    ck = tmp_path / "b.json"
    evolve(toy, (2, 2, 2, 1, 1, 1), MAX, [0] * 6, 3, EvoConfig(generations=3, offspring=5, steps=((1, 2), (2, 1)), seed=7),
           checkpoint=ck, progress=False)
    assert json.loads(ck.read_text())["generation"] == 3
    with pytest.raises(ValueError, match="another search"):  # another seed: another search
        evolve(toy, (2, 2, 2, 1, 1, 1), MAX, [0] * 6, 3, EvoConfig(generations=6, offspring=5, steps=((1, 2), (2, 1)), seed=8),
               checkpoint=ck, resume=True, progress=False)


def test_resume_after_interruption(tmp_path):
    cfg = EvoConfig(generations=10, offspring=5, steps=((1, 2), (2, 1)), seed=5)
    start = (2, 2, 2, 1, 1, 1)
    straight = evolve(toy, start, MAX, [0] * 6, 3, cfg, checkpoint=tmp_path / "a.json", progress=False)
    calls = {"n": 0}

    def dies(levels, batch):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt
        return toy(levels, batch)

    ck = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        evolve(dies, start, MAX, [0] * 6, 3, cfg, checkpoint=ck, progress=False)
    done = json.loads(ck.read_text())["generation"]
    assert 0 < done < 10
    resumed = evolve(toy, start, MAX, [0] * 6, 3, cfg, checkpoint=ck, resume=True, progress=False)
    assert resumed.best == straight.best and resumed.history == straight.history and resumed.fitness == straight.fitness


def test_spaces_write_policies():
    tok = TokenSpace(layers=(1, 2, 3), criterion="fastv", entry="mctf:layer=0", levels=4)
    sub = SublayerSpace(attn_layers=(1, 2, 3), ffn_layers=(0, 1, 2, 3))
    joint = JointSpace((tok, sub))
    lv = tok.canonical(5) + sub.canonical(2)
    assert tok.canonical(5) == [1, 1, 1, 2] and joint.valid(lv)
    assert joint.policy_string(lv) == ("mctf:layer=0,keep=0.75+fastv:layer=3,keep=0.5+skip_sublayers:attn=2;3")
    assert not joint.valid([2, 1, 1, 1] + sub.canonical(2))  # tokens do not come back
    assert joint.policy_string([0] * len(lv)) is None
    assert joint.groups == [0] * 4 + [1] * 7


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 4)), min_size=2, max_size=7), st.integers(0, 2 ** 32 - 1),
       st.integers(0, 60))
def test_budget_trade_keeps_the_constraint_and_ends_tight(units, seed, slack):
    """Units of unequal cost per level (tokens vs sublayers vs heads), one budget on the total cost: a trade child
    is within the budget, valid (the first three units non-decreasing, like token levels), and tight: no unit can
    give back a level and stay within."""
    cost = [c for c, _ in units]
    max_levels = [4] * len(units)
    levels = sorted(x for _, x in units[:3]) + [x for _, x in units[3:]]
    spent = lambda lv: sum(c * (m - x) for c, m, x in zip(cost, max_levels, lv))  # noqa: E731  (level = compression)
    budget = spent(levels) + slack
    valid = lambda lv: all(0 <= x <= m for x, m in zip(lv, max_levels)) and list(lv[:3]) == sorted(lv[:3])  # noqa: E731
    within = lambda lv: spent(lv) <= budget  # noqa: E731
    out = budget_trade(levels, max_levels, random.Random(seed), valid, within)
    assert valid(out) and within(out)
    if out != levels:
        for i in range(len(out)):
            lower = list(out)
            lower[i] -= 1
            assert not (valid(lower) and within(lower))


def test_seeding_never_loses_to_a_seed():
    """A seed with another level sum than the start (unreachable by the level switch) that is better: the search
    returns it, or something at least as good on every calibration batch."""
    start = (4, 4, 0, 0, 1, 0)  # sum 9, far from the optimum
    seed = (0, 3, 1, 4, 0, 2)  # T itself: toy's optimum, sum 10
    cfg = EvoConfig(generations=3, offspring=4, steps=((1, 2), (2, 1)), seed=2)
    res = evolve(toy, start, MAX, [0] * 6, n_batches=3, config=cfg, seeds=[seed], progress=False)
    full = lambda lv: sum(toy(lv, b) for b in range(3)) / 3  # noqa: E731
    assert res.fitness == pytest.approx(full(res.best)) and res.fitness <= full(seed) + 1e-12
    unseeded = evolve(toy, start, MAX, [0] * 6, n_batches=3, config=cfg, progress=False)
    assert sum(unseeded.best) == 9 and full(unseeded.best) > full(seed)  # the level switch alone cannot get there


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, 4)] * 6), min_size=1, max_size=4), st.integers(0, 1000))
def test_result_is_never_worse_than_any_seed(seeds, seed):
    cfg = EvoConfig(generations=2, offspring=3, steps=((1, 2), (2, 1)), seed=seed, trade=0.5)
    res = evolve(toy, (2, 2, 2, 1, 1, 1), MAX, [0] * 6, n_batches=2, config=cfg, seeds=seeds, progress=False,
                 valid=lambda lv: all(0 <= x <= 4 for x in lv), within=lambda lv: True)
    full = lambda lv: (toy(lv, 0) + toy(lv, 1)) / 2  # noqa: E731
    assert all(res.fitness <= full(tuple(s_)) + 1e-12 for s_ in seeds)


def test_criterion_unit_and_preset_vectors():
    tok = TokenSpace(layers=(1, 2, 3), entry="mctf:layer=0", levels=4, criteria=("fastv", "dart"))
    assert tok.units == ("input", "layer1", "layer2", "layer3", "criterion") and tok.max_levels == (3, 3, 3, 3, 1)
    joint = JointSpace((tok, SublayerSpace(attn_layers=(1, 2, 3), ffn_layers=(0,))))
    assert joint.groups == [0, 0, 0, 0, 1, 2, 2, 2, 2]  # the criterion never trades levels with token budgets
    assert tok.vector(layers={1: 2}, criterion="dart") == [0, 2, 2, 2, 1]
    assert joint.policy_string(tok.vector(layers={1: 2}, criterion="dart") + [0] * 4) == "dart:layer=1,keep=0.5"
    assert joint.policy_string(tok.vector(entry=1, layers={3: 2}) + [1, 0, 0, 0]) == (
        "mctf:layer=0,keep=0.75+fastv:layer=3,keep=0.5+skip_sublayers:attn=1")
    assert not tok.valid([0, 2, 1, 3, 0]) and tok.valid([0, 1, 1, 3, 1])
