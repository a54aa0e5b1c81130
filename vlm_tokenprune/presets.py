"""Presets: named policy fragments carrying a paper's defaults (``register_preset``), family presets that pick
one per model family (``register_family_preset``), and their expansion into stages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import PolicyError, UnknownNameError
from .registry import CRITERIA, PRESETS
from .site_kind import INPUT_SITES
from .structural.spec import STRUCTURAL_OPS
from .stage import STAGE_KEYS, Stage, at_key
from .stage_rules import build_stage


def expand_preset(name: str, overrides: Mapping[str, Any], where: str, family: str | None = None) -> list[Stage]:
    """Stages of preset ``name`` with ``overrides`` applied (single-stage presets take any key). A registered
    criterion without a preset of its name (e.g. a user's own ``register_criterion``) is one stage of it, written
    out: ``mine:layer=2,keep=0.5``."""
    if name not in PRESETS and isinstance(name, str) and name in CRITERIA:
        return [build_stage({"criterion": name, **overrides}, where)]
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
            return [build_stage({**base, **overrides}, where)]
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
            return [build_stage({"criterion": self.stages[0]["criterion"], **overrides}, where)]
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
            # newlines= concerns the vision stage only (the LM input it reduces)
            fields = {**st, **{k: v for k, v in overrides.items() if k != "newlines" or st.get("site") == "vision"}}
            if "rounding" in overrides and fields.get("keep") is None:
                fields.pop("rounding")  # rounding applies to the stages with a fraction
            try:
                out.append(build_stage(fields, f"{where}[{j}]"))
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
                if st.get("site") in INPUT_SITES or "positions" in st:
                    keys.add("positions")
                if st.get("site") == "vision":
                    keys.add("newlines")
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


def register_preset(name: str, stages: list[dict], description: str = "", arxiv: str | None = None) -> Preset:
    return PRESETS.register(name, Preset(name, tuple(stages), description, arxiv))
