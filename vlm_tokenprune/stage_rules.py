"""Every rule of one stage, in one place: ``build_stage`` maps a stage's fields (a string's ``key=value``
pairs, a dict stage, a preset's stage dicts) to a ``Stage``; ``check_stage`` holds the rules and normalises
the parameters (run once per stage)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from .errors import PolicyError
from .registry import CRITERIA
from .site_kind import SITES, VISION
from .structural.spec import check_structural
from .stage import NEWLINES, OPS, POSITIONS, RESERVED_OPS, RESERVED_SITES, TOKEN_CRITERION_OPS, Budget, Stage, at_key


def _build_structural(fields: dict, where: str) -> Stage:
    """A structural op's dict fields -> its Stage (unchecked: ``check_stage`` holds the rules)."""
    op = fields.pop("op")
    site = fields.pop("site", "llm")
    for bad in ("criterion", "keep", "tokens"):  # keys a structural Stage cannot even hold
        if fields.get(bad) is not None:
            raise PolicyError(f"{where}.{bad}", f"a structural op ({op}) takes no criterion or budget")
        fields.pop(bad, None)
    layer, depth = fields.pop("layer", None), fields.pop("depth", None)
    return Stage(criterion=None, layer=layer, budget=None, params=fields, site=site, op=op, depth=depth)


def build_stage(fields: dict, where: str) -> Stage:
    """A stage's dict fields (a string's ``key=value`` pairs, a dict stage, a preset's stage dicts) -> its checked,
    normalised Stage. Only the mapping of fields is here; every rule is in ``check_stage`` (run once per stage)."""
    if fields.get("op", "prune") not in TOKEN_CRITERION_OPS:
        return check_stage(_build_structural(fields, where), where)
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
    return check_stage(Stage(criterion=name, layer=layer, budget=budget, params=fields, site=site, op=op, depth=depth),
                        where)


def _criterion_params(crit: Any, given: Mapping[str, Any], site: str, where: str) -> dict:
    """The criterion's parameters, plus the stage keys of its site: ``positions`` (every token-stage site; on an
    LLM stage kept only when ``repack``, as ``gaps`` is the default there) and, on a vision stage, ``newlines``
    (kept only when ``drop``)."""
    given = dict(given)
    positions = given.pop("positions", POSITIONS[0])
    if positions not in POSITIONS:
        raise PolicyError(f"{where}.positions", f"must be one of {', '.join(POSITIONS)}, got {positions!r}")
    newlines = given.pop("newlines", NEWLINES[0])
    if newlines not in NEWLINES:
        raise PolicyError(f"{where}.newlines", f"must be one of {', '.join(NEWLINES)}, got {newlines!r}")
    if newlines != NEWLINES[0] and site != "vision":
        raise PolicyError(f"{where}.newlines", "only applies to a site=vision stage (LLaVA-NeXT image_newline tokens "
                          "leave the language model's input with the tower's dropped patches); allowed here: keep")
    params = crit.check_params(given, where)
    if site in ("pre_llm", "vision"):
        params["positions"] = positions
    elif positions != POSITIONS[0]:
        params["positions"] = positions
    if newlines != NEWLINES[0]:
        params["newlines"] = newlines
    return params


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


def check_stage(st: Stage, where: str) -> Stage:
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
    return build_stage(dict(fields), where)
