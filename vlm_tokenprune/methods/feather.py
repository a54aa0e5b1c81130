"""FEATHER: "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
Acceleration" (ICCV 2025), arXiv 2412.13180.

FastV's last-token criterion, computed WITHOUT RoPE (RoPE's long-term decay makes FastV keep
the bottom of the image), with the softmax over the visual keys only, heads averaged, plus
a uniform spatial grid so every region of the image stays represented:

* stage 1 (paper: drop before layer 8, scored from layer 7's q/k projections): keep the
  top ``keep`` tokens by the criterion UNION every ``stride``-th row and column of each
  image's patch grid (``stride=3``: ``grid[::3, ::3]``); the kept count is variable,
  between the budget and the budget + the grid size;
* stage 2 (layer 16): the criterion alone, keeping ``(1-R)^2`` of the tokens entering the
  stage (``keep=(1-R)**2, of="current"``, as the official code does).

Defaults (the released script ``eval_feather.sh``): R = 0.7, layers [8, 16], stride 3, no
RoPE, softmax over the visual keys. Preset ``feather`` = those two stages.

Criterion parameters (for the paper's ablations):

* ``rope`` (False): apply RoPE to q and k before scoring (True = FastV's ranking);
* ``softmax`` ("keys"): normalise over the visual keys only, or over the whole causal
  ``"row"`` like the model's own attention;
* ``stride`` (3): the uniform grid's step in rows and columns; 0 = no grid (criterion only).

Choices, beyond the official code (batch 1, one square image):

* Budget rounding: the official code keeps ``int(V * (1-R))`` and ``int(N1 * (1-R)**2)``
  (floor); the preset does the same (``rounding=floor``: ``floor(0.3 * n)`` equals
  ``int(n * (1 - 0.7))`` for every n below 5,000, checked in tests/test_presets_depth.py),
  V = 576: 172 tokens. A stage written out without ``rounding=`` follows the library-wide
  rule ``max(1, floor(keep * n + 0.5))`` (round half up: 173); ``feather:rounding=half_up``
  gives that for the preset.
* Layers: 8 and 16 are the paper's for a 32-layer LLM (``depth=32``); on another depth
  ``patch()`` maps them (``Policy.at_depth``: 40 layers -> 10 / 20, 28 -> 7 / 14, the
  shipped 4-layer tiny VLM -> 1 / 2).
* The grid is laid, per patch grid, over the rows and columns present in that grid:
  each LLaVA-1.5 image; for LLaVA-NeXT the base grid and the unpadded anyres grid of each
  image (``ctx.segment``), anchored at the smallest row and column present in that grid (for
  an unpadded anyres grid: its first real row / column, not the padded canvas's). Non-square
  grids work the same way.
  ``image_newline`` and CLS tokens are never grid cells (they can still be kept by the
  criterion). When an earlier stage already pruned, the grid is laid over the surviving
  cells.
* Several images in a row share one budget and one softmax (over all visual tokens of the
  row), as every criterion here does.
* Overrides of the two-stage preset apply to both stages (``feather:rope=true``); stage 2
  has ``stride=0``, so to change stage 1's stride write the stages out, e.g.
  ``{"stages": [{"criterion": "feather", "layer": 8, "keep": 0.3, "params": {"stride": 2}},
  {"criterion": "feather", "layer": 16, "keep": 0.09, "of": "current", "params": {"stride": 0}}]}``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import InputError
from ..policy import register_preset
from ..scoring import ScoringContext
from ..selection import right_packed, stride_grid, topk_per_row
from .base import Criterion, Param, last_row_flops, register_criterion


@register_criterion
class FeatherCriterion(Criterion):
    name = "feather"
    paper = "Feather the Throttle: Revisiting Visual Token Pruning for VLM Acceleration (FEATHER)"
    arxiv = "2412.13180"
    params = {
        "rope": Param(False, bool, "apply RoPE to q/k before scoring (FEATHER: no; FastV: yes)"),
        "softmax": Param("keys", str,
                         "softmax over the visual keys only ('keys', FEATHER) or the whole causal row ('row', FastV)",
                         choices=("keys", "row")),
        "stride": Param(3, int, "uniform grid step kept in addition to the top-k (0 = no grid)",
                        check=lambda v: v >= 0, allowed="an integer >= 0"),
    }

    def scoring_flops(self, geometry: Any, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float | None:
        return last_row_flops(geometry, n_visual if params.get("softmax", "keys") == "keys" else n_tokens)

    def score(self, ctx: ScoringContext, rope: bool, softmax: str, stride: int) -> torch.Tensor:
        return ctx.attention("last", rope=rope, softmax_over=softmax).mean(dim=1)[:, 0]  # [B, N]

    def select(self, ctx: ScoringContext, scores: torch.Tensor, rope: bool, softmax: str, stride: int):
        idx, ok = topk_per_row(scores, ctx.visual_ok, ctx.keep)
        if stride == 0:
            return idx, ok
        if not ctx.coords_known:
            raise InputError(
                "feather.stride",
                f"{stride} needs the patch grid of every image (LLaVA-NeXT: pass image_sizes and pixel_values); "
                "allowed without it: stride=0",
            )
        B, N = scores.shape
        keep = torch.zeros(B, N + 1, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, idx.masked_fill(~ok, N), True)
        keep = keep[:, :N] | stride_grid(ctx, stride)
        return right_packed(keep & ctx.visual_ok)


register_preset(
    "feather",
    [
        {"criterion": "feather", "layer": 8, "depth": 32, "keep": 0.3, "rounding": "floor", "stride": 3},
        {"criterion": "feather", "layer": 16, "depth": 32, "keep": 0.09, "of": "current", "rounding": "floor", "stride": 0},
    ],
    "no-RoPE last-token attention over the visual keys; layer 8: top 30% + stride-3 grid, "
    "layer 16: top 9% of what is left (R=0.7)",
    "2412.13180",
)
