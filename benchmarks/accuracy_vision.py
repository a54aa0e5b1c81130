"""Accuracy of the reductions before the LLM (vision-encoder and pre-LLM sites) on the shipped tiny VLM, against
FastV / uniform / random at the SAME number of visual tokens entering the language model.

    OMP_NUM_THREADS=1 python benchmarks/accuracy_vision.py            # n = 300, keep 0.5 / 0.25 / 0.11
    python benchmarks/accuracy_vision.py --n 100 --out /tmp/accv       # quicker look

Every policy keeps a fraction ``b`` of the 256 visual tokens (``bench.with_budget``): the vision-site methods
(``flowcut_vit``, ``mctf``; ``vispruner``, ``visionzip`` at the tower's feature layer) in the CLIP tower,
``aim_merge`` / ``divprune`` / ``covipal`` / ``uniform`` / ``random`` at the language model's input
(``site=pre_llm``), every LLM-site criterion before layer 1 (FastV, DART with ``count=exact``: the budget, not
DART's pivots + 8 * (k // 8); SparseVLM top-k with and without its recycled cluster tokens, which come on top of
the budget; FEATHER without its grid; EfficientVLA; FlowCut's LLM stage; AIM's PageRank; DivPrune, uniform and
random at layer 1), FastV / DART / SparseVLM before layer 2 (where the tiny model has already read the image:
see benchmarks/results/accuracy_tiny.md), and the SparseVLM rank-count presets once each (their count is their
own). All pre-LLM-side policies use
``positions=gaps`` (each kept token keeps its original position id) so they differ only in which tokens they
keep; the location column shows which keep localisation. Writes ``<out>/bench.{json,md,png}``
(default ``benchmarks/results/accuracy_vision/``).
"""
from __future__ import annotations

import argparse
import json
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
    ("sparsevlm:layer=1,keep=0.5,count=topk", "sparsevlm (before layer 1, top-k + recycled clusters)"),
    ("sparsevlm:layer=1,keep=0.5,count=topk,recycle=0", "sparsevlm_norecycle (before layer 1, top-k only)"),
    ("feather:layer=1,keep=0.5,stride=0", "feather (before layer 1, no grid)"),
    ("efficientvla:layer=1", "efficientvla (before layer 1)"),
    ("flowcut_llm:layer=1", "flowcut_llm (before layer 1)"),
    ("aim:layer=1,keep=0.5", "aim (PageRank, before layer 1)"),
    ("divprune:site=llm,layer=1,positions=gaps", "divprune_llm (before layer 1)"),
    ("uniform:layer=1", "uniform_llm (before layer 1)"),
    ("random:layer=1", "random_llm (before layer 1)"),
    ("fastv:layer=2", "fastv (before layer 2)"),
    ("dart:layer=2,count=exact", "dart (before layer 2, exact count)"),
    ("sparsevlm:layer=2,keep=0.5,count=topk", "sparsevlm (before layer 2, top-k + recycled clusters)"),
]
# presets whose count is their own (no keep to set): run once each, as registered (paper layers mapped to the depth)
OWN_COUNT = [
    ("sparsevlm", "sparsevlm preset (rank count, scale 13.5; layers 1/2/3)"),
    ("sparsevlm_64", "sparsevlm_64 preset (rank count, scale 0.8; layers 1/2/3)"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--only", default="", help="comma-separated labels' first words: run only these policies")
    ap.add_argument("--budgets", default="0.5,0.25,0.11")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "accuracy_vision"))
    ap.add_argument("--geometry", default="", help="instead of accuracy: FLOPs and measured prefill ratio of the same "
                    "policies on a random-weight profile geometry (e.g. llava-small), written to <out>/geometry_<name>/")
    ap.add_argument("--timing-iters", type=int, default=3, help="--geometry: interleaved timed prefills per run")
    ap.add_argument("--table", action="store_true", help="merge <out>/bench.json and <out>/geometry_llava-small/bench.json "
                    "into <out>/table.md (one row per policy and budget)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.table:
        return write_table(args.out)
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
    for spec, label in OWN_COUNT:
        if only and label.split()[0] not in only:
            continue
        policies.append(spec)
        labels.append(label)
    if args.geometry:
        from vlm_tokenprune.eval.bench_geometry import run_bench_geometry

        out = os.path.join(args.out, f"geometry_{args.geometry}")
        res = run_bench_geometry(args.geometry, policies, None, batch_size=1, timing_iters=args.timing_iters, out=out)
        with open(os.path.join(out, "labels.json"), "w") as f:  # a geometry run's label (policy string) -> ours
            json.dump({pol if isinstance(pol, str) else pol.to_string(): lab for lab, pol in zip(labels, policies)}, f,
                      indent=1)
        print(f"skipped on {args.geometry}: {[s['label'] for s in res['skipped']]}")
        print(f"wrote {out}")
        return 0
    run_bench(policies, None, n=args.n, batch_size=8, out=args.out, labels=labels, timing_iters=0)
    print(f"wrote {args.out}")
    return 0


def write_table(out: str) -> int:
    """One table: accuracy on the shipped tiny VLM (``bench.json``) beside the FLOPs and measured CPU prefill ratio
    of the same policy on the llava-small geometry (``geometry_llava-small/bench.json``, random weights)."""
    with open(os.path.join(out, "bench.json")) as f:
        acc = json.load(f)
    with open(os.path.join(out, "geometry_llava-small", "bench.json")) as f:
        geo = json.load(f)
    with open(os.path.join(out, "geometry_llava-small", "labels.json")) as f:
        geo_labels = json.load(f)
    by_label = {geo_labels[r["label"]]: r for r in geo["runs"][1:] if r["label"] in geo_labels}
    lines = ["# Every token-budget method at the same visual-token count: accuracy on the shipped tiny VLM (n = "
             f"{acc.get('data', {}).get('n', '?')}), FLOPs and measured CPU prefill ratio on the llava-small geometry", "",
             "Written by `python benchmarks/accuracy_vision.py --table` from `bench.json` and "
             "`geometry_llava-small/bench.json`; commands and reading in NOTES.md. FLOPs ratios: total (vision tower + "
             "projector + LLM) unless marked LLM; prefill ratio: LM prefill, 3 interleaved runs, medians (noisy).", "",
             "| policy | visual tokens into the LLM (tiny) | tokens per layer (tiny) | FLOPs ratio (tiny) | acc all | location "
             "| llava-small FLOPs ratio | llava-small LLM FLOPs ratio | llava-small measured CPU prefill ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in acc["runs"]:
        lab = r.get("label", "")
        g = by_label.get(lab)
        tpl = "/".join(str(round(t)) for t in r.get("tokens_per_layer", []))
        acc_all = r.get("accuracy", {}).get("all") if isinstance(r.get("accuracy"), dict) else None
        loc = r.get("accuracy", {}).get("location") if isinstance(r.get("accuracy"), dict) else None
        fl = r.get("flops_ratio", r.get("flops", {}).get("ratio") if isinstance(r.get("flops"), dict) else None)
        kept = r.get("kept_visual_per_stage") or []
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        pr = g["prefill"].get("measured_ratio") if g else None
        lines.append(f"| `{lab}` | {'/'.join(f'{k:.0f}' for k in kept) or '-'} | {tpl} | {fmt(fl)} | {fmt(acc_all)} | "
                     f"{fmt(loc)} | {fmt(g['flops']['ratio']) if g else 'n/a'} | "
                     f"{fmt(g['flops'].get('llm_ratio')) if g else 'n/a'} | {fmt(pr)} |")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out, 'table.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
