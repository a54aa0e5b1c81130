"""Feature-layer vision stages (VisionZip, VisPruner) on any CLIP tower: the reduction the vLLM plugin serves.

``patch()`` runs these methods inside transformers' CLIP tower (``vision.hooks``): a forward hook on the
feature layer ``F`` calls the criterion's ``after_feature_layer`` with F's output and F's captured q / k
projections; the reduced tokens then reach the projector, and with ``positions=repack`` the language model
sees them contiguously in raster order (each token at its own, a merged token at its target's, patch slot).
vLLM runs its own CLIP (fused ``qkv_proj``, no ``q_proj`` / ``k_proj`` modules), so ``reduce_feature_layer``
takes F's output and q / k as tensors (the vLLM model subclass captures them with per-call hooks) and runs
the same ``after_feature_layer`` (the library's own code, e.g. ``methods.visionzip``) on a ``VisionRun``,
then puts the kept tokens in raster order: what the projector, and so the language model, receives under
``patch()``. ``vision_kept_count`` is the count, content-free (``Criterion.image_only_fixed_count``).

Served only where every crop's reduced tokens all reach the language model (LLaVA-1.5: one crop per
image). On LLaVA-NeXT the anyres unpadding drops border patches after the tower, so the count left
would depend on which patches were kept; refused there. Criteria that act before encoder layers
(``before_layer``: FlowCut, MCTF) need hooks inside the layers' attention and are refused.
This module imports no vLLM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from ...vision.base import VisionCriterion
from ...vision.state import VisionRun

# model_type -> served; LLaVA-NeXT: unpadding after the tower makes the count depend on the kept set
VISION_FAMILIES = ("llava",)
WHY_NOT_NEXT = ("LLaVA-NeXT's anyres unpadding removes border patches after the tower, so how many kept tokens reach "
                "the language model depends on which patches were kept; vLLM fixes the count before the image is "
                "encoded; allowed on llava_next: one site=pre_llm stage")


def feature_layer_only(criterion: Any) -> bool:
    """True for a vision criterion that acts only on the feature layer's output (``after_feature_layer``)."""
    cls = type(criterion)
    return (isinstance(criterion, VisionCriterion)
            and cls.after_feature_layer is not VisionCriterion.after_feature_layer
            and cls.before_layer is VisionCriterion.before_layer
            and cls.uses_bias is VisionCriterion.uses_bias
            and bool(getattr(criterion, "image_only_fixed_count", False)))


@dataclass(frozen=True)
class FeatureLayerSeams:
    """What ``after_feature_layer`` reads of a tower: ``layers[feature_layer].self_attn`` (``num_heads``,
    ``scale``) and the select strategy (``default``: CLS dropped before the projector; ``full``: kept)."""

    feature_layer: int
    layers: Sequence[Any]
    select_strategy: str


def reduce_feature_layer(plan: Any, hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         seams: FeatureLayerSeams) -> torch.Tensor:
    """The feature layer's output ``hidden`` ``[n, T, D]`` (CLS first, one row per crop) and its q / k projections
    ``[n, T, D]`` -> the stage's kept / merged tokens ``[n, K, D]`` in raster order, CLS first (what ``patch()``'s
    projector and language model see, before the select strategy)."""
    n, T = hidden.shape[:2]
    stage, crit = plan.stage, plan.criterion
    run = VisionRun.open(plan.stage_index, stage, crit, n, T - 1, hidden.device)
    run.captured["q"] = (seams.feature_layer, q)
    run.captured["k"] = (seams.feature_layer, k)
    with torch.no_grad():
        out = crit.after_feature_layer(run, hidden, seams)
    if out is hidden:
        return hidden
    if out.shape[1] != run.length or not bool((run.ident[:, 0] == 0).all()):
        raise RuntimeError(f"vision criterion {stage.criterion!r}: after_feature_layer must keep CLS first and record "
                           "every token (run.reassign)")
    order = torch.sort(run.ident, dim=1, stable=True).indices.to(out.device)  # raster order of the representatives
    return torch.gather(out, 1, order[..., None].expand(-1, -1, out.shape[-1]))


def vision_kept_count(plan: Any, n_tokens: int, select_strategy: str) -> int:
    """Image tokens one LLaVA-1.5 image keeps (``n_tokens``: its unreduced count for ``select_strategy``)."""
    return _count(plan, n_tokens, select_strategy)


@functools.lru_cache(maxsize=64)
def _count(plan: Any, n_tokens: int, select_strategy: str) -> int:
    offset = 1 if select_strategy == "default" else 0
    T = n_tokens + offset
    g = torch.Generator().manual_seed(0)
    hidden, q, k = (torch.randn(1, T, 8, generator=g) for _ in range(3))  # content does not change the count
    seams = FeatureLayerSeams(0, [SimpleNamespace(self_attn=SimpleNamespace(num_heads=2, scale=0.5))], select_strategy)
    return int(reduce_feature_layer(plan, hidden, q, k, seams).shape[1]) - offset
