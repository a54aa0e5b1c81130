"""A policy is data: an ordered list of stages, each saying where, what, by which criterion
and with which budget. Parses from a compact string, a dict, YAML or JSON; ``to_dict()``
round-trips. Model-free checks happen here; checks against a model in ``patching``.

String grammar::

    policy := stage ("+" stage)*
    stage  := name [":" key "=" value ("," key "=" value)*]

``name`` is a registered preset (every method registers one carrying its paper
defaults, e.g. ``"fastv"`` = layer 2, keep 0.5). Keys override the preset: ``layer``,
``keep`` (fraction of the row's ORIGINAL visual tokens, in (0, 1]), ``tokens`` (a count
of visual tokens per row), ``site``, ``op`` and the criterion's own parameters.

Structural stages (``vlm_tokenprune.structural.spec``) are written with the op as the name
and take their own parameters, no criterion or budget: ``skip_layers:layers=5;9,scope=visual``,
``prune_heads:heads=2/0;3/1``, ``ffn_cut:ratio=2``, ``neighbor_attention:window=5``,
``visual_drop:layer=6`` (lists are joined with ``;``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

from .errors import IncompatiblePolicyError, PolicyError, UnknownNameError
from .registry import CRITERIA, PRESETS
from .site_kind import INPUT_SITES, SITES, VISION, SiteKind
from .structural.spec import STRUCTURAL_OPS, TOKEN_OPS, check_structural, params_to_dict, params_to_string

RESERVED_SITES: tuple[str, ...] = ()
TOKEN_CRITERION_OPS = ("prune", "merge")  # ops run by a criterion (merge: pre_llm only)
OPS = TOKEN_CRITERION_OPS + STRUCTURAL_OPS
RESERVED_OPS: tuple[str, ...] = ()
# pre-LLM stages: position ids of the reduced sequence (see README "Pre-LLM stages")
POSITIONS = ("gaps", "repack")
STAGE_KEYS = ("site", "layer", "op", "criterion", "keep", "tokens", "of", "rounding", "depth")
BUDGET_REFERENCES = ("original", "current")
# Policy.parse reads a one-line string without "=" ending in one of these as the path of a policy file
POLICY_FILE_SUFFIXES = (".yaml", ".yml", ".json")
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
    def structural(self) -> bool:
        return self.op not in TOKEN_CRITERION_OPS

    @property
    def changes_tokens(self) -> bool:
        """LLM-site token-set ops (``prune``, ``visual_drop``): ordered by layer, run by the engine's layer hooks."""
        return self.is_llm and self.op in TOKEN_OPS

    @property
    def scores_on_llm_layer(self) -> bool:
        """An LLM-site prune stage: its criterion reads decoder layer ``layer - 1`` (attention, keys)."""
        return self.is_llm and self.op == "prune"

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


@dataclass(frozen=True)
class Policy:
    """An ordered tuple of stages. Build with ``Policy.parse`` (str | dict | Policy) or the file readers.

    ``source``: the string / dict it was parsed from (not compared): ``patch()`` parses it again for the
    model's family when it names a family preset (``flowcut``: the paper's setting for each model family).
    """

    stages: tuple[Stage, ...]
    source: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise PolicyError("stages", "a policy needs at least one stage")
        object.__setattr__(self, "stages", tuple(_check_stage(st, f"stages[{i}]") for i, st in enumerate(self.stages)))
        ops = [s.op for s in self.stages if s.structural and s.op != "visual_drop"]
        for op in set(ops):
            if ops.count(op) > 1:
                raise PolicyError(f"stages[{len(self.stages) - 1}].op", f"{op} appears twice; give one stage per structural op")
        vis = [i for i, s in enumerate(self.stages) if s.is_vision]
        if len(vis) > 1:
            raise PolicyError(f"stages[{vis[1]}].site", "a policy takes one vision stage; allowed: at most one")
        if vis and vis[0] != 0:
            raise PolicyError(f"stages[{vis[0]}].site", "a vision stage acts before the language model; allowed: list "
                              "it first")
        if vis and any(s.is_pre_llm for s in self.stages):
            raise PolicyError(f"stages[{vis[0]}].site", "a vision stage and a pre_llm stage both reduce the language "
                              "model's input; allowed: one of them")
        pre = [i for i, s in enumerate(self.stages) if s.is_pre_llm]
        if len(pre) > 1:
            raise PolicyError(f"stages[{pre[1]}].site", "a policy takes one pre_llm stage; allowed: at most one")
        first_llm = next((i for i, s in enumerate(self.stages) if s.changes_tokens), None)
        if pre and first_llm is not None and first_llm < pre[0]:
            raise PolicyError(
                f"stages[{pre[0]}].site",
                "a pre_llm stage reduces the language model's input before layer 0; allowed: list it before every "
                f"LLM token stage (stage {first_llm} is one)",
            )
        # budgets never grow: the pre_llm stage (before layer 0) then the LLM token stages by layer
        llm = [(i, s) for i, s in enumerate(self.stages) if s.changes_tokens or s.is_pre_llm]
        for (_, a), (i, b) in zip(llm, llm[1:]):
            if a.is_pre_llm:
                _check_budgets_shrink(a, b, i)
                continue
            if b.layer <= a.layer:
                raise PolicyError(
                    f"stages[{i}].layer",
                    f"token stages (prune, visual_drop) must have strictly increasing layers, got {a.layer} then {b.layer}",
                )
            if a.op == "visual_drop":
                raise PolicyError(
                    f"stages[{i}].op", f"no token stage can follow visual_drop (layer {a.layer}): no visual token is left"
                )
            _check_budgets_shrink(a, b, i)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: "str | Mapping | Policy | os.PathLike", family: str | None = None) -> "Policy":
        """A policy string, a dict, a ``Policy``, or the path of a YAML / JSON policy file (``.yaml``, ``.yml``,
        ``.json``). ``family``: the model's ``config.model_type``; a family preset (``flowcut``) takes that
        family's setting (``patch()`` passes it; without it, the preset's default family)."""
        if isinstance(spec, Policy):
            if family is not None and spec.source is not None:
                return cls.parse(spec.source, family)  # built from a string or dict: that family's setting
            return spec
        if isinstance(spec, os.PathLike) or (isinstance(spec, str) and "\n" not in spec and "=" not in spec
                                             and spec.strip().lower().endswith(POLICY_FILE_SUFFIXES)):
            return cls.from_file(os.fspath(spec).strip())  # a policy file: YAML or JSON by its suffix
        if isinstance(spec, str):
            return cls.from_string(spec, family)
        if isinstance(spec, Mapping):
            return cls.from_dict(spec, family)
        raise PolicyError("policy", f"expected a string, a dict or a Policy, got {type(spec).__name__}")

    @classmethod
    def from_string(cls, text: str, family: str | None = None) -> "Policy":
        text = text.strip()
        if not text:
            raise PolicyError("policy", "empty policy string; expected e.g. 'fastv:layer=2,keep=0.5'")
        stages: list[Stage] = []
        for i, part in enumerate(text.split("+")):
            name, _, rest = part.strip().partition(":")
            name = name.strip()
            overrides: dict[str, Any] = {}
            for item in filter(None, (x.strip() for x in rest.split(","))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise PolicyError(f"stages[{i}]", f"expected key=value, got {item!r}")
                if key.strip() in overrides:
                    raise PolicyError(f"stages[{i}].{key.strip()}", f"given twice in {part.strip()!r}; "
                                      "allowed: each key once per stage")
                overrides[key.strip()] = _parse_value(value.strip())
            if name in STRUCTURAL_OPS and name not in PRESETS:
                stages.append(_build_stage({"op": name, **overrides}, f"stages[{i}]"))
                continue
            stages.extend(expand_preset(name, overrides, f"stages[{i}]", family))
        return cls(tuple(stages), source=text)

    @classmethod
    def from_dict(cls, data: Mapping, family: str | None = None) -> "Policy":
        if "stages" not in data:
            raise PolicyError("policy", "a policy dict needs a 'stages' list")
        unknown = set(data) - {"stages"}
        if unknown:
            raise PolicyError("policy", f"unknown keys {sorted(unknown)}; allowed: stages")
        raw = data["stages"]
        if not isinstance(raw, (list, tuple)):
            raise PolicyError("stages", f"must be a list, got {type(raw).__name__}")
        stages: list[Stage] = []
        for i, st in enumerate(raw):
            where = f"stages[{i}]"
            if not isinstance(st, Mapping):
                raise PolicyError(where, f"must be a dict, got {type(st).__name__}")
            st = dict(st)
            if "preset" in st:
                stages.extend(expand_preset(st.pop("preset"), st, where, family))
                continue
            budget = st.pop("budget", None)
            if budget is not None:
                if not isinstance(budget, Mapping) or set(budget) - {"keep", "tokens", "of", "rounding"}:
                    raise PolicyError(f"{where}.budget", f"must be {{'keep': x[, 'of': 'original'|'current']}} or {{'tokens': n}}, got {budget!r}")
                st.update(budget)
            params = st.pop("params", {}) or {}
            if not isinstance(params, Mapping):
                raise PolicyError(f"{where}.params", f"must be a dict, got {params!r}")
            shadow = sorted(set(params) & (set(STAGE_KEYS) | {"budget", "preset", "params"}))
            if shadow and st.get("op", "prune") in TOKEN_CRITERION_OPS:  # would silently replace the stage's own field
                raise PolicyError(f"{where}.params.{shadow[0]}", f"{shadow[0]!r} is a stage field, not a criterion "
                                  f"parameter; allowed: give it on the stage itself ({where}.{shadow[0]})")
            if st.get("op", "prune") not in TOKEN_CRITERION_OPS:
                if budget is not None or st.get("criterion") is not None:
                    raise PolicyError(f"{where}.{'budget' if budget is not None else 'criterion'}",
                                      f"a structural op ({st['op']}) takes no criterion or budget")
                st.pop("criterion", None)
                stages.append(_build_stage({**st, **params}, where))
                continue
            if "criterion" not in st:
                raise PolicyError(where, "needs 'criterion' (or 'preset')")
            stages.append(_build_stage({**st, **params}, where))
        return cls(tuple(stages), source=data if any("preset" in st for st in raw if isinstance(st, Mapping)) else None)

    @classmethod
    def from_json(cls, source: str) -> "Policy":
        """From a JSON document or the path of a JSON file."""
        text = _read_if_path(source, (".json",))
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise PolicyError("policy", f"invalid JSON: {e}") from None
        except RecursionError:
            raise PolicyError("policy", f"JSON nested too deeply; allowed: at most {_MAX_DEPTH} levels") from None
        if not isinstance(data, Mapping):
            raise PolicyError("policy", f"a JSON policy must be an object with a 'stages' list, got {type(data).__name__}")
        _check_depth(data)
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, source: str) -> "Policy":
        """From a YAML document or the path of a YAML file (needs PyYAML)."""
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - PyYAML is a dependency
            raise PolicyError("policy", "reading YAML needs PyYAML (pip install pyyaml)") from e
        try:
            data = yaml.load(_read_if_path(source, (".yaml", ".yml")), Loader=_unique_key_loader())
        except yaml.YAMLError as e:
            raise PolicyError("policy", f"invalid YAML: {e}") from None
        except RecursionError:
            raise PolicyError("policy", f"YAML nested too deeply; allowed: at most {_MAX_DEPTH} levels") from None
        if not isinstance(data, Mapping):
            raise PolicyError("policy", "a YAML policy must be a mapping with a 'stages' list")
        _check_depth(data)
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str) -> "Policy":
        if str(path).lower().endswith((".yaml", ".yml")):
            return cls.from_yaml(path)
        return cls.from_json(path)

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_string(self) -> str:
        return "+".join(s.describe() for s in self.stages)

    def to_yaml(self) -> str:
        """The policy as a YAML document (``Policy.from_yaml`` reads it back to an equal policy)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def __add__(self, other: "Policy | str | Mapping") -> "Policy":
        """``a + b``: a's stages then b's (``vtp.FastV(layer=2, keep=0.25) + vtp.FFNCut(ratio=2)``), validated."""
        if not isinstance(other, (Policy, str, Mapping)):
            return NotImplemented
        return Policy(self.stages + Policy.parse(other).stages)

    def __radd__(self, other: "str | Mapping") -> "Policy":
        if not isinstance(other, (str, Mapping)):
            return NotImplemented
        return Policy(Policy.parse(other).stages + self.stages)

    def __str__(self) -> str:
        return self.to_string()

    @property
    def keeps_everything(self) -> bool:
        return all(s.budget is not None and s.budget.keep == 1 for s in self.stages)

    @property
    def token_stages(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.changes_tokens)

    @property
    def structural_stages(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.structural)

    @property
    def depth_relative(self) -> bool:
        """True when some stage's layer is written for a reference depth (``Stage.depth``): see ``at_depth``."""
        return any(s.depth is not None for s in self.stages)

    def at_depth(self, num_layers: int, first_layer: int = 1) -> "Policy":
        """This policy for a model with ``num_layers`` decoder layers (``patch()`` calls it; so do ``explain``
        and the FLOPs model).

        Rule (a stage with ``depth`` R, i.e. a preset's paper layer for an R-layer model): its layer becomes
        ``min(num_layers - 1, max(first_layer, floor(layer * num_layers / R + 0.5)))`` and its ``depth`` goes,
        so at ``num_layers == R`` nothing changes (the paper's layers). ``first_layer``: the first layer a
        token stage may act at (1, or one past the model's first full-attention layer). Stages without a
        ``depth`` (an explicit ``layer=``) keep their layer. Token stages (prune, visual_drop) that land on a
        layer at or below an earlier token stage's collapse into one stage there: the later stage wins (its
        criterion, its budget; an ``of=current`` budget is composed with the earlier one's, e.g. FEATHER 0.3
        then 0.09 of what is left -> 0.027 of the original), so layers stay strictly increasing.
        """
        if not self.depth_relative:
            return self
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
            raise PolicyError("num_layers", f"must be an integer >= 2 (decoder layers), got {num_layers!r}")
        out: list[Stage] = []
        for st in self.stages:
            if st.depth is not None:
                mapped = math.floor(st.layer * num_layers / st.depth + 0.5)
                st = replace(st, layer=min(num_layers - 1, max(first_layer, mapped)), depth=None)
            prev = next((j for j in range(len(out) - 1, -1, -1) if out[j].changes_tokens), None)
            if st.changes_tokens and prev is not None and st.layer <= out[prev].layer:
                a = out.pop(prev)
                st = replace(st, layer=a.layer, budget=_composed_budget(a.budget, st.budget))
            out.append(st)
        return Policy(tuple(out))


# -- helpers -----------------------------------------------------------------------------------
def _composed_budget(a: Budget | None, b: Budget | None) -> Budget | None:
    """Budget of stage ``b`` replacing the earlier stage ``a`` (``Policy.at_depth``'s collapse)."""
    if a is None or b is None or b.of == "original":
        return b
    if a.tokens is not None:  # b keeps a fraction of a's count
        return Budget(tokens=b.count(a.tokens, a.tokens))
    return Budget(keep=a.keep * b.keep, of=a.of, rounding=b.rounding)


def _check_budgets_shrink(a: Stage, b: Stage, i: int) -> None:
    """Stage ``b`` (index ``i``) runs after token stage ``a``: its budget cannot exceed ``a``'s."""
    if a.budget is None or b.budget is None:
        return
    both_original = a.budget.of == b.budget.of == "original"
    if both_original and a.budget.keep is not None and b.budget.keep is not None and b.budget.keep > a.budget.keep:
        raise PolicyError(
            f"stages[{i}].keep",
            f"keep is a fraction of the original visual tokens and cannot grow across stages: "
            f"{a.budget.keep} then {b.budget.keep} (of=current: a fraction of what is left)",
        )
    if a.budget.tokens is not None and b.budget.tokens is not None and b.budget.tokens > a.budget.tokens:
        raise PolicyError(
            f"stages[{i}].tokens",
            f"a later stage cannot keep more tokens than an earlier one: {a.budget.tokens} then {b.budget.tokens}",
        )


_MAX_DEPTH = 32  # nesting levels a policy document may have (a real one has 4)


def _read_if_path(source: str, suffixes: tuple[str, ...] = ()) -> str:
    """The text of file ``source``, or ``source`` itself when it is a document (not a path).

    A one-line ``source`` ending in one of ``suffixes`` is a path: a missing file is an error (not a
    one-word document); a file that is not UTF-8 text is an error naming the byte.
    """
    text = str(source)
    if isinstance(source, os.PathLike) or ("\n" not in text and os.path.isfile(text)):
        try:
            with open(source, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise PolicyError("policy", f"{text} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              "allowed: a UTF-8 JSON / YAML file") from None
        except OSError as e:
            raise PolicyError("policy", f"cannot read {text}: {e.strerror or e}") from None
    if "\n" not in text and text.strip().lower().endswith(suffixes) and suffixes:
        raise PolicyError("policy", f"no such file: {text}")
    return text


def _unique_keys(pairs: list) -> dict:
    """JSON ``object_pairs_hook``: a key given twice in one object is an error (not "the last one wins")."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise PolicyError(f"policy.{k}", "given twice in one JSON object; allowed: each key once")
        out[k] = v
    return out


def _unique_key_loader():
    """A ``yaml.SafeLoader`` whose mappings refuse a key given twice (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise PolicyError(f"policy.{key}", f"given twice in one YAML mapping ({key_node.start_mark}); "
                                      "allowed: each key once")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _check_depth(data: Any, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise PolicyError("policy", f"nested too deeply; allowed: at most {_MAX_DEPTH} levels")
    if isinstance(data, Mapping):
        for v in data.values():
            _check_depth(v, depth + 1)
    elif isinstance(data, (list, tuple)):
        for v in data:
            _check_depth(v, depth + 1)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _build_structural(fields: dict, where: str) -> Stage:
    """A structural op's dict fields -> its Stage (unchecked: ``_check_stage`` holds the rules)."""
    op = fields.pop("op")
    site = fields.pop("site", "llm")
    for bad in ("criterion", "keep", "tokens"):  # keys a structural Stage cannot even hold
        if fields.get(bad) is not None:
            raise PolicyError(f"{where}.{bad}", f"a structural op ({op}) takes no criterion or budget")
        fields.pop(bad, None)
    layer, depth = fields.pop("layer", None), fields.pop("depth", None)
    return Stage(criterion=None, layer=layer, budget=None, params=fields, site=site, op=op, depth=depth)


def _build_stage(fields: dict, where: str) -> Stage:
    """A stage's dict fields (a string's ``key=value`` pairs, a dict stage, a preset's stage dicts) -> its checked,
    normalised Stage. Only the mapping of fields is here; every rule is in ``_check_stage`` (run once per stage)."""
    if fields.get("op", "prune") not in TOKEN_CRITERION_OPS:
        return _check_stage(_build_structural(fields, where), where)
    name = fields.pop("criterion")
    crit = CRITERIA.get(name, f"{where}.criterion")
    site = fields.pop("site", "llm")
    op = fields.pop("op", crit.op)
    default_layer = getattr(crit, "default_layer", None) if site == VISION else None  # the method's own first layer
    layer, depth = fields.pop("layer", default_layer), fields.pop("depth", None)
    keep, tokens = fields.pop("keep", None), fields.pop("tokens", None)
    if isinstance(keep, int) and not isinstance(keep, bool):
        keep = float(keep)
    try:  # the budget rules live in Budget (check_budget): named here by this stage's fields
        budget = Budget(keep, tokens, fields.pop("of", "original"), fields.pop("rounding", "half_up"))
    except PolicyError as e:
        field = e.field.split(".", 1)[1] if e.field.startswith("budget.") else ""
        raise at_key(e, f"{where}.{field}" if field else where) from None
    return _check_stage(Stage(criterion=name, layer=layer, budget=budget, params=fields, site=site, op=op, depth=depth),
                        where)


def _criterion_params(crit: Any, given: Mapping[str, Any], site: str, where: str) -> dict:
    """The criterion's parameters, plus ``positions`` on a pre_llm or vision stage."""
    given = dict(given)
    if site not in ("pre_llm", "vision"):
        return crit.check_params(given, where)
    positions = given.pop("positions", POSITIONS[0])
    if positions not in POSITIONS:
        raise PolicyError(f"{where}.positions", f"must be one of {', '.join(POSITIONS)}, got {positions!r}")
    return {**crit.check_params(given, where), "positions": positions}


def _check_depth_field(st: Stage, where: str) -> None:
    """``depth``: the decoder depth an LLM-site ``layer`` was written for (an integer > ``layer``)."""
    if st.depth is None:
        return
    if not st.is_llm or st.layer is None:
        raise PolicyError(f"{where}.depth", "only applies to an LLM-site stage with a layer (the decoder depth that "
                          "layer was written for)")
    if isinstance(st.depth, bool) or not isinstance(st.depth, int) or st.depth < 2:
        raise PolicyError(f"{where}.depth", f"must be an integer >= 2 (a decoder depth), got {st.depth!r}")
    if isinstance(st.layer, int) and not isinstance(st.layer, bool) and st.layer >= st.depth:
        raise PolicyError(f"{where}.layer", f"{st.layer} is beyond the reference depth {st.depth}; allowed: "
                          f"1..{st.depth - 1}")


def _check_stage(st: Stage, where: str) -> Stage:
    """Every rule of one stage (the only place they live), named by ``where``; returns the stage with its
    parameters normalised (defaults filled), marked as checked so ``Policy`` does not check it again."""
    if getattr(st, "_checked", False):
        return st
    if st.site not in SITES:
        hint = " (reserved; not implemented yet)" if st.site in RESERVED_SITES else ""
        raise PolicyError(f"{where}.site", f"{st.site!r}{hint}; allowed: {', '.join(SITES)}")
    if st.op not in OPS:
        hint = " (reserved; not implemented yet)" if st.op in RESERVED_OPS else ""
        raise PolicyError(f"{where}.op", f"{st.op!r}{hint}; allowed: {', '.join(OPS)}")
    if st.structural:
        if st.criterion is not None or st.budget is not None:
            raise PolicyError(f"{where}.criterion", f"a structural op ({st.op}) takes no criterion or budget")
        if st.op == "visual_drop" and st.layer is None:
            raise PolicyError(f"{where}.layer", "is required for visual_drop (the first decoder layer without visual "
                              "tokens, >= 1)")
        if st.op == "visual_drop" and (isinstance(st.layer, bool) or not isinstance(st.layer, int) or st.layer < 1):
            raise PolicyError(f"{where}.layer", f"must be an integer >= 1 (layer 0 cannot be pruned), got {st.layer!r}")
        if st.op != "visual_drop" and st.layer is not None:
            raise PolicyError(f"{where}.layer", f"{st.op} takes its layers in 'layers' (a list joined with ';'), not "
                              "'layer'")
        params = check_structural(st.op, dict(st.params), where)
        _check_depth_field(st, where)
        return _checked(replace(st, params=params))
    crit = CRITERIA.get(st.criterion, f"{where}.criterion")
    if st.site not in crit.sites:
        raise PolicyError(f"{where}.site", f"criterion {st.criterion!r} does not run at site {st.site!r}; allowed: {', '.join(crit.sites)}")
    if st.op != crit.op:
        raise PolicyError(f"{where}.op", f"criterion {st.criterion!r} is a {crit.op} criterion; allowed: {crit.op}")
    if st.is_pre_llm:
        if st.layer is not None:
            raise PolicyError(f"{where}.layer", "a pre_llm stage takes no layer (it reduces the language model's input)")
    elif st.is_vision:
        if st.layer is not None and not getattr(crit, "takes_layer", False):
            raise PolicyError(f"{where}.layer", f"criterion {st.criterion!r} takes no layer (its schedule follows the "
                              "vision feature layer)")
        if st.layer is not None and (isinstance(st.layer, bool) or not isinstance(st.layer, int) or st.layer < 0):
            raise PolicyError(f"{where}.layer", f"must be a vision-encoder layer index >= 0, got {st.layer!r}")
    elif st.layer is None:
        raise PolicyError(f"{where}.layer", "is required for an LLM stage (decoder layer index >= 1)")
    elif isinstance(st.layer, bool) or not isinstance(st.layer, int) or st.layer < 1:
        raise PolicyError(f"{where}.layer", f"must be an integer >= 1 (layer 0 cannot be pruned), got {st.layer!r}")
    if st.budget is None:
        raise PolicyError(where, "give exactly one of keep (a fraction in (0, 1]) or tokens (a count >= 1)")
    params = _criterion_params(crit, st.params, st.site, where)
    _check_depth_field(st, where)
    return _checked(replace(st, params=params))


def _checked(st: Stage) -> Stage:
    object.__setattr__(st, "_checked", True)  # not a field: equality, dicts and copies ignore it
    return st


def stage_from_fields(fields: Mapping[str, Any], where: str) -> Stage:
    """One stage from its dict fields (``{"criterion": "fastv", "layer": 2, "keep": 0.25}``, a structural op's
    ``{"op": "ffn_cut", ...}``), built and checked; ``PolicyError`` naming ``where.<field>`` otherwise. For
    presets whose ``expand`` builds stages itself (YOPO)."""
    return _build_stage(dict(fields), where)


def expand_preset(name: str, overrides: Mapping[str, Any], where: str, family: str | None = None) -> list[Stage]:
    """Stages of preset ``name`` with ``overrides`` applied (single-stage presets take any key). A registered
    criterion without a preset of its name (e.g. a user's own ``register_criterion``) is one stage of it, written
    out: ``mine:layer=2,keep=0.5``."""
    if name not in PRESETS and isinstance(name, str) and name in CRITERIA:
        return [_build_stage({"criterion": name, **overrides}, where)]
    if name not in PRESETS:  # the error lists presets and criteria alike (both are valid first words)
        raise UnknownNameError(f"{where}.method", name, set(PRESETS.names()) | set(CRITERIA.names()) | set(STRUCTURAL_OPS))
    preset = PRESETS.get(name, f"{where}.method")
    if isinstance(preset, FamilyPreset):
        return preset.expand(dict(overrides), where, family)
    return preset.expand(dict(overrides), where)


@dataclass(frozen=True)
class Preset:
    """A named policy fragment carrying a paper's defaults."""

    name: str
    stages: tuple[Mapping[str, Any], ...]
    description: str = ""
    arxiv: str | None = None

    def expand(self, overrides: dict, where: str) -> list[Stage]:
        if len(self.stages) == 1:
            base = dict(self.stages[0])
            if overrides.get("site") in INPUT_SITES:  # no decoder layer there (an LLM preset's layer goes)
                base.pop("layer", None)
                base.pop("depth", None)
            if "layer" in overrides:  # an explicit layer is absolute (unless a depth is given with it)
                base.pop("depth", None)
            if "tokens" in overrides or "keep" in overrides:  # a budget override replaces the preset's budget
                base.pop("keep", None)
                base.pop("tokens", None)
                base.pop("of", None)
                if "tokens" in overrides:
                    base.pop("rounding", None)
            return [_build_stage({**base, **overrides}, where)]
        layers = ", ".join(str(st.get("layer")) for st in self.stages if st.get("layer") is not None)
        own = {st.get("criterion") for st in self.stages}
        if "layer" in overrides and own == {self.name}:
            # a multi-stage preset named after its criterion, given a layer: one stage of that criterion
            # written out (what Stage.describe() prints, so to_string() round-trips), e.g. "aim:layer=2,keep=0.5"
            if "keep" not in overrides and "tokens" not in overrides:
                raise PolicyError(
                    f"{where}.keep",
                    f"preset {self.name!r} has {len(self.stages)} stages (layers {layers}); with layer= it becomes ONE "
                    f"{self.name} stage, which needs its budget: give keep= or tokens= too (e.g. "
                    f"{self.name}:layer={overrides['layer']},keep=0.25); to move every stage, write them out "
                    f"(`vlm-tokenprune methods` prints them)",
                )
            return [_build_stage({"criterion": self.stages[0]["criterion"], **overrides}, where)]
        allowed = self.overridable()
        bad = sorted(set(overrides) - set(allowed))
        if bad:
            fixed = bad[0] in STAGE_KEYS
            raise PolicyError(
                f"{where}.{bad[0]}",
                f"preset {self.name!r} has {len(self.stages)} stages{f' (layers {layers})' if layers else ''}; "
                + (f"its {bad[0]} cannot be overridden as a whole" if fixed else f"{bad[0]!r} is no parameter of it")
                + f"; allowed: {', '.join(allowed) or '(nothing)'}"
                + (f", or layer= with keep= / tokens= for one {self.name} stage" if own == {self.name} else "")
                + "; to change layers or budgets write the stages out (`vlm-tokenprune methods` prints them)",
            )
        out = []
        for j, st in enumerate(self.stages):
            fields = {**st, **overrides}
            if "rounding" in overrides and fields.get("keep") is None:
                fields.pop("rounding")  # rounding applies to the stages with a fraction
            try:
                out.append(_build_stage(fields, f"{where}[{j}]"))
            except PolicyError as e:  # a bad override: named by the key the user wrote (aim:tau= -> stages[0].tau)
                key = e.field.rsplit(".", 1)[-1]
                if key not in overrides:
                    raise
                raise at_key(e, f"{where}.{key}") from None
        return out

    def overridable(self) -> list[str]:
        """Keys a multi-stage preset takes as a whole: its criteria's parameters and ``rounding``."""
        keys: set[str] = set()
        for st in self.stages:
            if st.get("criterion") in CRITERIA:
                crit = CRITERIA.get(st["criterion"])
                keys |= set(crit.params)
                if st.get("site") in INPUT_SITES:
                    keys.add("positions")
        if any("keep" in st for st in self.stages):
            keys.add("rounding")
        return sorted(keys)


class FamilyPreset(Preset):
    """A paper's name whose setting depends on the model family (e.g. ``flowcut``): ``choices`` maps a
    ``config.model_type`` to a preset; ``patch()`` picks the model's (``Policy.parse(..., family=)``), and
    without a family (``Policy.parse("flowcut")``) the first choice is the default. Keys go to the chosen preset."""

    def __init__(self, name: str, choices: Mapping[str, str], description: str = "", arxiv: str | None = None):
        super().__init__(name, (), description, arxiv)
        object.__setattr__(self, "choices", dict(choices))

    def expand(self, overrides: dict, where: str, family: str | None = None) -> list[Stage]:
        target = self.choices.get(family, next(iter(self.choices.values())))
        return expand_preset(target, overrides, where)


def register_family_preset(name: str, choices: Mapping[str, str], description: str = "",
                           arxiv: str | None = None) -> Preset:
    """Register a paper's name that picks a preset per model family (see ``FamilyPreset``)."""
    return PRESETS.register(name, FamilyPreset(name, choices, description, arxiv))


def at_key(e: PolicyError, field: str) -> PolicyError:
    """``e`` re-addressed to ``field`` (a preset's user-facing key instead of an internal stage field)."""
    message = str(e)[len(e.field) + 2:] if str(e).startswith(f"{e.field}: ") else str(e)
    cls = type(e) if type(e) in (PolicyError, IncompatiblePolicyError) else PolicyError
    return cls(field, message)


def register_preset(name: str, stages: list[dict], description: str = "", arxiv: str | None = None) -> Preset:
    return PRESETS.register(name, Preset(name, tuple(stages), description, arxiv))
