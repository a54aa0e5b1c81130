"""CoLa's per-sample search (arXiv 2507.07996): Monte Carlo tree search over layer chains for one input.

A chain is built layer by layer: at original layer i the action is to skip it (0), run it once (1)
or run it twice (2, a loop); after the last layer the chain is complete. Each simulation walks the
tree by UCT (``c``), expands one untried action, completes the chain with uniformly random actions
(rollout), scores it and backs the reward up. The reward favours a correct, short chain:
``reward(chain) = score(chain) - length_penalty * len(chain) / num_layers`` with ``score`` in [0, 1]
(here: the probability of the sample's answer tokens). Rewards of complete chains are cached (each
chain is run once). Seeded and deterministic.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

ACTIONS = (0, 1, 2)  # copies of the current layer in the chain: skip, run, loop


def chain_of(actions: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(actions) for _ in range(a))


@dataclass
class _Node:
    visits: int = 0
    total: float = 0.0
    children: dict = field(default_factory=dict)


@dataclass
class MCTSResult:
    chain: tuple[int, ...]
    reward: float
    evaluated: dict  # chain -> reward


def mcts(reward: Callable[[tuple[int, ...]], float], num_layers: int, simulations: int = 200, c: float = 1.4,
         seed: int = 0) -> MCTSResult:
    """The best complete chain found in ``simulations`` UCT simulations (empty chains are never scored)."""
    rng = random.Random(seed)
    root = _Node()
    cache: dict[tuple[int, ...], float] = {}

    def score(actions: tuple[int, ...]) -> float:
        ch = chain_of(actions)
        if not ch:
            return -1.0  # no layer at all: not a model
        if ch not in cache:
            cache[ch] = float(reward(ch))
        return cache[ch]

    for _ in range(simulations):
        node, actions, path = root, (), [root]
        while len(actions) < num_layers and len(node.children) == len(ACTIONS):  # selection
            log_n = math.log(node.visits)
            a, node = max(node.children.items(),
                          key=lambda kv: kv[1].total / kv[1].visits + c * math.sqrt(log_n / kv[1].visits))
            actions += (a,)
            path.append(node)
        if len(actions) < num_layers:  # expansion
            a = rng.choice([x for x in ACTIONS if x not in node.children])
            node.children[a] = _Node()
            node = node.children[a]
            actions += (a,)
            path.append(node)
        rollout = actions + tuple(rng.choice(ACTIONS) for _ in range(num_layers - len(actions)))
        r = score(rollout)
        for n in path:  # backup
            n.visits += 1
            n.total += r
    best = max(cache.items(), key=lambda kv: (kv[1], -len(kv[0]), tuple(-x for x in kv[0])))
    return MCTSResult(best[0], best[1], dict(cache))
