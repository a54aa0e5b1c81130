"""PyramidDrop: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", arXiv 2410.17247.

A schedule, not a new criterion: the LLM is split into stages and at the end of each the
visual tokens are ranked by the attention they receive from the last instruction token
(the last prompt token at inference; RoPE, softmax over the whole causal row, heads
averaged: the ``fastv`` criterion) and the lowest are dropped. Paper / official defaults
(``--layer_list '[8,16,24]' --image_token_ratio_list "[1.0,0.5,0.25,0.125]"``): keep 50 %,
25 %, 12.5 % of the ORIGINAL visual tokens before layers 8, 16, 24 (our ``keep`` is relative
to the original count by default, so the preset reads exactly like the paper).

Mapping, as differences from the official code (``Cooperx521/PyramidDrop``,
``llava/model/modeling_llama_pdrop.py``, ``pdrop_rank_drop``):

* Where tokens drop is identical (before decoder layers 8, 16, 24), so the FLOPs schedule is
  the paper's. The official code ranks with layer 8's OWN q/k projections applied to layer
  8's input (a look-ahead into the layer about to run); here, as in FastV, the ranking comes
  from layer 7's projections on layer 7's input (``stage.layer - 1``).
* Kept tokens keep their original position ids (gaps, as in FastV); the official code
  re-packs positions contiguously after each drop.
* Kept counts floor ``keep * n`` as the official code does (``rounding=floor``; the library's
  default rule, round half up, differs by one token at some counts: 36 x 0.125 = 4.5 -> 4 here).
  For 576 tokens and ratios 0.5 / 0.25 / 0.125 both give 288 / 144 / 72.

Layers 8 / 16 / 24 are the paper's for LLaVA-1.5-7B's 32 layers (``depth=32``); on another depth
``patch()`` maps them (``Policy.at_depth``: 40 layers -> 10 / 20 / 30, 28 -> 7 / 14 / 21, 4 -> 1 / 2 / 3).
Stages written out with ``layer=`` are absolute, e.g.
``"fastv:layer=1,keep=0.5+fastv:layer=2,keep=0.25+fastv:layer=3,keep=0.125"``.
"""
from __future__ import annotations

from ..policy import register_preset
from . import fastv  # noqa: F401  (the criterion this schedule uses)

register_preset(
    "pdrop",
    [
        # the paper's LLaVA-1.5-7B (32 layers); patch() maps them to the model's depth (Policy.at_depth)
        {"criterion": "fastv", "layer": 8, "depth": 32, "keep": 0.5, "rounding": "floor"},
        {"criterion": "fastv", "layer": 16, "depth": 32, "keep": 0.25, "rounding": "floor"},
        {"criterion": "fastv", "layer": 24, "depth": 32, "keep": 0.125, "rounding": "floor"},
    ],
    "PyramidDrop schedule: last-token attention (fastv criterion) before layers 8/16/24, "
    "keep 50%/25%/12.5% of the original visual tokens",
    "2410.17247",
)
