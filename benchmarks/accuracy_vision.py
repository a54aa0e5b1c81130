"""Accuracy of the reductions before the LLM (vision-encoder and pre-LLM sites) on the shipped tiny VLM, against
FastV / uniform / random at the SAME number of visual tokens entering the language model.

    OMP_NUM_THREADS=1 python benchmarks/accuracy_vision.py            # n = 300, keep 0.5 / 0.25 / 0.11
    python benchmarks/accuracy_vision.py --n 100 --out /tmp/accv       # quicker look

Every policy keeps a fraction ``b`` of the 256 visual tokens (``bench.with_budget``): the vision-site methods
(``flowcut_vit``, ``mctf``; ``vispruner``, ``visionzip`` at the tower's feature layer) in the CLIP tower,
``aim_merge`` / ``divprune`` / ``covipal`` / ``uniform`` / ``random`` at the language model's input
(``site=pre_llm``), FastV and DART (``count=exact``: the budget, not DART's pivots + 8 * (k // 8)) inside the LLM (before layer 1, and before layer 2 where the tiny
model has already read the image: see benchmarks/results/accuracy_tiny.md). All pre-LLM-side policies use
``positions=gaps`` (each kept token keeps its original position id) so they differ only in which tokens they
keep; the location column shows which keep localisation. Writes ``<out>/bench.{json,md,png}``
(default ``benchmarks/results/accuracy_vision/``).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POLICIES = [
    ("flowcut_vit:positions=gaps", "flowcut_vit (ViT, gaps)"),
    ("mctf:layer=0,positions=gaps", "mctf (ViT from layer 0, gaps)"),  # 4 tower layers: 4 halvings reach 0.11
    ("vispruner:positions=gaps", "vispruner (ViT feature layer, gaps)"),
    ("visionzip:positions=gaps", "visionzip (ViT feature layer, gaps)"),
    ("aim_merge:positions=gaps", "aim_merge (pre-LLM, gaps)"),
    ("divprune:positions=gaps", "divprune (pre-LLM, gaps)"),
    ("covipal:positions=gaps", "covipal (pre-LLM, learned, gaps)"),
    ("uniform:site=pre_llm", "uniform (pre-LLM)"),
    ("random:site=pre_llm", "random (pre-LLM)"),
    ("fastv:layer=1", "fastv (before layer 1)"),
    ("dart:layer=1,count=exact", "dart (before layer 1, exact count)"),
    ("fastv:layer=2", "fastv (before layer 2)"),
    ("dart:layer=2,count=exact", "dart (before layer 2, exact count)"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--only", default="", help="comma-separated labels' first words: run only these policies")
    ap.add_argument("--budgets", default="0.5,0.25,0.11")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "accuracy_vision"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from vlm_tokenprune.eval.bench import run_bench, with_budget

    budgets = [float(b) for b in args.budgets.split(",")]
    policies, labels = [], []
    only = {w for w in args.only.split(",") if w}
    for spec, label in POLICIES:
        if only and label.split()[0] not in only:
            continue
        for b in budgets:
            policies.append(with_budget(spec, b))
            labels.append(f"{label} keep {b}")
    run_bench(policies, None, n=args.n, batch_size=8, out=args.out, labels=labels, timing_iters=0)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
