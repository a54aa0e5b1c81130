"""``Reduction``: one shortening of a token sequence, computed once and applied to every aligned tensor.

ToMe's ``merge``/``merge_source`` closures made explicit. A reduction maps ``M`` input tokens
to ``M'`` output slots: ``dst[b, i]`` is the slot input token ``i`` goes to (-1: dropped),
``rep[b, j]`` the input token whose position, mask and layout slot ``j`` takes (a kept token
itself, or the destination of a merge), ``ok[b, j]`` False for slots that left-pad a row to
the batch's longest row. A prune sends each kept token to its own slot; a merge sends several.

- ``fuse(x, size)``: hidden states; the plain mean of the tokens sent to a slot, or with
  ``weight="size"`` their average weighted by ``size`` (ToMe's ``merge_wavg``). A slot that
  receives one token gets it bit for bit.
- ``add(t)``: token sizes (how many original tokens a slot stands for).
- ``take(t)``: positions, padding masks, layout tensors (the representative's value).
- ``route(owner)``: the source map; ``owner[b, p]`` is the slot that original token ``p`` lives in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class Reduction:
    dst: torch.Tensor  # [B, M] long, -1 = dropped
    rep: torch.Tensor  # [B, M'] long
    ok: torch.Tensor  # [B, M'] bool
    weight: str = "mean"  # "mean" (plain mean of the fused tokens) | "size" (weighted by token sizes)

    @classmethod
    def prune(cls, keep: torch.Tensor) -> "Reduction":
        """Keep the tokens where ``keep`` [B, M] is True, in order."""
        M = keep.shape[1]
        return cls.from_targets(torch.where(keep, torch.arange(M, device=keep.device), -1))

    @classmethod
    def from_targets(cls, target: torch.Tensor, key: torch.Tensor | None = None, weight: str = "mean") -> "Reduction":
        """From ``target[b, i]``: the input token that ``i`` is fused into (``i`` itself: it survives; -1: dropped).

        Survivors (``target[b, i] == i``) become the slots, ordered by ``key`` [B, M] (default: their
        index, i.e. the sequence order is kept); every target must be a survivor.
        """
        B, M = target.shape
        ar = torch.arange(M, device=target.device).expand(B, M)
        survives = target == ar
        if key is None:
            key = ar.to(torch.float64)
        # survivors first, by key (the rest after them, unused); rows left-padded to the longest
        order = torch.sort(torch.where(survives, key.to(torch.float64), torch.inf), dim=1, stable=True).indices
        n = survives.sum(1)
        Mp = int(n.max()) if B else 0
        slots = torch.arange(Mp, device=target.device).expand(B, Mp)
        src = slots - (Mp - n)[:, None]
        ok = src >= 0
        rep = torch.gather(order, 1, src.clamp(min=0))
        slot_of = torch.full((B, M + 1), -1, dtype=torch.long, device=target.device)
        slot_of.scatter_(1, rep.masked_fill(~ok, M), slots)
        slot_of = slot_of[:, :M]
        dst = torch.where(target >= 0, torch.gather(slot_of, 1, target.clamp(min=0)), -1)
        return cls(dst, rep, ok, weight)

    @property
    def width(self) -> int:
        return self.rep.shape[1]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` [B, M, ...] at each slot's representative: [B, M', ...]."""
        idx = self.rep.view(*self.rep.shape, *([1] * (t.dim() - 2))).expand(*self.rep.shape, *t.shape[2:])
        return torch.gather(t.expand(self.rep.shape[0], *t.shape[1:]), 1, idx)

    def add(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` [B, M, ...] over the tokens sent to each slot (sizes, source counts)."""
        B = self.dst.shape[0]
        out = torch.zeros(B, self.width + 1, *t.shape[2:], dtype=t.dtype, device=t.device)
        idx = self.dst.masked_fill(self.dst < 0, self.width)
        idx = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
        return out.scatter_add_(1, idx, t)[:, : self.width]

    def fuse(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, M, D] -> [B, M', D]: mean (``weight="mean"``) or ``size``-weighted mean per slot."""
        w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if self.weight == "mean" else size.to(x.dtype)
        num = self.add(x * w[..., None])
        den = self.add(w)
        out = num / den.clamp(min=torch.finfo(x.dtype).tiny)[..., None]
        return torch.where(self.ok[..., None], out, self.take(x))  # padding slots: any finite value (masked)

    def route(self, owner: torch.Tensor) -> torch.Tensor:
        """Source map: ``owner`` [B, L] (slot of each original token in the input, -1 gone) -> slots of the output."""
        return torch.where(owner >= 0, torch.gather(self.dst, 1, owner.clamp(min=0)), -1)
