"""Offline accuracy of the YOPO presets and EfficientVLA layer pruning on the shipped tiny VLM.

Calibrates on the synthetic TRAIN split (never the test split), then runs the offline benchmark.
``OMP_NUM_THREADS=1 python benchmarks/accuracy_structural.py`` -> ``benchmarks/results/accuracy_structural/``.

The heads calibration is the same procedure (64 train examples, batches of 8, left padding) that
made the file the yopo presets default to (``vlm_tokenprune/assets/tiny_vlm/yopo_heads.json``);
the script checks the two agree. The presets' drop layers are for 32-layer models; the tiny VLM
has 4 layers, so ``drop`` is overridden (see the reading notes written into ``bench.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POLICIES = [
    # YOPO (arXiv 2410.06169): 5x5 neighbour window, visual FFN / 2, visual heads from the calibration file,
    # visual tokens dropped from layer `drop` on
    ("yopo_25:drop=3", "yopo_25:drop=3 (all 4 parts)"),
    ("yopo_25:drop=2", "yopo_25:drop=2 (12/32 depth)"),
    ("yopo_12:drop=1", "yopo_12:drop=1 (3/32 depth)"),
    # the parts alone (which one costs accuracy here); heads from layer 1 on, where this model still reads the image
    ("neighbor_attention:window=5", "neighbor_attention:window=5"),
    ("ffn_cut:ratio=2", "ffn_cut:ratio=2"),
    ("prune_heads:calibration={heads},kept=0.25,keep_first=1", "prune_heads kept=0.25 from layer 1"),
    # EfficientVLA layer pruning (arXiv 2506.10100): keep 22 of 32 layers, scaled: 3 of 4
    ("efficientvla_layers:calibration={layers},layers_kept=22,of=32", "efficientvla_layers 3/4"),
    ("fastv:layer=2,keep=0.25", "fastv:layer=2,keep=0.25"),
]


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(here, "results", "accuracy_structural"),
                   help="output folder (default: benchmarks/results/accuracy_structural)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from vlm_tokenprune import calibrate
    from vlm_tokenprune.eval.bench import run_bench
    from vlm_tokenprune.eval.synthetic import make_split
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm, prompts
    from vlm_tokenprune.methods.yopo import TINY_VLM_HEADS

    out = args.out
    os.makedirs(out, exist_ok=True)
    model, processor = load_tiny_vlm()
    calib = make_split("train", 64)
    batches = []
    processor.tokenizer.padding_side = "left"
    for i in range(0, len(calib), 8):
        chunk = calib[i:i + 8]
        batches.append(dict(processor(images=[e["image"] for e in chunk], text=prompts([e["question"] for e in chunk]),
                                      return_tensors="pt", padding=True)))
    heads = os.path.join(out, "heads.json")
    layers = os.path.join(out, "layers.json")
    art = calibrate(model, batches, what="heads", path=heads)
    with open(TINY_VLM_HEADS, encoding="utf-8") as f:
        shipped = json.load(f)
    if shipped["ratios"] != art["ratios"]:
        print(f"warning: {TINY_VLM_HEADS} differs from this calibration ({heads})", file=sys.stderr)
    calibrate(model, batches, what="layers", path=layers)
    policies = [p.format(layers=layers, heads=heads) for p, _ in POLICIES]
    labels = [label for _, label in POLICIES]
    run_bench(policies, None, n=500, batch_size=8, out=out, model=model, processor=processor, labels=labels)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
