"""EvoPress's search loop (Sieberling et al., arXiv 2410.14649, Algorithm 1), over any level space.

A (1 + lambda) evolution strategy: each generation makes ``offspring`` children of the parent by
level-switch mutation (``mutation.level_switch``: a few switches, each keeping every group's level
sum exactly; children failing ``feasible`` are redrawn), then selects in several steps on growing
calibration subsets: all candidates (the parent included, so it survives unless beaten at a step) are scored on the first
``steps[0][0]`` batches of this generation's random subset and the best ``steps[0][1]`` survive, which
are scored on ``steps[1][0]`` batches, and so on; the last survivor is the next parent. Lower
fitness is better (EvoPress: KL divergence to the uncompressed model).

Beyond the paper: ``config.trade`` is the share of children made by ``mutation.budget_trade`` (budget moved
between groups under one constraint, for units of unequal cost) instead of the level switch; ``seeds``
(e.g. presets the space can express) compete with the start in the first generation; and the result is
the best of the last parent, the start, the seeds and every candidate that reached the last selection
step, re-scored on ALL calibration batches (so the search never returns something a seed beats there).

Deterministic for a seed: one ``random.Random`` drives every draw. Resumable: after every
generation the parent, the generator's state and every per-batch fitness computed so far are
written atomically to ``checkpoint``; a resumed run continues exactly as the straight run would.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from .checkpoint import read_json, write_json_atomic
from .mutation import budget_trade, level_switch

Levels = tuple[int, ...]
FORMAT = "vlm_tokenprune.search/1"


@dataclass(frozen=True)
class EvoConfig:
    """``steps``: ``(calibration batches, survivors)`` per selection step, batches growing, survivors
    shrinking to 1. ``max_switches``: a child gets ``min(U(1, k), U(1, k))`` switches (few, mostly one)."""

    generations: int = 20
    offspring: int = 16
    steps: tuple[tuple[int, int], ...] = ((1, 4), (2, 2), (4, 1))
    max_switches: int = 3
    seed: int = 0
    max_tries: int = 50
    trade: float = 0.0

    def __post_init__(self) -> None:
        if self.generations < 0 or self.offspring < 1 or self.max_switches < 1 or not 0 <= self.trade <= 1:
            raise ValueError("generations >= 0, offspring >= 1, max_switches >= 1, 0 <= trade <= 1")
        if not self.steps or self.steps[-1][1] != 1:
            raise ValueError(f"steps must end with one survivor, got {self.steps}")
        b = [s[0] for s in self.steps]
        k = [s[1] for s in self.steps]
        if b != sorted(b) or k != sorted(k, reverse=True) or min(b) < 1 or min(k) < 1:
            raise ValueError(f"steps: batches must grow and survivors shrink, got {self.steps}")


@dataclass
class EvoResult:
    best: Levels
    fitness: float  # the best's mean fitness on all calibration batches (the final re-scoring)
    history: list = field(default_factory=list)  # per generation: {"generation", "parent", "fitness", "candidates"}
    evaluated: dict = field(default_factory=dict)  # levels -> {batch: fitness}


def _key(levels: Sequence[int]) -> str:
    return ",".join(str(int(x)) for x in levels)


def _unkey(key: str) -> Levels:
    return tuple(int(x) for x in key.split(",")) if key else ()


def _rng_state(rng: random.Random) -> list:
    v, state, gauss = rng.getstate()
    return [v, list(state), gauss]


def _set_rng(rng: random.Random, data: list) -> None:
    rng.setstate((data[0], tuple(data[1]), data[2]))


def signature(config: EvoConfig, max_levels: Sequence[int], groups: Sequence[int], start: Sequence[int], n_batches: int,
              extra: str = "") -> str:
    """What a checkpoint must match to be resumed (the search definition, not its progress or length)."""
    cfg = asdict(config)
    cfg.pop("generations")  # a resumed run may go on for more generations
    blob = json.dumps([cfg, list(max_levels), list(groups), list(start), n_batches, extra], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evolve(fitness: Callable[[Levels, int], float], start: Sequence[int], max_levels: Sequence[int],
           groups: Sequence[int], n_batches: int, config: EvoConfig = EvoConfig(), *,
           feasible: Callable[[Levels], bool] = lambda levels: True, checkpoint: "str | os.PathLike | None" = None,
           resume: bool = False, progress: bool = True, extra_signature: str = "", seeds: Sequence[Sequence[int]] = (),
           valid: Callable[[Levels], bool] | None = None, within: Callable[[Levels], bool] | None = None) -> EvoResult:
    """Search level vectors with the level sum of ``start`` (per group) for the lowest mean ``fitness``.

    ``fitness(levels, batch)``: the loss of one calibration batch (cached: each pair is computed once).
    ``n_batches``: calibration batches available (>= the last step's). ``checkpoint``: a JSON file written
    after every generation; ``resume=True`` continues from it (refused if the search differs). ``seeds``:
    feasible level vectors (any level sums) that join the first generation's selection and the final one.
    ``valid`` / ``within`` (the structure / the budget; ``feasible`` is both) drive ``budget_trade``
    children when ``config.trade > 0`` (default: ``feasible`` for both).
    """
    from tqdm.auto import tqdm

    start = tuple(int(x) for x in start)
    if config.steps[-1][0] > n_batches:
        raise ValueError(f"the last selection step uses {config.steps[-1][0]} calibration batches; only {n_batches} given")
    if not feasible(start):
        raise ValueError(f"the start {start} is not feasible")
    seeds = [s_ for s_ in dict.fromkeys(tuple(int(x) for x in sd) for sd in seeds) if s_ != start]
    bad = [s_ for s_ in seeds if not feasible(s_)]
    if bad:
        raise ValueError(f"seeds {bad} are not feasible")
    valid_ = valid or feasible
    within_ = within or feasible
    sig = signature(config, max_levels, groups, start, n_batches, extra_signature + json.dumps([list(s_) for s_ in seeds]))
    rng = random.Random(config.seed)
    cache: dict[str, dict[str, float]] = {}
    parent, parent_fit, gen0, history = start, float("nan"), 0, []
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        data = read_json(checkpoint)
        if data.get("format") != FORMAT or data.get("signature") != sig:
            raise ValueError(f"{checkpoint}: a checkpoint of another search (signature {data.get('signature')} != {sig}); "
                             "start afresh without resume or use another checkpoint path")
        _set_rng(rng, data["rng"])
        cache = data["cache"]
        parent, parent_fit, gen0, history = _unkey(data["parent"]), data["fitness"], data["generation"], data["history"]

    def score(levels: Levels, batches: Sequence[int]) -> float:
        per = cache.setdefault(_key(levels), {})
        for b in batches:
            if str(b) not in per:
                per[str(b)] = float(fitness(levels, b))
        return sum(per[str(b)] for b in batches) / len(batches)

    bar = tqdm(total=config.generations, initial=gen0, desc="search", disable=not progress)
    try:
        for gen in range(gen0, config.generations):
            subset = rng.sample(range(n_batches), config.steps[-1][0])
            children: list[Levels] = []
            for _ in range(config.offspring):
                for _ in range(config.max_tries):
                    if config.trade > 0 and rng.random() < config.trade:
                        child = tuple(budget_trade(parent, max_levels, rng, lambda v: valid_(tuple(v)), lambda v: within_(tuple(v))))
                    else:
                        k = min(rng.randint(1, config.max_switches), rng.randint(1, config.max_switches))
                        child = tuple(level_switch(parent, max_levels, groups, rng, k))
                    if child != parent and child not in children and feasible(child):
                        children.append(child)
                        break
            cands = [parent] + children + ([s_ for s_ in seeds if s_ not in children] if gen == 0 else [])
            cands_all = list(cands)
            for n_b, survivors in config.steps:
                scores = [score(c, subset[:n_b]) for c in cands]
                order = sorted(range(len(cands)), key=lambda i: (scores[i], i))  # ties: the parent, then draw order
                cands = [cands[i] for i in order[:survivors]]
                best_score = scores[order[0]]
            parent, parent_fit = cands[0], best_score
            history.append({"generation": gen, "parent": list(parent), "fitness": parent_fit, "candidates": len(cands_all)})
            if checkpoint is not None:
                write_json_atomic(checkpoint, {"format": FORMAT, "signature": sig, "generation": gen + 1, "parent": _key(parent),
                                               "fitness": parent_fit, "rng": _rng_state(rng), "cache": cache, "history": history})
            bar.update(1)
            bar.set_postfix(fitness=f"{parent_fit:.4g}")
    finally:
        bar.close()
    # final selection on every calibration batch: the last parent, the start, the seeds and every candidate
    # that reached the last step of its generation (ties: that order)
    last = config.steps[-1][0]
    pool = [parent, start, *seeds] + [_unkey(k) for k, per in cache.items() if len(per) >= last]
    pool = list(dict.fromkeys(pool))
    every = list(range(n_batches))
    scored = [(score(c, every), i) for i, c in enumerate(pool)]
    best_fit, best_i = min(scored)
    return EvoResult(pool[best_i], best_fit, history, {_unkey(k): {int(b): v for b, v in per.items()} for k, per in cache.items()})
