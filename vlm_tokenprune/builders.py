"""Typed policy builders: ``vtp.FastV(layer=2, keep=0.25) + vtp.FFNCut(ratio=2)``.

Each builder is a preset (or a structural op) with its keys as typed keyword arguments, so an
editor completes them; it returns the same ``Policy`` as the string form (``FastV(layer=2,
keep=0.25) == Policy.parse("fastv:layer=2,keep=0.25")``) and policies compose with ``+``. A key
left at ``None`` keeps the preset's (paper) default. Criterion parameters a builder does not list
go in ``**params`` (checked like the string form's keys).
"""
from __future__ import annotations

from typing import Any, Sequence, Union

from .policy import Policy

Layers = Union[int, Sequence[int], str]  # a layer, a list of layers, or "all"


def _stage(first: dict[str, Any], kwargs: dict[str, Any]) -> Policy:
    """One preset / op with the non-None ``kwargs`` as its keys (the dict form of the string's ``name:k=v``)."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    return Policy.from_dict({"stages": [{**first, **given}]})


def _preset(name: str, **kwargs: Any) -> Policy:
    return _stage({"preset": name}, kwargs)


def _op(op: str, **kwargs: Any) -> Policy:
    return _stage({"op": op}, kwargs)


# -- LLM token stages -------------------------------------------------------------------------------
def FastV(layer: int | None = None, keep: float | None = None, tokens: int | None = None,  # noqa: N802
          rounding: str | None = None, depth: int | None = None, site: str | None = None, **params: Any) -> Policy:
    """FastV (arXiv 2403.06764): last-token attention at layer K-1, top-k before layer K (default K=2, keep 0.5)."""
    return _preset("fastv", layer=layer, keep=keep, tokens=tokens, rounding=rounding, depth=depth, site=site, **params)


def FEATHER(rope: bool | None = None, softmax: str | None = None, stride: int | None = None,  # noqa: N802
            rounding: str | None = None) -> Policy:
    """FEATHER (arXiv 2412.13180): the two-stage preset (layers 8 / 16 of 32, R = 0.7); criterion params apply to both."""
    return _preset("feather", rope=rope, softmax=softmax, stride=stride, rounding=rounding)


def PyramidDrop(rounding: str | None = None) -> Policy:  # noqa: N802
    """PyramidDrop (arXiv 2410.17247): FastV's criterion before layers 8 / 16 / 24 of 32, keep 50 / 25 / 12.5 %."""
    return _preset("pdrop", rounding=rounding)


def AIM(layer: int | None = None, keep: float | None = None, tokens: int | None = None,  # noqa: N802
        tau: float | None = None, iters: int | None = None, damping: float | None = None) -> Policy:
    """AIM stage B (arXiv 2412.03248): the linear schedule of the paper, or one stage with ``layer`` + a budget."""
    return _preset("aim", layer=layer, keep=keep, tokens=tokens, tau=tau, iters=iters, damping=damping)


def FlowCutLLM(layer: int | None = None, keep: float | None = None, tokens: int | None = None,  # noqa: N802
               positions: str | None = None, **params: Any) -> Policy:
    """FlowCut's LLM stage (arXiv 2505.19536): default layer 2, keep 22.22 %; ``positions="repack"``: the official
    LLaVA-NeXT path's contiguous renumbering (default ``"gaps"``)."""
    return _preset("flowcut_llm", layer=layer, keep=keep, tokens=tokens, positions=positions, **params)


def EfficientVLA(layer: int | None = None, keep: float | None = None, tokens: int | None = None,  # noqa: N802
                 **params: Any) -> Policy:
    """EfficientVLA token selection (arXiv 2506.10100): default layer 2, keep 56/256."""
    return _preset("efficientvla", layer=layer, keep=keep, tokens=tokens, **params)


def Random(layer: int | None = None, keep: float | None = None, tokens: int | None = None,  # noqa: N802
           seed: int | None = None, draw: str | None = None, site: str | None = None) -> Policy:
    """A random subset per input (baseline; ``draw="fixed"``: one subset per seed)."""
    return _preset("random", layer=layer, keep=keep, tokens=tokens, seed=seed, draw=draw, site=site)


def Uniform(layer: int | None = None, keep: float | None = None, tokens: int | None = None,  # noqa: N802
            site: str | None = None) -> Policy:
    """An even spatial grid of the budget on each patch grid (baseline)."""
    return _preset("uniform", layer=layer, keep=keep, tokens=tokens, site=site)


def ATP(layer: int | None = None, keep: float | None = None, weights: str | None = None) -> Policy:  # noqa: N802
    """ATP-LLaVA (arXiv 2412.00447, learned): ``weights`` from ``vlm-tokenprune train atp`` (default: shipped)."""
    return _preset("atp", layer=layer, keep=keep, weights=weights)


# -- before the LLM / in the vision tower ------------------------------------------------------------
def AIMMerge(keep: float | None = None, tokens: int | None = None, mode: str | None = None,  # noqa: N802
             order: str | None = None, positions: str | None = None) -> Policy:
    """AIM stage A (arXiv 2412.03248): bipartite merging of projected visual tokens before the LLM."""
    return _preset("aim_merge", keep=keep, tokens=tokens, mode=mode, order=order, positions=positions)


def CoViPAL(keep: float | None = None, weights: str | None = None, positions: str | None = None) -> Policy:  # noqa: N802
    """CoViPAL stage 1 (arXiv 2508.17243, learned): a pruning module before the LLM."""
    return _preset("covipal", keep=keep, weights=weights, positions=positions)


def FlowCutViT(keep: float | None = None, tokens: int | None = None, positions: str | None = None,  # noqa: N802
               newlines: str | None = None, **params: Any) -> Policy:
    """FlowCut in the CLIP tower (arXiv 2505.19536): default 128 of 576 patches per crop; ``newlines="drop"``: no
    LLaVA-NeXT ``image_newline`` token reaches the LLM (the official NeXT path; default ``"keep"``)."""
    return _preset("flowcut_vit", keep=keep, tokens=tokens, positions=positions, newlines=newlines, **params)


def MCTF(layer: int | None = None, keep: float | None = None, tokens: int | None = None,  # noqa: N802
         positions: str | None = None, **params: Any) -> Policy:
    """MCTF (arXiv 2403.10030) in the CLIP tower: default from layer 1 to 128 of 576 patches."""
    return _preset("mctf", layer=layer, keep=keep, tokens=tokens, positions=positions, **params)


# -- structural ops ----------------------------------------------------------------------------------
def FFNCut(ratio: float | None = None, layers: Layers | None = None) -> Policy:  # noqa: N802
    """Visual tokens use the first m / ratio MLP channels (``ffn_cut``)."""
    return _op("ffn_cut", ratio=ratio, layers=layers)


def SkipLayers(layers: Layers | None = None, scope: str | None = None, **params: Any) -> Policy:  # noqa: N802
    """Layers skipped for every token or for visual tokens (``skip_layers``)."""
    return _op("skip_layers", layers=layers, scope=scope, **params)


def PruneHeads(heads: Any = None, scope: str | None = None, **params: Any) -> Policy:  # noqa: N802
    """Attention heads pruned (``prune_heads``; heads ``{layer: [head, ...]}`` or a calibration file)."""
    return _op("prune_heads", heads=heads, scope=scope, **params)


def NeighborAttention(window: int | None = None, layers: Layers | None = None) -> Policy:  # noqa: N802
    """Visual->visual attention within a w x w patch window (``neighbor_attention``)."""
    return _op("neighbor_attention", window=window, layers=layers)


def VisualDrop(layer: int, depth: int | None = None) -> Policy:  # noqa: N802
    """Every visual token removed before ``layer`` (``visual_drop``)."""
    return _op("visual_drop", layer=layer, depth=depth)


def YOPO(drop: int | None = None, kept: float | None = None, window: int | None = None,  # noqa: N802
         ratio: float | None = None, calibration: str | None = None, **params: Any) -> Policy:
    """YOPO (arXiv 2410.06169): neighbour attention, visual FFN cut, visual head pruning, visual drop."""
    return _preset("yopo", drop=drop, kept=kept, window=window, ratio=ratio, calibration=calibration, **params)


BUILDERS: tuple[str, ...] = (
    "FastV", "FEATHER", "PyramidDrop", "AIM", "FlowCutLLM", "EfficientVLA", "Random", "Uniform", "ATP",
    "AIMMerge", "CoViPAL", "FlowCutViT", "MCTF", "FFNCut", "SkipLayers", "PruneHeads", "NeighborAttention",
    "VisualDrop", "YOPO",
)