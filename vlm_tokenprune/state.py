"""Per-forward state and the trace a handle reports.

One ``ForwardState`` is created by the top-level pre-hook of every forward and reached
only through the handle (``handle.state``: the calling thread's); decode steps of a cached ``generate()`` get a fresh state that
points at the ``PrefillRecord`` of the prompt they continue.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters.base import VisualLayout
from .policy import Stage
from .site_kind import SiteKind


@dataclass
class StageRecord:
    """What one stage did in a prefill.

    ``kept``/``kept_ok``: ``[B, M]`` original prompt positions of every token kept after the
    stage (text and visual), left-padded; ``visual_before``/``visual_after``: ``[B]``.
    """

    stage: Stage
    kept: torch.Tensor
    kept_ok: torch.Tensor
    kept_visual: torch.Tensor  # [B, K] original positions of kept visual tokens (valid where kept_visual_ok)
    kept_visual_ok: torch.Tensor
    visual_before: torch.Tensor
    visual_after: torch.Tensor
    tokens_before: int
    tokens_after: int
    seconds: float
    noop: bool = False
    # pre_llm stages (and LLM stages after one): [B, L] original position of the kept token each original
    # prompt token was merged into (itself when kept as is, -1 when dropped); None for LLM stages otherwise
    merged_into: torch.Tensor | None = None
    # rows that kept all their visual tokens at this stage although the policy asked for fewer, and why
    # (a budget above the row's visual tokens, no text for a text-guided criterion; patch(strict=True) refuses)
    relaxed: dict = field(default_factory=dict)
    # LLM stages from the first ``positions=repack`` one on: ``[B]`` the language model's next position id minus the
    # next position id of the layers after this stage (subtracted from decode position ids there); None: no shift
    pos_shift: torch.Tensor | None = None


@dataclass
class PreLLMRecord:
    """What decode steps need from a pre-LLM reduction (every layer caches only the kept tokens).

    ``kept``/``kept_ok`` ``[B, M']``: original prompt position each kept slot takes its position and
    mask from; ``shift`` ``[B]``: original minus new position id of the last prompt token
    (0 with ``positions="gaps"``), subtracted from later position ids. ``prompt_len``: the
    original prompt's length; ``owner`` ``[B, L]``: slot each original token lives in (-1: gone);
    ``merged_into`` ``[B, L]``: its representative's original position (-1: gone); ``size``
    ``[B, M']``: original tokens per slot; ``next_pos`` ``[B]`` (M-RoPE only): the position every
    axis of the first token after the prompt takes (the unpatched model's, via ``rope_deltas``).
    """

    kept: torch.Tensor
    kept_ok: torch.Tensor
    shift: torch.Tensor
    prompt_len: int = 0
    owner: torch.Tensor | None = None
    merged_into: torch.Tensor | None = None
    size: torch.Tensor | None = None
    next_pos: torch.Tensor | None = None


@dataclass
class PrefillRecord:
    """What decode steps need from their prompt: its length and the kept set per layer."""

    prompt_len: int  # the prompt the decoder layers see (after a pre-LLM reduction: the reduced one)
    records: list[StageRecord] = field(default_factory=list)
    is_visual: torch.Tensor | None = None  # [B, L] visual tokens of the prompt (structural ops read it while decoding)
    pre_llm: PreLLMRecord | None = None  # set when a pre_llm stage shortened the language model's input
    # per decoder layer: the record whose kept set shapes that layer's decode-time input (None: unchanged),
    # built once per cache by ``decode_plan`` (the records are final when the prefill ends)
    layer_kept: tuple | None = None
    layer_all_ok: tuple = ()  # per decoder layer: its kept set has no padded slot (built with ``layer_kept``)
    decode_tokens_per_layer: tuple = ()  # (q,) * n_layers of the last decode step (``decode_tokens``)
    # this prompt's decode steps may go through gates (``engine.decode_gates_apply``, decided once per prompt)
    gated: bool | None = None

    def decode_tokens(self, q: int, n_layers: int) -> tuple:
        """``tokens_per_layer`` of a decode step with ``q`` new tokens: built once per prompt, not per layer and step."""
        t = self.decode_tokens_per_layer
        if len(t) != n_layers or (t and t[0] != q):
            t = self.decode_tokens_per_layer = (q,) * n_layers
        return t

    def decode_plan(self, n_layers: int) -> tuple:
        """``kept_at(j)`` for every decoder layer ``j``, computed on the first decode step of this prompt."""
        if self.layer_kept is None or len(self.layer_kept) != n_layers:
            kept = tuple(self.kept_at(j) for j in range(n_layers))
            self.layer_all_ok = tuple(r is None or bool(r.kept_ok.all()) for r in kept)  # set before layer_kept
            self.layer_kept = kept
        return self.layer_kept

    def kept_at(self, layer: int) -> StageRecord | None:
        """The last stage at or below ``layer`` that changed the sequence."""
        out = None
        for r in self.records:
            if r.stage.is_llm and r.stage.layer <= layer and not r.noop:
                out = r
        return out


@dataclass
class ForwardState:
    phase: str  # "prefill" | "decode" | "passthrough"
    prefill: PrefillRecord
    layout: VisualLayout | None = None
    n_visual: torch.Tensor | None = None  # [B] visual tokens of each row in the prompt
    # current sequence in prefill, relative to the original prompt
    cur_orig: torch.Tensor | None = None  # [B, M] original positions (None: identity)
    cur_ok: torch.Tensor | None = None  # [B, M]
    scoring: tuple | None = None  # (layer index, layer module, its input hidden, its position embeddings)
    captured: dict = field(default_factory=dict)  # that layer's k_proj / v_proj outputs ("k", "v"), captured while it ran
    tokens_per_layer: list[int] = field(default_factory=list)
    valid: torch.Tensor | None = None  # [B, L] prompt tokens that are not padding
    cache: object = None  # the cache a decode step continues
    structural: dict = field(default_factory=dict)  # the running layer's visual rows etc. (``structural.hooks``)
    vision: object = None  # vision.state.VisionOutcome of a vision-site stage (its tower call)
    decode_masks: dict = field(default_factory=dict)  # decode step: id(StageRecord) -> (incoming mask, shrunk mask)
    # after an LLM stage with positions=repack (prefill): the current tokens' position ids [B, M] and their rotary
    # tables (what every later layer receives); decode step: id(pos_shift) -> (incoming position ids, tables)
    cur_pos: torch.Tensor | None = None
    cur_pe: tuple | None = None
    decode_pe: dict = field(default_factory=dict)
    in_forward: bool = False  # True while the top module's own forward runs (``engine.guard_forward``)
    embeds: torch.Tensor | None = None  # prefill: the hidden states entering decoder layer 0 (ScoringContext.embeds)
    # after an LLM-site merge: [B, L0] current slot of each layer-0 token (-1: gone) and [B, M] tokens per slot
    llm_owner: torch.Tensor | None = None
    cur_size: torch.Tensor | None = None
    # decode step through gates (``sites.routed_layers``): the layers between token stages run without library
    # code; ``gate_mask``: () nothing to change, or (the text model's mask tensor, its full content) while the
    # gates set that tensor in place to each stage's shrunk mask; ``undo``: run when the forward ends, on any exit
    decode_gated: bool = False
    gate_mask: tuple | None = None
    undo: list = field(default_factory=list)


@dataclass
class StageTrace(SiteKind):
    site: str
    layer: int
    criterion: str
    kept_positions: list[list[int]]  # per sample: original positions of kept visual tokens
    visual_before: list[int]
    visual_after: list[int]
    tokens_before: int
    tokens_after: int
    seconds: float
    # pre_llm stages (and LLM stages after one): per sample, per kept visual token (as in kept_positions),
    # the original positions of the prompt tokens it stands for (itself, plus any merged into it); else None
    sources: list[list[list[int]]] | None = None
    # vision stages: sequence length entering each vision-encoder layer (CLS included); else None
    vision_tokens_per_layer: list[int] | None = None
    # rows that kept all their visual tokens at this stage although the policy asked for fewer: {row: why}
    kept_all: dict[int, str] = field(default_factory=dict)
    # vision stages: crops the tower encoded (the whole batch) and the tokens of each the projector saw
    vision_crops: int | None = None
    vision_kept_patches: int | None = None


@dataclass
class Trace:
    """What the last forward did: phase, per-stage results, sequence length seen by each layer."""

    phase: str
    stages: list[StageTrace]
    tokens_per_layer: list[int]

    @classmethod
    def from_state(cls, st: ForwardState) -> "Trace":
        stages = []
        for r in st.prefill.records:
            kv = [row[ok].tolist() for row, ok in zip(r.kept_visual.cpu(), r.kept_visual_ok.cpu())]
            sources = None
            if r.merged_into is not None:
                into = r.merged_into.cpu()
                sources = [[(into[b] == p).nonzero().flatten().tolist() for p in row] for b, row in enumerate(kv)]
            vision = r.stage.is_vision and st.vision is not None
            stages.append(
                StageTrace(
                    site=r.stage.site,
                    # pre_llm / vision: shortens layer 0's input
                    layer=r.stage.layer if r.stage.layer is not None and r.stage.is_llm else 0,
                    criterion=r.stage.criterion if r.stage.criterion is not None else r.stage.op,
                    kept_positions=kv,
                    visual_before=r.visual_before.tolist(),
                    visual_after=r.visual_after.tolist(),
                    tokens_before=r.tokens_before,
                    tokens_after=r.tokens_after,
                    seconds=r.seconds if st.phase == "prefill" else 0.0,
                    sources=sources,
                    vision_tokens_per_layer=(list(st.vision.tokens_per_layer) if vision else None),
                    kept_all=dict(getattr(r, "relaxed", {}) or {}),
                    vision_crops=int(st.vision.ident.shape[0]) if vision else None,
                    vision_kept_patches=st.vision.kept_patches if vision else None,
                )
            )
        return cls(phase=st.phase, stages=stages, tokens_per_layer=list(st.tokens_per_layer))
