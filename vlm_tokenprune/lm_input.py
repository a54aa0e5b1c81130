"""Shortening the language model's input before decoder layer 0: the one place where a pre-LLM stage
(``sites.pre_llm``) or a vision-site stage (``vision.hooks``) hands its kept indices / merge assignment
(``Reduction`` chains) to the sequence the layers see, and the position helpers the trace speaks in."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .adapters.base import VisualLayout
from .errors import InputError
from .masking import shrink_mask
from .selection import right_packed
from .state import ForwardState, PreLLMRecord, StageRecord

if TYPE_CHECKING:
    from .handle import PatchHandle


def apply_reduction(handle: "PatchHandle", st: ForwardState, kwargs: dict, chain: list, *, stage: Any,
                    positions: str, t0: float) -> None:
    """Apply ``chain`` (``Reduction``s over the language model's current input, in order) to ``kwargs``.

    The one place where the language model's input is shortened before layer 0 (any site that
    reduces visual tokens before the LLM hands its kept indices / merge assignment here as
    ``Reduction.prune(keep)`` / ``Reduction.from_targets(target)``): hidden states (mean or
    size-weighted mean, sizes carried across calls), position ids (``gaps``: the representative's
    own, 1-D or M-RoPE ``[3, B, L]``; ``repack``: 1-D, contiguous from the row's first real
    token), the 2-D padding mask, the source map and a ``StageRecord``; then the forward state
    is rebased on the reduced sequence (layout, valid tokens, prompt length) so later LLM stages,
    structural ops and decoding treat it as the prompt. Several calls in one prefill compose.
    """
    hidden = kwargs["inputs_embeds"]
    B, M = hidden.shape[:2]
    dev = hidden.device
    pre = st.prefill.pre_llm
    valid, layout = st.valid, st.layout
    n_before = (layout.is_visual & valid).sum(1)
    L0 = pre.prompt_len if pre is not None else M  # the original prompt's length
    size = pre.size if pre is not None else torch.ones(B, M, dtype=hidden.dtype, device=dev)
    cur_orig = pre.kept if pre is not None else torch.arange(M, device=dev).expand(B, M)
    owner = pre.owner if pre is not None else torch.where(valid, torch.arange(M, device=dev).expand(B, M), -1)
    rep, ok = torch.arange(M, device=dev).expand(B, M), valid
    for r in chain:
        hidden = r.fuse(hidden, size)
        size = r.add(size)
        rep, ok = r.take(rep), r.ok
        owner = r.route(owner)
    kept = torch.gather(cur_orig, 1, rep)  # original position of each slot's representative
    into = torch.where(owner >= 0, torch.gather(kept, 1, owner.clamp(min=0)), -1)

    pid = kwargs.get("position_ids")
    shift = pre.shift if pre is not None else torch.zeros(B, dtype=torch.long, device=dev)
    next_pos = pre.next_pos if pre is not None else None
    if pid is not None and pid.dim() == 3:  # M-RoPE [3, B, M] (generate: [4, B, M], text positions first)
        pos3 = pid[-3:].expand(3, B, M)
        if next_pos is None:  # the unpatched model continues after the prompt's largest position (rope_deltas)
            next_pos = pos3.masked_fill(~valid[None], torch.iinfo(pos3.dtype).min).amax(dim=(0, 2)) + 1
        if positions != "gaps":
            raise InputError(f"{stage_field(handle, stage)}.positions",
                             f"{positions!r} is not defined for M-RoPE (3-D) positions; allowed: gaps")
        # the text row goes: it only marks packed sequences, which gapped positions would fake
        new_pid = torch.gather(pos3, 2, rep[None].expand(3, B, -1)).masked_fill(~ok[None], 0)
    else:
        base = (pid if pid is not None else torch.arange(M, device=dev)[None]).expand(B, M)
        new_pid = torch.gather(base, 1, rep)
        if positions == "repack":  # contiguous from the row's first real token
            first = torch.gather(base, 1, valid.long().argmax(1, keepdim=True))
            new_pid = (first + torch.cumsum(ok.long(), 1) - 1).clamp(min=0).masked_fill(~ok, 0)
            shift = shift + base[:, -1] - new_pid[:, -1]  # the next position follows the last kept one
    mask2d = kwargs.get("attention_mask")
    if isinstance(mask2d, dict):  # one 4-D mask per layer type, built by the model over the prompt (Gemma 3)
        kwargs["attention_mask"] = {name: shrink_mask(m, handle.seams.mask_format, rep, ok, M, M, M, True, hidden.dtype)
                                    for name, m in mask2d.items()}
    else:  # always a 2-D mask: without one, gapped position ids would read as packed sequences
        kwargs["attention_mask"] = (torch.gather(mask2d, 1, rep) * ok.to(mask2d.dtype)) if mask2d is not None \
            else ok.long()
    kwargs["inputs_embeds"] = hidden
    kwargs["position_ids"] = new_pid
    st.prefill.pre_llm = PreLLMRecord(kept, ok, shift, prompt_len=L0, owner=owner, merged_into=into, size=size,
                                      next_pos=next_pos)
    # rebase: from here on the reduced sequence is the prompt the layers see
    take = lambda t: torch.gather(t, 1, rep)  # noqa: E731
    st.layout = VisualLayout(take(layout.is_visual) & ok, take(layout.image), take(layout.segment), take(layout.row),
                             take(layout.col), take(layout.is_newline) & ok, layout.coords_known)
    st.valid = ok
    st.prefill.is_visual = st.layout.is_visual
    st.prefill.prompt_len = rep.shape[1]
    vis_orig, vis_ok = right_packed(st.layout.is_visual, kept)
    st.prefill.records.append(StageRecord(
        stage=stage, kept=kept, kept_ok=ok, kept_visual=vis_orig, kept_visual_ok=vis_ok, visual_before=n_before,
        visual_after=st.layout.is_visual.sum(1), tokens_before=M, tokens_after=rep.shape[1],
        seconds=time.perf_counter() - t0, merged_into=into,
    ))


def stage_field(handle: "PatchHandle", stage: Any) -> str:
    return next((f"stages[{i}]" for i, s in enumerate(handle.policy.stages) if s is stage), "stage")


def to_original(st: ForwardState, idx: torch.Tensor) -> torch.Tensor:
    """Positions in the language model's input [B, K] -> original prompt positions (identity unless reduced)."""
    pre = st.prefill.pre_llm
    return idx if pre is None else torch.gather(pre.kept, 1, idx)


def sources_after(st: ForwardState, kept_visual: torch.Tensor, kept_ok: torch.Tensor,
                  slots: torch.Tensor | None = None) -> torch.Tensor | None:
    """For an LLM stage after a pre-LLM reduction or an LLM-site merge: the source map restricted to the visual
    tokens it kept (``[B, L]``: representative original position of each original token, -1 when gone); None
    otherwise. ``slots`` ``[B, M]``: layer-0 positions of the slots ``st.llm_owner`` points at (default: the
    current sequence, ``st.cur_orig``)."""
    pre = st.prefill.pre_llm
    if st.llm_owner is not None:
        if slots is None:
            slots = st.cur_orig
        own = st.llm_owner  # [B, L0] layer-0 token -> slot
        if pre is not None and pre.owner is not None:  # original token -> layer-0 slot -> slot
            own = torch.where(pre.owner >= 0, torch.gather(own, 1, pre.owner.clamp(min=0)), -1)
        slot_orig = to_original(st, slots)
        into = torch.where(own >= 0, torch.gather(slot_orig, 1, own.clamp(min=0)), -1)
    elif pre is None:
        return None
    else:
        into = pre.merged_into
    B, L = into.shape
    alive = torch.zeros(B, L + 1, dtype=torch.bool, device=into.device)
    alive.scatter_(1, kept_visual.masked_fill(~kept_ok, L), True)
    return torch.where((into >= 0) & torch.gather(alive[:, :L], 1, into.clamp(min=0)), into, -1)
