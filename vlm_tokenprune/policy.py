"""A policy is data: an ordered list of stages, each saying where, what, by which criterion
and with which budget. Parses from a compact string, a dict, YAML or JSON; ``to_dict()``
round-trips. Model-free checks: one stage's in ``stage_rules``, across stages here (``Policy``); checks against a
model in ``patching``. The parts: ``stage`` (Stage, Budget), ``presets`` (named fragments); all importable from here.

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
from typing import Any, Mapping

from .errors import PolicyError
from .registry import PRESETS
from .site_kind import SITES  # noqa: F401
from .structural.spec import STRUCTURAL_OPS
# the parts of a policy, importable from here as before the split into stage / stage_rules / presets
from .presets import FamilyPreset, Preset, expand_preset, register_family_preset, register_preset  # noqa: F401
from .stage import (BUDGET_REFERENCES, OPS, POSITIONS, RESERVED_OPS, RESERVED_SITES, ROUNDINGS,  # noqa: F401
                    STAGE_KEYS, TOKEN_CRITERION_OPS, Budget, Stage, at_key, check_budget)
from .stage_rules import build_stage, check_stage, stage_from_fields  # noqa: F401

# Policy.parse reads a one-line string without "=" ending in one of these as the path of a policy file
POLICY_FILE_SUFFIXES = (".yaml", ".yml", ".json")


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
        object.__setattr__(self, "stages", tuple(check_stage(st, f"stages[{i}]") for i, st in enumerate(self.stages)))
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
        """A policy string, a dict, a ``Policy``, the path of a YAML / JSON policy file (``.yaml``, ``.yml``,
        ``.json``), or an inline JSON (``{...}``) / YAML (``stages:`` or several lines) document. ``family``: the model's ``config.model_type``; a family preset (``flowcut``) takes that
        family's setting (``patch()`` passes it; without it, the preset's default family)."""
        if isinstance(spec, Policy):
            if family is not None and spec.source is not None:
                return cls.parse(spec.source, family)  # built from a string or dict: that family's setting
            return spec
        if isinstance(spec, os.PathLike) or (isinstance(spec, str) and "\n" not in spec and "=" not in spec
                                             and spec.strip().lower().endswith(POLICY_FILE_SUFFIXES)):
            return cls.from_file(os.fspath(spec).strip())  # a policy file: YAML or JSON by its suffix
        if isinstance(spec, str):
            head = spec.lstrip()
            if head.startswith("{"):  # an inline JSON document (no policy string starts with "{")
                return cls.from_json(spec)
            if head.startswith("stages:") or "\n" in spec.strip():  # an inline YAML document (a string is one line)
                return cls.from_yaml(spec)
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
                stages.append(build_stage({"op": name, **overrides}, f"stages[{i}]"))
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
                stages.append(build_stage({**st, **params}, where))
                continue
            if "criterion" not in st:
                raise PolicyError(where, "needs 'criterion' (or 'preset')")
            stages.append(build_stage({**st, **params}, where))
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


