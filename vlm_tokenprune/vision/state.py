"""Bookkeeping of one vision-tower call: which original token every current token is.

The tower encodes a batch of ``n`` crops (LLaVA-1.5: one per image; LLaVA-NeXT: the base
image and its anyres crops), each ``T0 = 1 + N`` tokens (CLS, then N patches). Every crop
keeps the same token count after each layer (a common count per layer, see the methods), so
no attention mask is needed inside the tower.
"""
from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VisionRun:
    """State of one tower call (opened by the tower's pre-hook, closed by the projector hook).

    ``ident`` ``[n, T]``: original token index (0 = CLS, 1 + p = patch p) of each current token;
    a fused token keeps its destination's index. ``owner`` ``[n, T0]``: current index of the token
    each original token lives in (-1: dropped). ``size`` ``[n, T]``: original tokens per current
    token (merges). ``bias`` ``[n, 1, T, T]``: additive attention bias the following encoder layers
    receive (MCTF's proportional attention ``log size``), None when none. ``captured``: the q/k/v
    projections of the last layer that ran (criteria that score from a layer's attention).
    """

    stage_index: int
    stage: Any
    criterion: Any
    params: dict
    keep_patches: int  # patch tokens (pixel-shuffle towers: groups) each crop keeps (CLS not counted)
    ident: torch.Tensor
    owner: torch.Tensor
    size: torch.Tensor
    bias: torch.Tensor | None = None
    captured: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)
    tokens_per_layer: list[int] = field(default_factory=list)
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, stage_index: int, stage: Any, criterion: Any, n: int, n_patches: int, device,
             n_tokens: int | None = None) -> "VisionRun":
        """``n_tokens``: LLM tokens per crop the budget counts (InternVL: pixel-shuffle groups; default: patches)."""
        T0 = n_patches + 1
        ar = torch.arange(T0, device=device).expand(n, T0)
        keep = stage.budget.count(n_patches if n_tokens is None else n_tokens)
        return cls(stage_index, stage, criterion, dict(stage.params), keep, ar.clone(), ar.clone(),
                   torch.ones(n, T0, device=device))

    @property
    def length(self) -> int:
        return self.ident.shape[1]

    @property
    def changed(self) -> bool:
        return self.length != self.owner.shape[1]

    def reassign(self, to: torch.Tensor, ident: torch.Tensor, size: torch.Tensor) -> None:
        """Current token ``i`` moves to slot ``to[c, i]`` of the new sequence (-1: dropped);
        ``ident`` / ``size`` ``[n, T']`` describe the new sequence."""
        self.owner = torch.where(self.owner >= 0, torch.gather(to, 1, self.owner.clamp(min=0)), -1)
        self.ident, self.size = ident, size


@dataclass
class VisionOutcome:
    """What the language model's input pre-hook needs from a finished tower call.

    ``ident`` ``[n, T]`` and ``owner`` ``[n, T0]`` as in ``VisionRun`` at the feature layer;
    ``offset``: 1 when the projector saw the patches only (``select_strategy="default"``), 0 when
    it saw CLS too; ``slots`` ``[F, 2]``: for each image feature in placeholder order, its crop
    and feature slot (``-1, -1``: an ``image_newline``), set by the LLaVA-NeXT packing wrapper
    (None: crop-major order, LLaVA-1.5).
    """

    stage_index: int
    ident: torch.Tensor
    owner: torch.Tensor
    offset: int
    tokens_per_layer: list[int]
    seconds: float
    slots: torch.Tensor | None = None

    features: list = field(default_factory=list)  # weak references to the feature tensors this call produced
    images: list = field(default_factory=list)  # (shape, dtype, [images, 2] float64 prints) of 3-D tensors produced
    # mask-only towers (OneVision): crop -> why it kept all its patches (an anyres_max-resized image)
    kept_all: dict = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Some patch was dropped or merged (shorter run; mask-only towers: a patch marked -1 in ``owner``)."""
        return self.ident.shape[1] != self.owner.shape[1] or bool((self.owner < 0).any())

    @property
    def kept_patches(self) -> int:
        """Patch tokens (or groups) per crop after the stage (mask-only towers: the fewest any crop kept)."""
        if self.ident.shape[1] != self.owner.shape[1]:
            return int(self.ident.shape[1] - self.offset)
        return int((self.owner[:, self.offset:] >= 0).sum(1).min()) if self.owner.shape[0] else 0

    def produced(self, *tensors) -> None:
        """Remember feature tensors this tower call returned (projector output, LLaVA-NeXT's packed features), and
        the value of each image's features (``[images, tokens, D]`` tensors: one per image), which copies keep."""
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.features += [weakref.ref(t) for t in tensors]
        self.images += [(t.shape[1:], t.dtype, _image_prints(t)) for t in tensors if t.ndim == 3]  # on the device

    def made(self, t: torch.Tensor) -> bool:
        """``t`` is (a view of) a feature tensor this call produced and that is still alive, or a tensor of copies
        of the images this call produced (``generate()`` stacks each row's images ``num_beams`` times)."""
        ptr = t.untyped_storage().data_ptr()
        if any((r := ref()) is not None and r.untyped_storage().data_ptr() == ptr for ref in self.features):
            return True
        if t.ndim != 3 or not t.shape[0]:
            return False
        mine = _image_prints(t)
        found = torch.zeros(t.shape[0], dtype=torch.bool, device=mine.device)
        for shape, dtype, prints in self.images:
            if shape == t.shape[1:] and dtype == t.dtype:
                found |= (mine[:, None] == prints.to(mine.device)[None]).all(-1).any(1)
        return bool(found.all())

    def for_copies(self, row_counts: list[int], k: int) -> "VisionOutcome":
        """This outcome for a prompt batch whose every row was repeated ``k`` times after the tower ran
        (``generate()`` with ``num_beams`` / ``num_return_sequences`` > 1 expands ``input_ids`` row by row and the
        encoded images group by group): ``row_counts`` are the image features of each ORIGINAL row, in
        placeholder order. Every copy gets crops of its own (copies of its row's crops), so each copy of a row
        keeps, drops and merges exactly what the row alone would."""
        slots = self.feature_slots()
        crop_src: list[int] = []
        blocks, start = [], 0
        for n in row_counts:
            block = slots[start:start + n]
            start += n
            crops = list(dict.fromkeys(c for c in block[:, 0].tolist() if c >= 0))  # this row's crops, in order
            for _ in range(k):
                new = {c: len(crop_src) + i for i, c in enumerate(crops)}
                crop_src += crops
                remap = torch.tensor([new.get(c, -1) for c in block[:, 0].tolist()], dtype=torch.long,
                                     device=slots.device)
                blocks.append(torch.stack([remap, block[:, 1]], dim=1))
        src = torch.tensor(crop_src, dtype=torch.long, device=self.owner.device)
        return dataclasses.replace(
            self, ident=self.ident[src], owner=self.owner[src], slots=torch.cat(blocks) if blocks else slots[:0],
            kept_all={new: self.kept_all[c] for new, c in enumerate(crop_src) if c in self.kept_all},
            features=list(self.features), images=list(self.images))

    def feature_slots(self) -> torch.Tensor:
        """``[F, 2]`` (crop, slot) of every image feature in placeholder order."""
        if self.slots is not None:
            return self.slots
        n, T0 = self.owner.shape
        width = T0 - self.offset
        crop = torch.arange(n, device=self.owner.device).repeat_interleave(width)
        slot = torch.arange(width, device=self.owner.device).repeat(n)
        return torch.stack([crop, slot], dim=1)


def _image_prints(t: torch.Tensor) -> torch.Tensor:
    """``[images, 2]``: sum and L2 norm, in float64, of each image's features ``t[i]`` of ``[images, tokens, D]`` (on the
    tensor's device, no copy to the host): a copy has the same print, features of other pixels do not."""
    x = t.detach().flatten(1)
    return torch.stack([x.sum(-1, dtype=torch.float64), torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64)], -1)
