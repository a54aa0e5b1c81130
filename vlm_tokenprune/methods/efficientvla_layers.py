"""EfficientVLA LLM layer pruning: "EfficientVLA: Training-Free Acceleration and Compression for
Vision-Language-Action Models", arXiv 2506.10100 (part 1 of methods.md section 9).

A preset over the structural op ``skip_layers`` (scope ``all``): the layers to skip come from a
``calibrate(model, batches, what="layers")`` artifact (importance ``I(l) = 1 - mean cos(x_l,
x_{l+1})``); the ``n = N - round(layers_kept * N / of)`` least important layers are skipped,
non-contiguous, never layer 0. Paper default: keep 22 of 32 layers (``layers_kept=22``,
``of=32``), scaled to other depths. Usage::

    vtp.calibrate(model, batches, what="layers", path="layers.json")
    vtp.patch(model, "efficientvla_layers:calibration=layers.json")               # 22/32 of the layers
    vtp.patch(model, "efficientvla_layers:calibration=layers.json,layers_kept=28")

(The paper also applies PruneNet-style 25 % MLP sparsity; not part of this preset.)
"""
from __future__ import annotations

from ..policy import register_preset

register_preset(
    "efficientvla_layers",
    [{"op": "skip_layers", "scope": "all", "layers_kept": 22, "of": 32}],
    "EfficientVLA layer pruning: skip the least important layers from a calibration file (calibration=PATH)",
    "2506.10100",
)
