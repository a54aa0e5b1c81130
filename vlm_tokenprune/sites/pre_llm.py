"""The pre-LLM site: stages that shorten the language model's input before decoder layer 0
(``site="pre_llm"``, and the hand-over of a vision-site stage's reduced features).

``check`` validates support and the ``positions`` convention on this model; ``install`` registers
the language model's forward pre-hook (``lm_pre_hook``, below): prefill runs the stage's criterion
(or takes the vision tower's outcome) and hands the result to ``lm_input.apply_reduction``; decode
steps continue the reduced prompt's mask and positions.
"""
from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

import torch

from ..engine import cache_of, fit_budget
from ..errors import IncompatiblePolicyError, InputError
from ..handle import PatchHandle
from ..lm_input import apply_reduction, to_original
from ..marking import mark_hook
from ..reduction import Reduction
from ..scoring import ScoringContext
from ..selection import right_packed
from ..state import ForwardState, StageRecord
from ..vision import hooks as vision_hooks

if TYPE_CHECKING:
    from . import PatchTarget


def check(target: "PatchTarget") -> bool:
    """True when the language model's input hook is needed (a pre_llm or vision stage)."""
    model, adapter, seams = target.model, target.adapter, target.seams
    for i, st in enumerate(target.policy.stages):
        if not st.is_pre_llm:
            continue
        if seams.language_model is None or not adapter.supports_pre_llm:
            raise IncompatiblePolicyError(
                f"stages[{i}].site",
                f"pre_llm is not supported for {model.config.model_type!r} yet; "
                "allowed models: llava, llava_next, qwen2_vl, qwen2_5_vl",
            )
        allowed = adapter.pre_llm_positions
        if st.params.get("positions") not in allowed:
            raise IncompatiblePolicyError(
                f"stages[{i}].positions",
                f"{st.params.get('positions')!r} is not defined for {model.config.model_type!r} "
                f"({adapter.pre_llm_positions_why}); allowed: {', '.join(allowed)}",
            )
    return any(st.reduces_input for st in target.policy.stages)


def install(handle: PatchHandle, needed: bool) -> None:
    if not needed:
        return
    lm = handle.seams.language_model
    handle.add_hook(
        f"{type(lm).__name__}: forward pre-hook (pre_llm / vision stage: reduce inputs_embeds, position ids, 2-D mask)",
        lm.register_forward_pre_hook(mark_hook(functools.partial(lm_pre_hook, handle)), with_kwargs=True),
    )


# -- the hooks ------------------------------------------------------------------------------------
def lm_pre_hook(handle: "PatchHandle", module, args: tuple, kwargs: dict):
    """Forward pre-hook on the language model: a pre_llm stage shortens its input.

    Prefill: the criterion gives a chain of ``Reduction``s (prune: keep indices; merge: fused
    groups), applied by ``apply_reduction`` to ``inputs_embeds``, the position ids (1-D, or
    M-RoPE ``[3, B, L]``), the 2-D padding mask and the source map; the forward state is then
    rebased on the reduced sequence, so later LLM stages and structural ops work on it as on a
    prompt. The language model builds its own causal mask and rotary tables for the shorter
    sequence, and every layer caches only the kept tokens. Decode: the 2-D mask's prompt
    columns are gathered at the kept positions, and position ids continue the chosen convention.
    """
    st = handle.state
    if st is None or st.phase == "passthrough" or (st.prefill.pre_llm is None and st.phase != "prefill"):
        return None
    kwargs = dict(kwargs)
    if st.phase == "prefill":
        _pre_llm_prefill(handle, st, kwargs)
    else:
        _pre_llm_decode(handle, st, kwargs)
    return args, kwargs


def _pre_llm_prefill(handle: "PatchHandle", st: ForwardState, kwargs: dict) -> None:
    """Run the policy's pre_llm stage on the language model's input ``kwargs`` (in place)."""
    t0 = time.perf_counter()
    i = next(i for i, s in enumerate(handle.policy.stages) if s.reduces_input)
    stage = handle.policy.stages[i]
    if stage.is_vision:  # the vision tower already reduced: drop its empty slots (vlm_tokenprune.vision)
        return vision_hooks.lm_prefill(handle, st, kwargs, stage, t0)
    hidden = kwargs.get("inputs_embeds")
    if hidden is None:
        raise InputError("inputs_embeds", "a pre_llm stage needs the language model to receive inputs_embeds")
    B, L = hidden.shape[:2]
    dev = hidden.device
    layout, valid = st.layout, st.valid
    is_vis = layout.is_visual & valid
    n_vis = is_vis.sum(1)
    k_list = [stage.budget.count(n, c) for n, c in zip(st.n_visual.tolist(), n_vis.tolist())]
    k_list, relaxed = fit_budget(handle, i, stage, k_list, n_vis.tolist())
    ar = torch.arange(L, device=dev).expand(B, L)
    if all(k == n for k, n in zip(k_list, n_vis.tolist())):  # keeps everything: the input is untouched
        vis_orig, vis_ok = right_packed(is_vis, to_original(st, ar))
        st.prefill.records.append(StageRecord(stage, to_original(st, ar), valid, vis_orig, vis_ok, n_vis, n_vis, L, L,
                                              time.perf_counter() - t0, noop=True, relaxed=relaxed))
        return
    vis_idx, vis_ok = right_packed(is_vis, ar, int(n_vis.max()))
    g = lambda t: torch.gather(t, 1, vis_idx)  # noqa: E731
    ctx = ScoringContext(
        layer=None, hidden=hidden, position_embeddings=None, seq_valid=valid,
        last_idx=(valid * torch.arange(L, device=dev)).argmax(1), visual_idx=vis_idx, visual_ok=vis_ok,
        orig_pos=to_original(st, vis_idx), row=g(layout.row), col=g(layout.col), segment=g(layout.segment),
        image=g(layout.image), is_newline=g(layout.is_newline), coords_known=layout.coords_known,
        keep=torch.tensor(k_list, device=dev), ops=handle.ops,
    )
    crit = handle.criteria[i]
    params = {k: v for k, v in stage.params.items() if k != "positions"}
    with torch.no_grad():
        if stage.op == "merge":
            chain = crit.merge(ctx, **params)
        else:
            scores = crit.score(ctx, **params)
            sel, sel_ok = crit.select(ctx, scores, **params)
            sel_ok = sel_ok & torch.gather(vis_ok, 1, sel)
            keep = torch.zeros(B, L + 1, dtype=torch.bool, device=dev)
            keep.scatter_(1, torch.gather(vis_idx, 1, sel).masked_fill(~sel_ok, L), True)
            chain = [Reduction.prune(keep[:, :L] | (valid & ~layout.is_visual))]
    apply_reduction(handle, st, kwargs, chain, stage=stage, positions=stage.params["positions"], t0=t0)
    st.prefill.records[-1].relaxed = relaxed


def _pre_llm_decode(handle: PatchHandle, st: ForwardState, kwargs: dict) -> None:
    """Tokens after a reduced prompt: gather the 2-D mask's prompt columns (a model that hands its language
    model one 4-D mask per layer type, Gemma 3: the adapter's ``decode_masks`` over original positions);
    continue the position ids."""
    rec = st.prefill.pre_llm
    L = rec.prompt_len
    B, Mp = rec.kept.shape
    x = kwargs.get("inputs_embeds")
    q = (x if x is not None else kwargs["input_ids"]).shape[1]  # the original LLaVA decodes from input_ids
    cache = cache_of(kwargs)
    past = cache.get_seq_length() if cache is not None else Mp
    mask2d = kwargs.get("attention_mask")
    if isinstance(mask2d, dict):
        dtype = x.dtype if x is not None else torch.float32
        kwargs["attention_mask"] = handle.adapter.decode_masks(handle, mask2d, rec.kept, rec.kept_ok, L, past, q, dtype)
    elif mask2d is not None:
        head = torch.gather(mask2d[:, :L], 1, rec.kept) * rec.kept_ok.to(mask2d.dtype)
        kwargs["attention_mask"] = torch.cat([head, mask2d[:, L:]], dim=1)
    elif not bool(rec.kept_ok.all()):
        tail = torch.ones(B, past - Mp + q, dtype=torch.long, device=rec.kept.device)
        kwargs["attention_mask"] = torch.cat([rec.kept_ok.long(), tail], dim=1)
    steps = past - Mp + torch.arange(q, device=rec.kept.device)
    if rec.next_pos is not None:  # M-RoPE: every axis continues after the prompt's largest position
        kwargs["position_ids"] = (rec.next_pos[:, None] + steps[None]).expand(3, B, q)
        return
    pid = kwargs.get("position_ids")
    if pid is None:  # what the unpatched model would use: its cache would hold the whole prompt
        pid = (L + steps)[None].expand(B, q)
    kwargs["position_ids"] = pid - rec.shift[:, None]
