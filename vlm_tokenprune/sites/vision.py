"""The vision site: a stage between vision-encoder layers (``site="vision"``, CLIP towers of LLaVA /
LLaVA-NeXT; InternViT of InternVL, whole pixel-shuffle groups: ``vision.groups``; SigLIP of Gemma 3, whole
pooling windows, no CLS: ``VisionCriterion.cls_free``; Qwen3-VL's packed ViT, whole merge groups per image:
``vision.packed``). ``check`` validates the stage against the tower (``Adapter.vision_seams``) and the
criterion (``VisionCriterion.check_vision``); ``install`` registers the tower hooks
(``vision.hooks``). The reduced features reach the language model through the pre-LLM site.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..adapters.base import VisionSeams
from ..errors import IncompatiblePolicyError
from ..handle import PatchHandle
from ..registry import CRITERIA
from ..vision import hooks, packed_flowcut

if TYPE_CHECKING:
    from . import PatchTarget


def check(target: "PatchTarget") -> VisionSeams | None:
    """Patch-time validation of the (single) vision stage; returns the tower's seams (None: no vision stage)."""
    i = hooks.vision_stage_index(target.policy)
    if i is None:
        return None
    model = target.model
    where = f"stages[{i}]"
    if not target.adapter.supports_pre_llm or target.seams.language_model is None:
        raise IncompatiblePolicyError(
            f"{where}.site", f"site vision needs the pre-LLM path, which {model.config.model_type!r} does not support")
    stage = target.policy.stages[i]
    crit = target.criteria[i]
    try:
        vs, site_error = target.adapter.vision_seams(model, f"{where}.site"), None
    except IncompatiblePolicyError as e:
        vs, site_error = None, e
    no_cls = target.adapter.vision_no_cls
    own_rule = vs is not None and vs.packed is not None and stage.criterion in vs.packed.in_tower
    if no_cls and not own_rule and not getattr(crit, "cls_free", False) and (getattr(crit, "needs_cls", "") or
                                                                             site_error is None):
        ok = sorted(n for n in CRITERIA.names() if getattr(CRITERIA.get(n), "cls_free", False)
                    and (vs is None or vs.groups is None or getattr(CRITERIA.get(n), "whole_groups", False)))
        rules = "CLS-free rules"
        if vs is not None and vs.packed is not None:
            ok, rules = vs.packed.allowed(), "this tower's rules"
        here = (f"site vision with {', '.join(ok)} ({rules}), or " if ok and site_error is None else "") + \
            "site llm or pre_llm criteria"
        if getattr(crit, "needs_cls", ""):
            why, note = f"needs the vision tower's CLS token ({crit.needs_cls})", f"; {crit.cls_free_note}"
        else:
            why, note = "is implemented for towers with a CLS token only (its units keep CLS apart)", ""
        raise IncompatiblePolicyError(
            f"{where}.criterion", f"{stage.criterion!r} {why}, but {no_cls} on {model.config.model_type!r}{note}; "
            f"allowed here: {here}")
    if site_error is not None:
        raise site_error
    allowed = target.adapter.pre_llm_positions  # the kept tokens reach the language model through the pre-LLM path
    if stage.params.get("positions") not in allowed:
        raise IncompatiblePolicyError(
            f"{where}.positions", f"{stage.params.get('positions')!r} is not defined for {model.config.model_type!r} "
            f"({target.adapter.pre_llm_positions_why}); allowed: {', '.join(allowed)}")
    if vs.packed is not None and stage.criterion not in vs.packed.allowed():
        ok = vs.packed.allowed()
        why = ("whole-group selections are not mapped on this tower" if callable(getattr(crit, "select_units", None))
               else f"it defines no selection over whole {vs.group_kind[1]} per image")
        raise IncompatiblePolicyError(
            f"{where}.criterion", f"{stage.criterion!r} is not available on {model.config.model_type!r}'s packed vision "
            f"tower ({why}); allowed at site vision here: {', '.join(ok)} (or site llm / pre_llm)")
    if vs.groups is not None and not getattr(crit, "whole_groups", False):
        ok = sorted(n for n in CRITERIA.names() if getattr(CRITERIA.get(n), "whole_groups", False))
        raise IncompatiblePolicyError(
            f"{where}.criterion", f"{stage.criterion!r} selects single patches inside the vision tower, but each "
            f"{model.config.model_type!r} LLM token packs {vs.groups.shape[1]} patches ({vs.group_kind[0]}), so a vision "
            f"stage must keep or merge whole groups; allowed at site vision here: {', '.join(ok)} (or site llm / "
            "pre_llm)")
    if vs.packed is None and stage.budget.tokens is not None and stage.budget.tokens > vs.n_tokens:
        unit = "patch tokens" if vs.groups is None else f"LLM tokens ({vs.group_kind[1]})"
        raise IncompatiblePolicyError(
            f"{where}.tokens", f"{stage.budget.tokens} is more than the {vs.n_tokens} {unit} per crop; "
            f"allowed: 1..{vs.n_tokens}")
    if stage.layer is not None and not 0 <= stage.layer <= vs.feature_layer:
        raise IncompatiblePolicyError(
            f"{where}.layer", f"{stage.layer} is not a vision encoder layer at or below the feature layer; "
            f"allowed: 0..{vs.feature_layer}")
    target.criteria[i].check_vision(vs, stage, where)
    return vs


def install(handle: PatchHandle, vs: VisionSeams | None) -> None:
    handle.vision_seams = vs
    i = hooks.vision_stage_index(handle.policy)
    if vs is not None and vs.packed is not None and handle.policy.stages[i].criterion in vs.packed.in_tower:
        packed_flowcut.install(handle, vs, i)  # Qwen2-VL: FlowCut prunes inside the packed tower
    elif vs is not None and vs.packed is not None:  # Qwen3-VL's packed tower: its own hooks (vision.packed)
        vs.packed.install(handle, vs)
    elif vs is not None:
        hooks.install(handle, vs)
