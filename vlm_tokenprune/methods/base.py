"""The criterion interface: ``score(ctx, **params) -> Tensor[B, N]``, higher = keep.

A criterion is a function of tensors. It reads what it needs from the ``ScoringContext``
(hidden states, visual-token positions, grid coordinates, attention rows computed on
demand) and never touches the model. Top-k, gather and bookkeeping are written once in
the engine.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import torch

from ..errors import PolicyError
from ..registry import CRITERIA

if TYPE_CHECKING:
    from ..adapters.base import Seams
    from ..scoring import ScoringContext


def last_row_flops(geometry: Any, n_keys: int) -> float:
    """``q_proj`` on one query row + one row of logits over ``n_keys`` captured keys (RoPE, softmax not counted)."""
    return float(2 * geometry.hidden_size * geometry.q_dim + 2 * n_keys * geometry.q_dim)


@dataclass(frozen=True)
class Param:
    """A criterion parameter: its paper default, type, and an optional check."""

    default: Any
    type: type
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None
    allowed: str = ""

    def validate(self, value: Any, where: str) -> Any:
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise PolicyError(where, f"must be of type {self.type.__name__}, got {value!r}")
        if self.type is int and not -(2**63) <= value < 2**63:  # torch reads it as int64 at the first forward
            raise PolicyError(where, f"must be an integer in [-2**63, 2**63), got {value!r}")
        if self.type is float and math.isnan(value):
            raise PolicyError(where, f"must be a number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise PolicyError(where, f"must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.check is not None and not self.check(value):
            raise PolicyError(where, f"must be {self.allowed}, got {value!r}")
        return value


class Criterion:
    """Base class. Subclasses set ``name``, ``paper``, ``arxiv``, ``params`` and implement ``score``."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str | None] = None
    params: ClassVar[dict[str, Param]] = {}
    sites: ClassVar[tuple[str, ...]] = ("llm",)  # where it runs: "llm" (decoder layers) and/or "pre_llm"
    op: ClassVar[str] = "prune"  # "prune": score + select; "merge": ``merge(ctx, **params)`` (pre_llm)
    # True when, at its pre_llm / vision site, a criterion's kept set needs only the visual tokens (no text, no
    # LLM layer) and each image's kept count follows from the budget and token counts alone, so a serving engine
    # can size an image's placeholders before the language model runs (VisionZip, VisPruner, DivPrune, AIM merge,
    # uniform, random)
    image_only_fixed_count: ClassVar[bool] = False
    # True when the criterion reads ``ScoringContext.embeds`` (the hidden states entering decoder layer 0, e.g.
    # SparseVLM's text raters): the LLM site then hooks layer 0 to keep them. Else ``ctx.embeds`` is None, and a
    # layer 0 whose input the policy leaves alone gets no hook (decode steps run nothing there)
    reads_embeds: ClassVar[bool] = False
    # Whether ``eval.flops`` / ``explain`` may take a stage's budget as this criterion's kept count. None (default):
    # yes unless the criterion overrides ``select`` (FEATHER's union with a grid may keep more: the predicted counts
    # after it are lower bounds). True: yes although it overrides ``select`` (EfficientVLA keeps exactly the budget;
    # ATP's budget is its training target, what it keeps on average). False: never.
    budget_predicts_count: ClassVar[bool | None] = None

    def score(self, ctx: "ScoringContext", **params: Any) -> torch.Tensor:
        """``[B, N]`` scores over ``ctx.visual_idx``; higher = keep."""
        raise NotImplementedError(f"criterion {self.name!r} must implement score()")

    def bind(self, model: torch.nn.Module, params: Mapping[str, Any], where: str, seams: "Seams") -> "Criterion":
        """Called by ``patch()`` before any hook exists: check the criterion fits ``model`` and load
        what it needs (a learned selector's weight file). ``seams``: the model's ``adapters.base.Seams``
        (decoder layers, language model, mask format), from the engine: methods never resolve adapters.
        Returns the object whose ``score`` / ``select`` the handle will call (default: ``self``, criteria
        are stateless). Raise a ``VTPError`` naming ``where`` (``"stages[i]"``) on a mismatch; never touch
        ``model``.
        """
        return self

    def bound(self, **state: Any) -> "Criterion":
        """A copy of this criterion carrying ``state`` (what ``bind`` loaded: weights, a module of the model); the
        registered instance stays stateless. Criteria whose ``score`` needs that state check it is set."""
        out = copy.copy(self)
        out.__dict__.update(state)
        return out

    def merge(self, ctx: "ScoringContext", **params: Any) -> list:
        """``op = "merge"`` criteria: the ``reduction.Reduction`` chain over the current sequence that fuses the
        visual tokens of ``ctx``. Pre-LLM site: applied by ``lm_input.apply_reduction``; LLM site (the stage layer's
        input, ``ctx.output``): by ``engine._run_merge``, where every real text token must survive as itself and
        slots stay in sequence order. Prune criteria never get this call."""
        raise NotImplementedError(f"criterion {self.name!r} is a merge criterion and must implement merge()")

    def adaptive_count(self, params: Mapping[str, Any]) -> bool:
        """True when the criterion decides a row's kept count from its input (SparseVLM's rank-based count): the
        stage's budget then only caps it (``ctx.keep`` is ``min(budget, n)``; a budget of every token keeps every
        token, as for any criterion), and ``eval.flops`` / ``explain`` report the count after the stage as an upper
        bound."""
        return False

    def predicted_count(self, k: int, n: int, params: Mapping[str, Any]) -> int:
        """Visual tokens left after a stage that keeps ``k`` of ``n`` (``eval.flops``, ``explain``): ``k``; a merge
        criterion that adds merged tokens on top of the ``k`` it keeps (SparseVLM's recycling) says how many."""
        return k

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        """FLOPs this criterion spends scoring one stage, reported apart from the model's own (``eval.flops``):
        ``geometry`` has the text model's ``hidden_size``, ``q_dim``, ``kv_dim``, ...; ``n_tokens`` enter the
        scoring layer, ``n_visual`` of them visual; ``params`` the stage's. None (default): no estimate."""
        return None

    def select(self, ctx: "ScoringContext", scores: torch.Tensor, **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Which visual tokens to keep: ``(idx [B, K], ok [B, K])`` into ``ctx.visual_idx``, ascending.

        Default: the top ``ctx.keep[b]`` scores of each row (ties to the lower position).
        Methods whose kept count is not a plain budget (FEATHER's union with a grid) override it.
        """
        return ctx.topk(scores)

    @classmethod
    def check_params(cls, given: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Fill defaults and validate; unknown keys name the allowed ones."""
        out = {}
        for key, value in given.items():
            if key not in cls.params:
                allowed = sorted({"layer", "keep", "tokens", "of", "site", "op", "positions"} | set(cls.params))
                raise PolicyError(f"{where}.{key}", f"unknown key for {cls.name!r}; allowed: {', '.join(allowed)}")
            out[key] = cls.params[key].validate(value, f"{where}.{key}")
        for key, p in cls.params.items():
            out.setdefault(key, p.default)
        return out


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    CRITERIA.register(cls.name, cls())
    return cls
