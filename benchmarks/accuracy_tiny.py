"""Accuracy of every registered method on the shipped tiny VLM at keep 0.5 / 0.25 / 0.11, plus FEATHER vs FastV
localisation (accuracy on "where is ...?" questions and the mean kept row of the image).

    OMP_NUM_THREADS=1 python benchmarks/accuracy_tiny.py            # ~5-10 min on one CPU core, n = 500
    python benchmarks/accuracy_tiny.py --n 100 --out /tmp/acc        # quicker look

Writes ``<out>/accuracy_tiny.json``, ``.md`` and ``.png`` (default ``benchmarks/results/``). Re-run it as is
when the tiny model's weights change: it reloads ``vlm_tokenprune/assets/tiny_vlm`` and records the
weights' SHA-256 next to the numbers.

Methods: every preset in ``vlm_tokenprune.PRESETS``. Single-stage presets run as registered (they act
before layer 2, which the 4-layer tiny model has); a budget replaces their ``keep``. Multi-stage paper
presets are written for 32-layer Vicuna-7B; ``TINY_DEPTH`` below maps each to the tiny model's 4 layers
(same fraction of depth) and says how. Budgets on multi-stage policies follow ``bench.BUDGET_RULE``
(first stage keeps the budget; later keep-of-original stages scale with it; ``of=current`` and
``tokens=`` stages are unchanged). Presets that are not token-budget methods, or that have no tiny-depth
mapping here, are listed as skipped with the reason.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_tokenprune import PRESETS, Policy  # noqa: E402
from vlm_tokenprune.eval.bench import markdown_table, run_bench, write_outputs  # noqa: E402
from vlm_tokenprune.eval.tiny_vlm import ASSET_DIR, load_tiny_vlm  # noqa: E402
from vlm_tokenprune.methods.aim import aim_schedule  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# preset -> (its policy on the tiny model's 4 decoder layers, how it was adapted from the paper's 32 layers)
TINY_DEPTH = {
    "pdrop": (
        "fastv:layer=1,keep=0.5+fastv:layer=2,keep=0.25+fastv:layer=3,keep=0.125",
        "layers 8/16/24 of 32 -> 1/2/3 of 4 (layer x 4/32); keeps 50/25/12.5 % unchanged (a budget b gives b, b/2, b/4)",
    ),
    "feather": (
        "feather:layer=1,keep=0.3,stride=3+feather:layer=2,keep=0.09,of=current,stride=0",
        "layers 8/16 of 32 -> 1/2 of 4 (layer x 4/32); stage 1 top 30 % + stride-3 grid (6x6 of the 16x16 grid), "
        "stage 2 top 9 % of what is left (a budget b replaces the 30 %)",
    ),
    "mctf": (
        "mctf:layer=0",
        "fusing from vision layer 0 instead of 1: MCTF fuses at most half of the tokens per layer, and the tiny "
        "tower's 4 layers need all 4 halvings (256 -> 16) to reach keep 0.11 (28 tokens)",
    ),
    "aim": (
        aim_schedule(1, 3, 4).to_string(),
        "AIM's linear schedule (all tokens up to layer 13, 1 token from layer 21, of 32) -> l1 = floor(13 x 4/32) = 1, "
        "l2 = ceil(21 x 4/32) = 3: all tokens into layers 0-1, 50 % into layer 2, 1 token into layer 3 "
        "(a budget b replaces the 50 %)",
    ),
}


# presets the budget sweep would only repeat, or that have their own benchmark
NOT_SWEPT = {
    "flowcut_vit_192": "the flowcut_vit method with another budget: the sweep over budgets covers it",
    "flowcut_vit_64": "the flowcut_vit method with another budget: the sweep over budgets covers it",
    "flowcut_next": "LLaVA-NeXT preset (per-crop budget + an LLM stage); the tiny VLM is LLaVA-1.5-style",
    "atp": "its kept count is learned per instance (the budget is a training target, not swept): "
           "benchmarks/results/accuracy_learned_atp.md compares it at its measured average",
}


def plan(num_layers: int) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """``([(preset, policy, how)], [(preset, why skipped)])`` for a model with ``num_layers`` decoder layers."""
    runs, skipped = [], []
    for name in PRESETS.names():
        if name in TINY_DEPTH:
            runs.append((name, *TINY_DEPTH[name]))
            continue
        if name in NOT_SWEPT:
            skipped.append((name, NOT_SWEPT[name]))
            continue
        try:
            pol = Policy.parse(name)
        except ValueError as e:  # e.g. a preset that needs a parameter (a calibration file)
            skipped.append((name, f"cannot be built without arguments: {e}"))
            continue
        if any(st.budget is None for st in pol.stages):
            skipped.append((name, "structural (no token budget to sweep): " + PRESETS.get(name).description))
        elif len(pol.stages) > 1 or any(st.layer is not None and st.layer >= num_layers for st in pol.stages):
            skipped.append((name, f"multi-stage or deeper than {num_layers} layers, and no tiny-depth mapping in TINY_DEPTH"))
        else:
            where = "pre-LLM" if pol.stages[0].layer is None else "layer %d" % pol.stages[0].layer
            runs.append((name, name, f"as registered ({where})"))
    return runs, skipped


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def localisation(result: dict) -> list[dict]:
    """FEATHER vs FastV per budget: location accuracy and the mean kept row of each stage (0 top, 1 bottom)."""
    by = {(r["label"], r["budget"]): r for r in result["runs"]}
    base = result["runs"][0]
    rows = [{"method": "baseline", "budget": None, "location_accuracy": base["accuracy"]["location"],
             "accuracy_all": base["accuracy"]["all"], "kept_row_mean": [], "kept_visual_per_stage": []}]
    for b in result["budgets"]:
        for m in ("fastv", "feather"):
            r = by.get((m, b))
            if r is not None:
                rows.append({"method": m, "budget": b, "policy": r["policy_string"],
                             "location_accuracy": r["accuracy"]["location"], "accuracy_all": r["accuracy"]["all"],
                             "kept_row_mean": r["kept_row_mean"], "kept_visual_per_stage": r["kept_visual_per_stage"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="synthetic test-split examples (default 500, types balanced)")
    p.add_argument("--budgets", default="0.5,0.25,0.11")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timing-iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    budgets = [float(x) for x in args.budgets.split(",")]
    weights = os.path.join(ASSET_DIR, "model.safetensors")
    while True:  # the weights the numbers belong to (a training run may rewrite them while we load)
        weights_sha = sha256(weights)
        model, processor = load_tiny_vlm()
        if sha256(weights) == weights_sha:
            break
    runs, skipped = plan(model.config.text_config.num_hidden_layers)
    print("running: " + ", ".join(f"{name} ({pol})" for name, pol, _ in runs))
    for name, why in skipped:
        print(f"skipped: {name}: {why}")
    result = run_bench([pol for _, pol, _ in runs], budgets, n=args.n, batch_size=args.batch_size, model=model,
                       processor=processor, timing_iters=args.timing_iters, labels=[name for name, _, _ in runs])
    if sha256(weights) != weights_sha:
        print(f"note: the weights on disk changed during the run; these numbers are for SHA-256 {weights_sha[:16]}...",
              file=sys.stderr)
    result["weights"] = {"path": str(ASSET_DIR), "model_safetensors_sha256": weights_sha,
                         "training_record": "benchmarks/results/tiny_vlm_training.md"}
    result["adaptations"] = [{"preset": name, "policy": pol, "how": how} for name, pol, how in runs]
    result["skipped"] = [{"preset": name, "why": why} for name, why in skipped]
    result["localisation"] = localisation(result)
    paths = write_outputs(result, args.out, stem="accuracy_tiny")

    md = ["", "## Methods and their tiny-depth policies (4 decoder layers)", "",
          "| method | policy on the tiny model (before budgets) | adaptation |", "|---|---|---|"]
    md += [f"| {name} | `{pol}` | {how} |" for name, pol, how in runs]
    if skipped:
        md += ["", "Not run: " + "; ".join(f"`{name}`: {why}" for name, why in skipped) + "."]
    md += ["", "## Localisation: FEATHER vs FastV", "",
           "Location accuracy = exact match on the \"where is the <colour> <shape> ?\" questions (answer = one of 16 "
           "cells). Mean kept row = mean grid row of the kept visual tokens, 0 = top row, 1 = bottom row of the 12x12 "
           "patch grid (all tokens: 0.5), per stage, over all examples. FEATHER (arXiv 2412.13180) reports that "
           "FastV's RoPE-biased criterion keeps mostly bottom tokens and loses localisation.", "",
           "| method | keep | location acc | acc all | kept visual tokens per stage | mean kept row per stage |",
           "|---|---|---|---|---|---|"]
    for r in result["localisation"]:
        md.append(f"| {r['method']} | {'-' if r['budget'] is None else r['budget']} | {r['location_accuracy']:.3f} | "
                  f"{r['accuracy_all']:.3f} | {' / '.join(f'{k:.1f}' for k in r['kept_visual_per_stage']) or '144'} | "
                  f"{' / '.join('-' if x is None else f'{x:.3f}' for x in r['kept_row_mean']) or '0.5 (all)'} |")
    md += ["", f"Weights: `{ASSET_DIR.name}/model.safetensors` SHA-256 `{result['weights']['model_safetensors_sha256'][:16]}...` "
           "(training record: `benchmarks/results/tiny_vlm_training.md`).",
           f"Command: `OMP_NUM_THREADS=1 python benchmarks/accuracy_tiny.py --n {args.n} --budgets {args.budgets}`"]
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(markdown_table(result))
    print("\n".join(md))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
