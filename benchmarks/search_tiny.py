"""Policy search on the shipped tiny VLM: EvoPress (arXiv 2410.14649) at FLOPs <= 0.4 and <= 0.25 against
the presets, and FinerCut's (arXiv 2405.18218) greedy sublayer order.

    OMP_NUM_THREADS=1 python benchmarks/search_tiny.py                 # ~20-30 min on one shared CPU core
    python benchmarks/search_tiny.py --generations 4 --n 100 --out /tmp/st   # quicker look

Calibration: the synthetic ``val`` split (64 examples, 8 batches); held-out: the first ``n`` examples of
the ``test`` split (the split of ``accuracy_tiny.md``), never seen by the search. Searched policies and
presets are scored in the same ``eval.bench.run_bench`` harness (FLOPs ratio from each example's trace).
Writes ``<out>/search_tiny.md`` and ``.json``, and each search's folder (best.yaml, pareto.md / .png).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vlm_tokenprune as vtp  # noqa: E402
from vlm_tokenprune.eval.bench import run_bench  # noqa: E402
from vlm_tokenprune.eval.flops import structural_flops  # noqa: E402
from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm  # noqa: E402
from vlm_tokenprune.search.api import search_policy  # noqa: E402
from vlm_tokenprune.search.data import calibration_batches, heldout_accuracy  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TINY_PRESETS = {  # tiny-depth forms, as benchmarks/accuracy_tiny.py runs them
    "mctf": "mctf:layer=0",
    "feather": "feather:layer=1,keep=0.3,stride=3+feather:layer=2,keep=0.09,of=current,stride=0",
    "pdrop": "fastv:layer=1,keep=0.5+fastv:layer=2,keep=0.25+fastv:layer=3,keep=0.125",
}


def bench_rows(result: dict) -> list[dict]:
    """The runs of a ``run_bench`` result, compact (no predictions)."""
    return [{"label": r["label"], "budget": r["budget"], "policy": r["policy_string"], "flops_ratio": r["flops"]["ratio"],
             "tokens_per_layer": r["tokens_per_layer"], "accuracy": r["accuracy"]} for r in result["runs"]] \
        + [{"label": s["label"], "budget": s["budget"], "skipped": s["error"]} for s in result["skipped"]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.4,0.25")
    ap.add_argument("--space", default="tokens")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--offspring", type=int, default=12)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--presets", default="mctf,aim_merge,covipal,flowcut_vit,feather,pdrop,divprune,visionzip,vispruner,dart")
    ap.add_argument("--preset-budgets", default="0.5,0.25,0.11")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, processor = load_tiny_vlm()
    report: dict = {"args": vars(args), "searches": [], "finercut": None}

    # FinerCut: the greedy order over all 7 removable sublayers (3 attention above layer 0, 4 MLPs)
    batches, _, n_text, n_visual = calibration_batches(model, processor, args.calibration)
    art = vtp.calibrate(model, batches, what="sublayers", count=7, progress=False)
    fc = []
    for k in range(1, 5):
        order = art["order"][:k]
        attn = ";".join(str(j) for kind, j in order if kind == "attn")
        ffn = ";".join(str(j) for kind, j in order if kind == "ffn")
        pol = "skip_sublayers:" + ",".join(([f"attn={attn}"] if attn else []) + ([f"ffn={ffn}"] if ffn else []))
        ratio = structural_flops(model.config, pol, n_text, n_visual)["ratio"]
        fc.append({"removed": k, "policy": pol, "flops_ratio": ratio,
                   "accuracy": heldout_accuracy(model, processor, pol, args.n)})
    report["finercut"] = {"order": art["order"], "distance": art["distance"], "rows": fc}
    print("finercut", art["order"], f"{time.time() - t0:.0f}s", flush=True)

    searched = []
    for b in [float(x) for x in args.budgets.split(",")]:
        out = os.path.join(args.out, "search_tiny", f"flops_{b:g}")
        res = search_policy(model, processor, f"flops={b}", space=args.space, calibration=args.calibration,
                            generations=args.generations, offspring=args.offspring, heldout=0, out=out, progress=False)
        report["searches"].append({"budget": b, "policy": res.policy, "predicted_flops_ratio": res.flops_ratio,
                                   "kl": res.fitness, "out": os.path.relpath(out, RESULTS)})
        searched.append(res.policy)
        print("search", b, res.policy, f"{time.time() - t0:.0f}s", flush=True)

    mine = run_bench(searched, None, n=args.n, model=model, processor=processor, timing_iters=0, progress=False)
    report["searched_bench"] = bench_rows(mine)
    presets = []
    for name in args.presets.split(","):
        if name in vtp.PRESETS.names():
            presets.append(TINY_PRESETS.get(name, name))
    theirs = run_bench(presets, [float(x) for x in args.preset_budgets.split(",")], n=args.n, model=model,
                       processor=processor, timing_iters=0, progress=False)
    report["preset_bench"] = bench_rows(theirs)
    report["seconds"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "search_tiny.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
