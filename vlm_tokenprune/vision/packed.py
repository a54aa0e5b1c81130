"""Vision-site stages on PACKED towers: the ViTs of Qwen3-VL, Qwen2-VL and Qwen2.5-VL (``VisionSeams.packed``; Qwen2.5-VL's
rows follow its windows: ``PackedTower.unit_order`` maps each unit back to its placeholder), a library extension
(Qwen2-VL's FlowCut stage, which prunes inside the tower, is ``vision.packed_flowcut``).

Qwen3-VL (arXiv 2511.21631; the Qwen2-VL tower, arXiv 2409.12191) encodes every image of a batch as ONE
sequence of patches ``[S, C]`` (images of any size, one after the other); each block attends within an image
only (``cu_seqlens``) with a 2-D rotary embedding, and the merger packs each run of ``g = spatial_merge_size^2``
consecutive rows (one 2 x 2 window: the processor already orders patches window by window) into ONE LLM token,
in the order of the image's placeholders. The unit of selection is therefore that group of ``g`` rows
(``PackedTower.group``, verified by running the model's own merger at patch time: ``adapters.qwen3_vl``).

VisPruner here (arXiv 2412.01818) is the official code's SigLIP rule (``siglip_encoder.py``: a CLS-free tower)
applied to Qwen's ViT: importance = the post-softmax attention each patch RECEIVES in the LAST block (the block's
own q / k with its rotary embedding, one softmax per image and head, fp32), mean over the queries then the heads;
a group's importance is the SUM of its patches', its feature the concatenation of its patches' last-block
outputs; ``tokens`` / ``keep`` count LLM tokens PER IMAGE. The papers define neither Qwen's tower nor groups:
this is the library's reading, as for InternVL's / Gemma 3's groups.

The tower itself runs unchanged on every patch (VisPruner acts on the last block's output), so the merger's and
the DeepStack mergers' outputs are the unpruned model's bit for bit; the hand-over to the language model drops the
placeholders of the dropped groups through the pre-LLM path (``hooks.lm_prefill`` with a ``PackedOutcome``); the
adapter's DeepStack pre-hook then takes the same kept rows of every ``deepstack_visual_embeds[i]``.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..marking import mark_hook
from ..registry import CRITERIA
from .state import VisionOutcome

if TYPE_CHECKING:
    from ..adapters.base import VisionSeams
    from ..handle import PatchHandle


@dataclass(frozen=True)
class PackedTower:
    """What a vision stage needs of a packed tower. ``group``: consecutive rows one LLM token packs;
    ``qk(block, hidden, kwargs) -> (q, k)`` ``[S, H, d]``: the last block's own q / k on its input (rotary applied;
    ``kwargs`` are the block call's: ``position_embeddings``, ``cu_seqlens`` = one segment per image), ``scaling``
    its softmax scale."""

    group: int
    qk: Callable[[nn.Module, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]] | None  # None: no ``units``
    scaling: float
    # criteria with a rule of their own on this tower that prune INSIDE it (Qwen2-VL: ``flowcut_vit``, the official
    # FlowCut_Qwen stage, installed by ``vision.packed_flowcut``), and whether whole-group selections
    # (``select_units``, installed by ``install`` below) run here
    in_tower: tuple[str, ...] = ()
    units: bool = True
    # ``unit_order(grid_thw) -> [units]``: the placeholder (raster) index of each merge unit of the tower's row order,
    # when the tower reorders its patches (Qwen2.5-VL's windows); None: row order is placeholder order
    unit_order: Callable[[torch.Tensor], torch.Tensor] | None = None

    def allowed(self) -> list[str]:
        """The criteria a vision stage may use on this tower."""
        ok = set(self.in_tower)
        if self.units and self.qk is not None:
            ok |= {n for n in CRITERIA.names() if callable(getattr(CRITERIA.get(n), "select_units", None))}
        return sorted(ok)

    def install(self, handle: "PatchHandle", vs: "VisionSeams") -> None:
        i = next(j for j, s in enumerate(handle.policy.stages) if s.is_vision)
        last = vs.layers[vs.feature_layer]
        handle.add_hook(f"{type(vs.tower).__name__}: forward pre-hook (open vision stage {i})",
                        vs.tower.register_forward_pre_hook(mark_hook(functools.partial(_tower_pre, handle, i)),
                                                           with_kwargs=True))
        handle.add_hook(f"vision block {vs.feature_layer}: forward pre-hook (vision stage {i}: its input, "
                        "cu_seqlens and rotary tables)",
                        last.register_forward_pre_hook(mark_hook(functools.partial(_block_pre, handle)),
                                                       with_kwargs=True))
        handle.add_hook(f"vision block {vs.feature_layer}: forward hook (vision stage {i}: {handle.policy.stages[i].criterion}"
                        " picks whole merge groups per image)",
                        last.register_forward_hook(mark_hook(functools.partial(_block_post, handle, self))))
        handle.add_hook(f"{type(vs.tower).__name__}: forward hook (vision stage {i}: the kept groups for the "
                        "language model's input)",
                        vs.tower.register_forward_hook(mark_hook(functools.partial(_tower_post, handle))))


@dataclass
class PackedRun:
    """One tower call: the stage, and what the last block's hooks captured / decided."""

    stage_index: int
    stage: Any
    criterion: Any
    captured: dict = field(default_factory=dict)
    grid: torch.Tensor | None = None  # the tower call's grid_thw
    kept: list | None = None  # per image: kept group indices (ascending), and its group count
    sizes: list | None = None
    seconds: float = 0.0


@dataclass
class PackedOutcome(VisionOutcome):
    """A ``VisionOutcome`` whose crops are images of different sizes (padded to the largest): ``slots`` maps every
    feature to (image, group); ``dropped`` says whether any image lost a group."""

    dropped: bool = False

    @property
    def changed(self) -> bool:
        return self.dropped


def received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[S]``: the post-softmax attention each patch receives within its own image (``cu_seqlens``), mean over
    the queries, then over the heads (fp32; one ``n x n`` matrix per image and head)."""
    S, H, _ = q.shape
    out = torch.zeros(S, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks = q[s:e].float(), k[s:e].float()
        acc = torch.zeros(e - s, dtype=torch.float32, device=q.device)
        for h in range(H):
            acc += torch.softmax(qs[:, h] @ ks[:, h].T * scaling, dim=-1).mean(0)
        out[s:e] = acc / H
    return out


def _tower_pre(handle: "PatchHandle", i: int, module, args: tuple, kwargs: dict):
    handle.vision_run = PackedRun(i, handle.policy.stages[i], handle.criteria[i],
                                  grid=args[1] if len(args) > 1 else kwargs.get("grid_thw"))
    handle.vision_outcome = None
    return None


def _block_pre(handle: "PatchHandle", module, args: tuple, kwargs: dict):
    run = handle.vision_run
    if isinstance(run, PackedRun):
        run.captured = {"hidden": kwargs["hidden_states"] if not args else args[0], "kwargs": kwargs}
    return None


def _block_post(handle: "PatchHandle", tower: PackedTower, module, args, output):
    run = handle.vision_run
    if not isinstance(run, PackedRun) or "hidden" not in run.captured:
        return None
    t0 = time.perf_counter()
    out = output[0] if isinstance(output, tuple) else output
    kw = run.captured.pop("kwargs")
    hidden = run.captured.pop("hidden")
    cu = kw["cu_seqlens"]
    g = tower.group
    with torch.no_grad():
        q, k = tower.qk(module, hidden, kw)
        imp = received_attention(q, k, cu, tower.scaling)
        bounds = cu.tolist()
        order = None if tower.unit_order is None else tower.unit_order(run.grid).to(out.device)
        run.kept, run.sizes = [], []
        for s, e in zip(bounds[:-1], bounds[1:]):
            G = (e - s) // g
            a = imp[s:e].view(G, g).sum(-1)
            feats = out[s:e].float().reshape(G, -1)
            if order is not None:  # units in placeholder order (the tower's rows are in its window order)
                raster = order[s // g:e // g] - order[s // g:e // g].min()
                a = torch.empty_like(a).index_copy_(0, raster.to(a.device), a)
                feats = torch.empty_like(feats).index_copy_(0, raster.to(feats.device), feats)
            feats = feats / feats.norm(dim=-1, keepdim=True)
            budget = min(run.stage.budget.count(G), G)
            sel = list(range(G)) if budget >= G else sorted(
                run.criterion.select_units(a, feats, budget, run.stage.params))
            run.kept.append(sel)
            run.sizes.append(G)
    run.seconds += time.perf_counter() - t0
    return None


def _tower_post(handle: "PatchHandle", module, args, output):
    run, handle.vision_run = handle.vision_run, None
    if not isinstance(run, PackedRun) or run.kept is None:
        return None
    n, W = len(run.sizes), max(run.sizes)
    Kmax = max(len(s) for s in run.kept)
    owner = torch.full((n, 1 + W), -1, dtype=torch.long)
    ident = torch.zeros(n, 1 + Kmax, dtype=torch.long)
    owner[:, 0] = 0
    for c, sel in enumerate(run.kept):
        for j, grp in enumerate(sel):
            owner[c, 1 + grp] = 1 + j
            ident[c, 1 + j] = 1 + grp
    slots = torch.cat([torch.stack([torch.full((G,), c), torch.arange(G)], dim=1) for c, G in enumerate(run.sizes)])
    out = PackedOutcome(run.stage_index, ident, owner, 1, [], run.seconds, slots=slots,
                        dropped=any(len(s) < G for s, G in zip(run.kept, run.sizes)))
    pooled = getattr(output, "pooler_output", None)
    out.produced(*([pooled] if isinstance(pooled, torch.Tensor) else list(pooled or [])))
    handle.vision_outcome = out
    return None
