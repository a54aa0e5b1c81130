"""Offline accuracy of YOPO-style structural presets and EfficientVLA layer pruning on the shipped tiny VLM.

Calibrates on the synthetic TRAIN split (never the test split), then runs the offline benchmark.
``OMP_NUM_THREADS=1 python benchmarks/accuracy_structural.py`` -> ``benchmarks/results/accuracy_structural/``.
"""
from __future__ import annotations

import os
import sys

import torch


def main() -> int:
    torch.set_num_threads(1)
    from vlm_tokenprune import calibrate
    from vlm_tokenprune.eval.bench import run_bench
    from vlm_tokenprune.eval.synthetic import make_split
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm, prompts

    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "results", "accuracy_structural")
    os.makedirs(out, exist_ok=True)
    model, processor = load_tiny_vlm()
    calib = make_split("train", 64)
    batches = []
    for i in range(0, len(calib), 8):
        chunk = calib[i:i + 8]
        processor.tokenizer.padding_side = "left"
        batches.append(dict(processor(images=[e["image"] for e in chunk], text=prompts([e["question"] for e in chunk]),
                                      return_tensors="pt", padding=True)))
    heads = os.path.join(out, "heads.json")
    layers = os.path.join(out, "layers.json")
    calibrate(model, batches, what="heads", path=heads)
    calibrate(model, batches, what="layers", path=layers)
    policies = [
        # YOPO-style (arXiv 2410.06169): half the heads for visual computation (layers 0-1 keep all), half the
        # visual FFN, 5x5 neighbour attention, no visual tokens from the last layer on
        f"prune_heads:calibration={heads},top_n=2,scope=visual+ffn_cut:ratio=2+neighbor_attention:window=5+visual_drop:layer=3",
        "ffn_cut:ratio=2+neighbor_attention:window=5+visual_drop:layer=2",
        # EfficientVLA layer pruning (arXiv 2506.10100): keep 22 of 32 layers, scaled: 3 of 4
        f"efficientvla_layers:calibration={layers},layers_kept=22,of=32",
        "fastv:layer=2,keep=0.25",
    ]
    labels = ["yopo_heads+ffn+window+drop@3", "yopo_ffn+window+drop@2", "efficientvla_layers 3/4", "fastv:layer=2,keep=0.25"]
    run_bench(policies, None, n=500, batch_size=8, out=out, model=model, processor=processor, labels=labels)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
