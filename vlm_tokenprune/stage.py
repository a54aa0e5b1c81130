"""A policy's parts as data: ``Stage`` (where, what, which criterion, which budget), ``Budget`` (how many
visual tokens a row keeps) and the names a stage may take. Rules: ``stage_rules``; the policy: ``policy``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .errors import IncompatiblePolicyError, PolicyError
from .site_kind import SiteKind
from .structural.spec import STRUCTURAL_OPS, TOKEN_OPS, params_to_dict, params_to_string


RESERVED_SITES: tuple[str, ...] = ()
TOKEN_CRITERION_OPS = ("prune", "merge")  # ops run by a criterion (merge: pre_llm, and llm for merge criteria)
OPS = TOKEN_CRITERION_OPS + STRUCTURAL_OPS
RESERVED_OPS: tuple[str, ...] = ()
# position ids of the kept tokens after a token stage (the first is the default): pre_llm / vision stages (see
# README "Pre-LLM stages") and LLM stages (the layers after the stage; README "Semantics you should know")
POSITIONS = ("gaps", "repack")
# vision stages on LLaVA-NeXT: whether the image_newline tokens reach the language model (the first is the default)
NEWLINES = ("keep", "drop")
STAGE_PARAMS = ("positions", "newlines")  # stage keys kept in ``Stage.params`` that are no criterion parameter
STAGE_KEYS = ("site", "layer", "op", "criterion", "keep", "tokens", "of", "rounding", "depth")
BUDGET_REFERENCES = ("original", "current")
# how ``keep * n`` becomes a count (``Budget.rounding``): half_up (the library default) = floor(x + 0.5),
# floor = int(x) (e.g. FEATHER's released code, ``int(V * (1 - R))``), ceil; every mode keeps at least 1
ROUNDINGS = ("half_up", "floor", "ceil")


@dataclass(frozen=True)
class Budget:
    """How many visual tokens a row keeps after a stage: exactly one of ``keep`` / ``tokens``.

    ``keep`` is a fraction of the row's visual-token count: the ORIGINAL count by default
    (``of="original"``), or the count entering this stage (``of="current"``, e.g. FEATHER's
    second stage); the kept count is ``max(1, floor(keep * n + 0.5))`` (``rounding="half_up"``,
    the default), ``max(1, floor(keep * n))`` (``"floor"``: what e.g. FEATHER's released code
    does) or ``max(1, ceil(keep * n))`` (``"ceil"``). ``tokens`` is an absolute count per row.
    """

    keep: float | None = None
    tokens: int | None = None
    of: str = "original"
    rounding: str = "half_up"

    def __post_init__(self) -> None:
        check_budget(self.keep, self.tokens, "budget")
        if self.of not in BUDGET_REFERENCES:
            raise PolicyError("budget.of", f"must be one of {', '.join(BUDGET_REFERENCES)}, got {self.of!r}")
        if self.of != "original" and self.keep is None:
            raise PolicyError("budget.of", "only applies to keep (a fraction), not to tokens")
        if self.rounding not in ROUNDINGS:
            raise PolicyError("budget.rounding", f"must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.rounding != "half_up" and self.keep is None:
            raise PolicyError("budget.rounding", "only applies to keep (a fraction), not to tokens")

    def count(self, n_original: int, n_current: int | None = None) -> int:
        """Visual tokens a row keeps, given its original and (for ``of="current"``) current counts."""
        n = n_original if self.of == "original" or n_current is None else n_current
        if n <= 0:
            return 0
        if self.tokens is not None:
            return self.tokens
        x = self.keep * n
        k = math.floor(x) if self.rounding == "floor" else math.ceil(x) if self.rounding == "ceil" else math.floor(x + 0.5)
        return max(1, k)

    def to_dict(self) -> dict:
        if self.keep is None:
            return {"tokens": self.tokens}
        out = {"keep": self.keep}
        if self.of != "original":
            out["of"] = self.of
        if self.rounding != "half_up":
            out["rounding"] = self.rounding
        return out

    def describe(self) -> str:
        """``keep=0.3[,of=current][,rounding=floor]`` or ``tokens=64``: the string form's budget keys."""
        if self.keep is None:
            return f"tokens={self.tokens}"
        return "".join([f"keep={self.keep}", "" if self.of == "original" else f",of={self.of}",
                        "" if self.rounding == "half_up" else f",rounding={self.rounding}"])


def check_budget(keep: Any, tokens: Any, where: str) -> None:
    if (keep is None) == (tokens is None):
        raise PolicyError(where, f"give exactly one of keep (a fraction in (0, 1]) or tokens (a count >= 1), got keep={keep!r}, tokens={tokens!r}")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or math.isnan(keep) or not 0 < keep <= 1:
            raise PolicyError(f"{where}.keep", f"must be a number in (0, 1], got {keep!r}")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise PolicyError(f"{where}.tokens", f"must be an integer >= 1, got {tokens!r}")


@dataclass(frozen=True)
class Stage(SiteKind):
    """One reduction step: at ``site``/``layer``, do ``op`` with ``criterion`` under ``budget``.

    ``layer`` (site "llm") is the decoder layer whose INPUT is shortened; criteria score
    from layer ``layer - 1`` (FastV's convention). Site ``"pre_llm"`` stages have ``layer=None``:
    they shorten the language model's input (after the projector, before layer 0) and carry
    ``params["positions"]`` (``"gaps"``, the default, or ``"repack"``). Site ``"vision"`` stages act between
    vision-encoder layers (``vlm_tokenprune.vision``); their budget counts patches per crop, their
    optional ``layer`` is the first encoder layer the method acts at, and ``positions`` applies to the
    language model's input, where the tower's dropped / fused tokens leave the sequence. Structural ops (``op`` in
    ``structural.spec.STRUCTURAL_OPS``) have ``criterion=None`` and ``budget=None``; their
    layers live in ``params`` (``layer`` is set only for ``visual_drop``).

    ``depth`` (LLM-site ``layer`` only): the decoder depth ``layer`` was written for (a paper's
    reference model, e.g. 32 for LLaVA-1.5-7B); ``patch()`` maps it to the model's depth with
    ``Policy.at_depth`` (see there). ``None`` (what an explicit ``layer=`` gives): an absolute layer.
    """

    criterion: str | None
    layer: int | None
    budget: Budget | None
    params: Mapping[str, Any] = field(default_factory=dict)
    site: str = "llm"
    op: str = "prune"
    depth: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __hash__(self) -> int:
        return hash((self.criterion, self.layer, self.budget, tuple(sorted(self.params.items())), self.site, self.op,
                     self.depth))

    def __reduce__(self):
        # ``params`` is a read-only mappingproxy, which pickle / copy.deepcopy / torch.save cannot copy
        return (type(self), (self.criterion, self.layer, self.budget, dict(self.params), self.site, self.op, self.depth))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and self.to_dict() == other.to_dict()

    @property
    def criterion_params(self) -> dict:
        """``params`` without the stage keys (``positions``, ``newlines``): what the criterion is called with."""
        return {k: v for k, v in self.params.items() if k not in STAGE_PARAMS}

    @property
    def structural(self) -> bool:
        return self.op not in TOKEN_CRITERION_OPS

    @property
    def changes_tokens(self) -> bool:
        """LLM-site token-set ops (``prune``, ``merge``, ``visual_drop``): ordered by layer, run by the engine's layer
        hooks."""
        return self.is_llm and (self.op in TOKEN_OPS or self.op == "merge")

    @property
    def scores_on_llm_layer(self) -> bool:
        """An LLM-site prune or merge stage: its criterion reads decoder layer ``layer - 1`` (attention, keys)."""
        return self.is_llm and self.op in ("prune", "merge")

    def to_dict(self) -> dict:
        if self.structural:
            out = {"site": self.site, "op": self.op, "params": params_to_dict(self.op, self.params)}
            if self.layer is not None:
                out["layer"] = self.layer
            if self.depth is not None:
                out["depth"] = self.depth
            return out
        out = {
            "site": self.site,
            "layer": self.layer,
            "op": self.op,
            "criterion": self.criterion,
            "budget": self.budget.to_dict(),
            "params": dict(self.params),
        }
        if self.depth is not None:
            out["depth"] = self.depth
        return out

    def describe(self) -> str:
        if self.structural:
            head = [f"layer={self.layer}"] if self.layer is not None else []
            head += [f"depth={self.depth}"] if self.depth is not None else []
            rest = params_to_string(self.op, self.params)
            return f"{self.op}:{','.join(head + ([rest] if rest else []))}" if head or rest else self.op
        b = self.budget.describe()
        extra = "".join(f",{k}={v}" for k, v in sorted(self.params.items()))
        where = "site=pre_llm" if self.is_pre_llm else f"layer={self.layer}"  # op follows from the criterion
        where += "" if self.depth is None else f",depth={self.depth}"
        if self.is_vision:
            where = "site=vision" + ("" if self.layer is None else f",layer={self.layer}")
        return f"{self.criterion}:{where},{b}{extra}"


def at_key(e: PolicyError, field: str) -> PolicyError:
    """``e`` re-addressed to ``field`` (a preset's user-facing key instead of an internal stage field)."""
    message = str(e)[len(e.field) + 2:] if str(e).startswith(f"{e.field}: ") else str(e)
    cls = type(e) if type(e) in (PolicyError, IncompatiblePolicyError) else PolicyError
    return cls(field, message)
