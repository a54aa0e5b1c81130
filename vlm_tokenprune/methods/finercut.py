"""FinerCut: "Finer-grained Interpretable Layer Pruning for Large Language Models", arXiv 2405.18218.

A preset over the structural op ``skip_sublayers``: attention and MLP sublayers are separate
candidates, removed in the greedy order of a ``calibrate(model, batches, what="sublayers")``
artifact (each step removes the sublayer whose removal changes the output distribution least).
Paper setting: 25 % of the sublayers removed (``removed=16`` of ``of=64`` for a 32-layer model),
scaled to the model's depth. Usage::

    vtp.calibrate(model, batches, what="sublayers", path="sub.json")
    vtp.patch(model, "finercut:calibration=sub.json")             # 25 % of the sublayers
    vtp.patch(model, "finercut:calibration=sub.json,removed=8")   # 8 of 64 -> 12.5 %
"""
from __future__ import annotations

from ..policy import register_preset

register_preset(
    "finercut",
    [{"op": "skip_sublayers", "removed": 16, "of": 64}],
    "FinerCut: remove attention / MLP sublayers in the greedy order of a calibration file (calibration=PATH)",
    "2405.18218",
)
