"""Policy search: EvoPress (arXiv 2410.14649) over token budgets, removed sublayers and heads under a
FLOPs budget, and FinerCut's (arXiv 2405.18218) greedy sublayer removal. ``search_policy`` is the
entry point (``vlm-tokenprune search`` on the command line)."""
from .evolution import EvoConfig, EvoResult, evolve
from .head_space import HeadSpace
from .mutation import level_switch
from .space import JointSpace, Space
from .sublayer_space import SublayerSpace
from .token_space import TokenSpace

__all__ = ["EvoConfig", "EvoResult", "evolve", "HeadSpace", "JointSpace", "Space", "SublayerSpace", "TokenSpace",
           "level_switch", "search_policy"]


def __getattr__(name: str):
    if name == "search_policy":
        from .api import search_policy

        return search_policy
    raise AttributeError(name)
