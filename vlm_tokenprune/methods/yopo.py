"""YOPO: "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See",
arXiv 2410.06169 (code: ZhangAIPI/YOPO_MLLM_Pruning, "You Only Prune Once"; methods.md section 8).

YOPO prunes the COMPUTATION spent on visual tokens inside the LLM, decided once per model. The
presets compose the four parts from the structural ops (``structural.spec``):

1. neighbour-aware visual attention: visual->visual attention within a w x w patch window
   (``neighbor_attention``, ``window=5``: ``attncut_w`` of the released fine-tune script);
2. inactive visual head pruning from a calibration file (``prune_heads`` scope ``visual``:
   pruned heads give visual queries no output and no query attends visual keys in them; layers
   0-1 keep every head; ``kept``: the fraction of heads kept, chosen like YOPO's global
   threshold with a majority vote over the calibration samples; paper masks keep 8 / 16 / 24
   of 32 heads on average);
3. sparse visual FFN: visual tokens use the first m / 2 intermediate channels (``ffn_cut``,
   ``ratio=2``: ``mlpcut_ratio``);
4. layer drop for visual computation: from layer L on no query attends visual tokens, so they
   are removed (``visual_drop``; 13B: 20 of 40 layers; the 7B value is not released).

Presets (FLOPs = ``eval.flops.structural_flops`` on LLaVA-1.5-7B, 64 text + 576 visual tokens,
exact Llama count):

==========  ================================================  =========
preset      defaults                                          FLOPs
==========  ================================================  =========
``yopo_25`` ``kept=0.25`` (8 of 32 heads), ``drop=12``        0.250
``yopo_12`` ``kept=0.125`` (4 of 32 heads), ``drop=3``        0.145
``yopo``    = ``yopo_25`` (the paper's main 7B setting)
==========  ================================================  =========

The paper reports 25 % (1.91 of 7.63 TFLOPs) and 12 % (0.92 T); its own FLOPs convention is not
released. Under the exact count used here the 64 text tokens alone cost ~10 % of the prefill, so
12 % is below what keeps visual tokens for more than one layer: ``yopo_12`` is the closest
setting that still runs all four parts (visual tokens up to layer 3).

Parameters (``yopo_25:drop=3,calibration=heads.json``): ``calibration`` (a
``vtp.calibrate(model, batches, what="heads", path=...)`` file; default: the one shipped for the
tiny VLM in ``assets/tiny_vlm/yopo_heads.json``, refused on any other model by its config hash,
naming ``stages[2].calibration.config_hash`` and how to make one), ``kept`` | ``threshold`` |
``top_n``, ``keep_first`` (2), ``window`` (5), ``ratio`` (2), ``drop`` (the visual_drop layer).
The shipped tiny VLM has 4 layers: ``yopo_25:drop=3`` (see benchmarks/accuracy_structural.py).

Backends: eager and sdpa (the neighbour window needs 4-D masks; on flash-attention the presets are
refused naming ``attn_implementation``; ``prune_heads`` alone runs there too).

Not reproduced: YOPO fine-tunes LLaVA-1.5 with the pruning in place (training-free only for
Qwen2-VL / InternVL2); these presets are training-free.
"""
from __future__ import annotations

from ..assets import tiny_vlm_file
from ..errors import PolicyError
from ..policy import Preset, Stage, at_key, stage_from_fields
from ..registry import PRESETS

TINY_VLM_HEADS = str(tiny_vlm_file("yopo_heads.json"))  # calibrated on 64 train examples (benchmarks/accuracy_structural.py)
PARAMS = ("calibration", "kept", "threshold", "top_n", "keep_first", "window", "ratio", "drop")
# (stage index, stage field) -> the preset key a user writes (stage 2, prune_heads, takes its own names)
USER_KEY = {(0, "window"): "window", (1, "ratio"): "ratio", (3, "layer"): "drop", (3, "depth"): "drop"}


class YopoPreset(Preset):
    """The four YOPO parts as stages; keys override the part they belong to (not every stage)."""

    def expand(self, overrides: dict, where: str) -> list[Stage]:
        unknown = sorted(set(overrides) - set(PARAMS))
        if unknown:
            raise PolicyError(f"{where}.{unknown[0]}", f"unknown parameter of preset {self.name!r}; allowed: {', '.join(PARAMS)}")
        stages = [dict(st) for st in self.stages]
        neighbor, ffn, heads, drop = stages
        if {"threshold", "top_n"} & set(overrides):
            heads.pop("kept", None)
        for key, value in overrides.items():
            if key == "window":
                neighbor["window"] = value
            elif key == "ratio":
                ffn["ratio"] = value
            elif key == "drop":  # an explicit layer: absolute (the preset's 12 is for a 32-layer LLM, mapped by patch())
                drop["layer"] = value
                drop.pop("depth", None)
            else:
                heads[key] = value
        out = []
        for j, st in enumerate(stages):
            try:
                stage = stage_from_fields(st, f"{where}[{j}]")
            except PolicyError as e:  # name the key the user wrote (yopo:drop=), not the stage's own field
                field = e.field.rsplit(".", 1)[-1]
                key = USER_KEY.get((j, field), field if j == 2 else None)
                if key not in overrides:
                    raise
                raise at_key(e, f"{where}.{key}") from None
            out.append(stage)
        return out


def _register(name: str, kept: float, drop: int, flops: str) -> None:
    stages = (
        {"op": "neighbor_attention", "window": 5},
        {"op": "ffn_cut", "ratio": 2.0},
        {"op": "prune_heads", "scope": "visual", "calibration": TINY_VLM_HEADS, "kept": kept, "keep_first": 2},
        {"op": "visual_drop", "layer": drop, "depth": 32},  # LLaVA-1.5-7B's 32 layers; patch() maps it
    )
    desc = (f"YOPO (~{flops} FLOPs on LLaVA-1.5-7B): 5x5 neighbour visual attention, visual FFN / 2, visual heads kept "
            f"{kept:g} from a calibration file (calibration=PATH; default: the shipped tiny VLM's), visual tokens dropped "
            f"from layer {drop} (drop=L)")
    PRESETS.register(name, YopoPreset(name, stages, desc, "2410.06169"))


_register("yopo_25", 0.25, 12, "25 %")
_register("yopo_12", 0.125, 3, "15 %")
_register("yopo", 0.25, 12, "25 %")

