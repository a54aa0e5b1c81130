"""Policy search on the shipped tiny VLM: EvoPress (arXiv 2410.14649) at FLOPs <= 0.4 and <= 0.25 against
every preset, with paired held-out statistics, and FinerCut's (arXiv 2405.18218) greedy sublayer order.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/search_tiny.py          # ~1 h on one shared CPU core
    python benchmarks/search_tiny.py --generations 2 --n 40 --out /tmp/st    # quicker look
    python benchmarks/search_tiny.py --from-json                             # rewrite search_tiny.md only

Search: space tokens (MCTF entry merge before the LLM, LLM stages at layers 1-3 choosing FastV's or DART's
criterion) + FinerCut sublayers, one FLOPs constraint with budget trading between them, seeded with the
presets the space can express (scaled to the budget). Calibration: the synthetic ``val`` split. Held-out:
the first ``n`` examples of the ``test`` split (the split of ``accuracy_tiny.md``), never seen by the
search. Every run (baseline, searched, best seed, every preset of ``accuracy_tiny.py``'s plan at 0.5 /
0.25 / 0.11, YOPO's structural presets) answers the same examples, so each comparison is paired: accuracy
with its Wilson 95 % interval and exact McNemar counts (``eval/paired.py``). FLOPs ratio: the LLM-only
ratio of each run's traces (``eval.bench.run_bench`` on the first ``--flops-n`` examples), the one the
search budget bounds. Per-example hits ("1" right, "0" wrong, per test example in order) are kept in
``<out>/search_tiny/hits.json`` (a killed run resumes; the paired counts can be recomputed from it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import vlm_tokenprune as vtp  # noqa: E402
from vlm_tokenprune.eval.bench import run_bench  # noqa: E402
from vlm_tokenprune.eval.flops import structural_flops  # noqa: E402
from vlm_tokenprune.eval.paired import mcnemar, verdict, wilson  # noqa: E402
from vlm_tokenprune.eval.synthetic import make_split  # noqa: E402
from vlm_tokenprune.eval.tiny_vlm import answer, load_tiny_vlm  # noqa: E402
from vlm_tokenprune.search.api import search_policy  # noqa: E402
from vlm_tokenprune.search.data import calibration_batches, heldout_accuracy  # noqa: E402

RESULTS = os.path.join(HERE, "results")
STRUCTURAL = ("yopo", "yopo_12", "yopo_25")  # presets without a token budget, run as registered


def preset_runs(model, budgets: list[float]) -> list[dict]:
    """Every preset of accuracy_tiny.py's plan x budget (variants that resolve to the same policy once), plus YOPO's."""
    from accuracy_tiny import plan

    from vlm_tokenprune.eval.bench import with_budget

    runs, seen = [], set()
    planned, _ = plan(model.config.text_config.num_hidden_layers)
    for name, pol, _how in planned:
        for b in budgets:
            try:
                p = vtp.patch(model, with_budget(pol, b))
                s = p.policy.to_string()
                p.unpatch()
            except ValueError as e:
                print(f"skipped {name} keep={b}: {e}", file=sys.stderr)
                continue
            if s not in seen:
                seen.add(s)
                runs.append({"label": name, "budget": b, "policy": s})
    for name in STRUCTURAL:
        try:
            p = vtp.patch(model, name)
            s = p.policy.to_string()
            p.unpatch()
        except ValueError as e:
            print(f"skipped {name}: {e}", file=sys.stderr)
            continue
        if s not in seen:
            seen.add(s)
            runs.append({"label": name, "budget": None, "policy": s})
    return runs


def llm_flops(model, processor, runs: list[dict], n: int) -> None:
    """``flops_ratio`` (LLM-only, from traces on the first ``n`` test examples) into each run."""
    pols = [r["policy"] for r in runs if r["policy"] is not None]
    res = run_bench(pols, None, n=n, model=model, processor=processor, timing_iters=0, progress=False)
    by = {r["policy_string"]: r["flops"]["llm_ratio"] for r in res["runs"] if r["policy_string"] is not None}
    by.update({p: by.get(vtp.Policy.parse(p).to_string()) for p in pols if p not in by})
    for r in runs:
        r["flops_ratio"] = 1.0 if r["policy"] is None else by[r["policy"]]


def hits_of(model, processor, policy: str | None, examples: list[dict], cache: dict, cache_path: str) -> list[bool]:
    key = f"{policy}|{len(examples)}"
    if key not in cache:
        ims, qs = [e["image"] for e in examples], [e["question"] for e in examples]
        if policy is None:
            preds = answer(model, processor, ims, qs)
        else:
            with vtp.patch(model, policy):
                preds = answer(model, processor, ims, qs)
        cache[key] = "".join("1" if p == e["answer"] else "0" for p, e in zip(preds, examples))
        tmp = cache_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)
    return [c == "1" for c in cache[key]]


def summarise(run: dict, hits: list[bool], examples: list[dict]) -> None:
    k, n = sum(hits), len(hits)
    lo, hi = wilson(k, n)
    per: dict[str, list[bool]] = {}
    for h, e in zip(hits, examples):
        per.setdefault(e["qtype"], []).append(h)
    run.update(correct=k, n=n, accuracy=k / n, ci=[lo, hi], per_type={q: sum(v) / len(v) for q, v in sorted(per.items())})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.4,0.25")
    ap.add_argument("--space", default="tokens,sublayers")
    ap.add_argument("--criteria", default="fastv,dart")
    ap.add_argument("--trade", type=float, default=0.5)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--generations", type=int, default=16)
    ap.add_argument("--offspring", type=int, default=12)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--flops-n", type=int, default=16)
    ap.add_argument("--preset-budgets", default="0.5,0.25,0.11")
    ap.add_argument("--finercut", action="store_true", help="re-run FinerCut's order (default: keep the recorded one)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--from-json", action="store_true", help="only rewrite search_tiny.md from <out>/search_tiny.json")
    ap.add_argument("--cached-only", action="store_true", help="evaluate no new run: rivals without cached hits are "
                    "listed as not evaluated (to finish a report from a run cut short)")
    args = ap.parse_args()
    report_path = os.path.join(args.out, "search_tiny.json")
    if args.from_json:
        with open(report_path, encoding="utf-8") as f:
            write_markdown(json.load(f), os.path.join(args.out, "search_tiny.md"))
        return 0
    torch.set_num_threads(1)
    t0 = time.time()
    model, processor = load_tiny_vlm()
    old = json.load(open(report_path, encoding="utf-8")) if os.path.exists(report_path) else {}
    report: dict = {"args": vars(args), "searches": [], "finercut": old.get("finercut")}
    os.makedirs(os.path.join(args.out, "search_tiny"), exist_ok=True)

    if args.finercut or report["finercut"] is None:
        # FinerCut: the greedy order over all 7 removable sublayers (3 attention above layer 0, 4 MLPs)
        batches, _, n_text, n_visual = calibration_batches(model, processor, args.calibration)
        art = vtp.calibrate(model, batches, what="sublayers", count=7, progress=False)
        fc = []
        for k in range(1, 5):
            order = art["order"][:k]
            attn = ";".join(str(j) for kind, j in order if kind == "attn")
            ffn = ";".join(str(j) for kind, j in order if kind == "ffn")
            pol = "skip_sublayers:" + ",".join(([f"attn={attn}"] if attn else []) + ([f"ffn={ffn}"] if ffn else []))
            fc.append({"removed": k, "policy": pol, "flops_ratio": structural_flops(model.config, pol, n_text, n_visual)["ratio"],
                       "accuracy": heldout_accuracy(model, processor, pol, args.n)})
        report["finercut"] = {"order": art["order"], "distance": art["distance"], "rows": fc, "n": args.n,
                              "calibration": args.calibration}
        print("finercut", art["order"], f"{time.time() - t0:.0f}s", flush=True)

    runs = [{"label": "baseline", "budget": None, "policy": None, "kind": "baseline"}]
    for b in [float(x) for x in args.budgets.split(",")]:
        out = os.path.join(args.out, "search_tiny", f"flops_{b:g}")
        ts = time.time()
        kw = dict(space=args.space, calibration=args.calibration, generations=args.generations, offspring=args.offspring,
                  heldout=0, out=out, progress=False, criteria=tuple(args.criteria.split(",")) if args.criteria else (),
                  trade=args.trade, sublayers=0)
        try:  # a killed run continues from the search's checkpoint
            res = search_policy(model, processor, f"flops={b}", resume=True, **kw)
        except ValueError as e:
            if "another search" not in str(e):
                raise
            res = search_policy(model, processor, f"flops={b}", resume=False, **kw)  # other settings: start afresh
        evaluated = len(res.rows)
        best_seed = min((s for s in res.seeds if s["fitness"] is not None), key=lambda s: s["fitness"], default=None)
        report["searches"].append({"budget": b, "policy": res.policy, "predicted_flops_ratio": res.flops_ratio,
                                   "kl": res.fitness, "out": os.path.relpath(out, args.out), "candidates": evaluated,
                                   "seconds": time.time() - ts, "seeds": res.seeds, "best_seed": best_seed})
        runs.append({"label": f"searched (flops <= {b:g})", "budget": None, "policy": res.policy, "kind": "searched",
                     "search_budget": b})
        if best_seed is not None and best_seed["policy"] != res.policy:
            runs.append({"label": f"best seed (flops <= {b:g}): {best_seed['family']}", "budget": None,
                         "policy": best_seed["policy"], "kind": "seed", "search_budget": b})
        print("search", b, res.policy, f"KL {res.fitness:.5f}", f"{time.time() - t0:.0f}s", flush=True)

    presets = preset_runs(model, [float(x) for x in args.preset_budgets.split(",")])
    for r in presets:
        r["kind"] = "preset"
    runs += presets
    llm_flops(model, processor, runs, args.flops_n)
    floor = min(r["flops_ratio"] for r in runs if r["kind"] == "searched") - 1e-9
    examples = make_split("test", args.n)  # run_bench's examples: the split of accuracy_tiny.md
    cache_path = os.path.join(args.out, "search_tiny", "hits.json")
    cache = json.load(open(cache_path, encoding="utf-8")) if os.path.exists(cache_path) else {}
    hits = {}
    for i, r in enumerate(runs):
        if r["kind"] == "preset" and r["flops_ratio"] < floor:
            r["evaluated"] = False  # below every searched policy's FLOPs: not a rival (FLOPs only)
            continue
        if args.cached_only and f"{r['policy']}|{len(examples)}" not in cache:
            r["evaluated"] = False
            r["missing"] = True  # a rival not evaluated (run cut short)
            continue
        r["evaluated"] = True
        hits[i] = hits_of(model, processor, r["policy"], examples, cache, cache_path)
        summarise(r, hits[i], examples)
        print(f"{r['label']} keep={r['budget']} flops {r['flops_ratio']:.3f} acc {r['accuracy']:.4f} "
              f"{time.time() - t0:.0f}s", flush=True)
    for i, r in enumerate(runs):
        if r["kind"] != "searched":
            continue
        r["paired"] = []
        for j, o in enumerate(runs):
            if j == i or j not in hits:
                continue
            c = mcnemar(hits[i], hits[j])
            r["paired"].append({"other": j, **c, "verdict": verdict(c)})
    report["runs"] = runs
    report["seconds"] = time.time() - t0
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    write_markdown(report, os.path.join(args.out, "search_tiny.md"))
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


def _name(r: dict) -> str:
    if r["kind"] == "baseline":
        return "baseline"
    if r["kind"] == "preset":
        return f"`{r['label']}`" + (f" keep {r['budget']:g}" if r["budget"] is not None else "")
    return f"**{r['label']}**"


def _acc(r: dict) -> str:
    return f"{r['accuracy']:.4f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] ({r['correct']}/{r['n']})"


def write_markdown(report: dict, path: str) -> None:
    a = report["args"]
    runs = report["runs"]
    lines = ["# Policy search on the shipped tiny VLM (EvoPress, arXiv 2410.14649; FinerCut, arXiv 2405.18218)", ""]
    lines += ["Command (whole page): `OMP_NUM_THREADS=1 nice -n 10 python benchmarks/search_tiny.py "
              f"--budgets {a['budgets']} --space {a['space']} --criteria {a['criteria']} --trade {a['trade']} "
              f"--calibration {a['calibration']} --generations {a['generations']} --offspring {a['offspring']} --n {a['n']} "
              f"--preset-budgets {a['preset_budgets']}` ({report['seconds'] / 60:.0f} min on a shared 2-core CPU machine "
              "under load from other jobs; `--from-json` rewrites this page). One search alone: `vlm-tokenprune search --budget flops=0.25 --space "
              f"{a['space']} --criteria {a['criteria']} --sublayers 0 --calibration {a['calibration']} --generations "
              f"{a['generations']} --offspring {a['offspring']} --heldout 0 --out DIR`.", ""]
    nb = a["calibration"] // 8
    lines += [f"Search: space `{a['space']}`: token budgets (MCTF merge from vision layer 0 into the LLM, then LLM "
              "stages at layers 1-3 whose criterion is itself a unit: " + " or ".join(f"`{c}`" for c in a["criteria"].split(","))
              + "; levels keep 1, 15/16, ..., 1/16 of the 256 visual tokens, never growing with depth) and FinerCut's "
              "removable sublayers (attention 1-3, MLP 0-3), one predicted LM prefill FLOPs constraint (`structural_flops` "
              f"at the calibration prompts' mean 11 text + 256 visual tokens). Children: half level switches (EvoPress), "
              f"half budget trades between sub-spaces (`mutation.budget_trade`: tight under the constraint). Seeds: the "
              "presets the space can express (MCTF alone, FastV / DART at layer 1, 2 or 3, PDrop's halving schedule), "
              "each at the least compression that fits the budget; they join the first generation and the final "
              f"selection. {a['calibration']} calibration examples (synthetic `val` split, {nb} batches of 8); "
              f"{a['generations']} generations of {a['offspring']} children; selection steps (batches, survivors) "
              f"({max(1, nb // 4)}, 4), ({max(1, nb // 2)}, 2), ({nb}, 1); final selection on all {nb} batches; fitness: KL "
              "of the answer tokens' next-token distributions to the unpruned model; seed 0.", ""]
    lines += [f"Held-out: the first {a['n']} examples of the synthetic `test` split (question types balanced; the "
              "split of `accuracy_tiny.md`, twice as many examples), never seen by the search. Every run answers the "
              "same examples (greedy exact match, `tiny_vlm.answer`, batch 8), so comparisons are paired: accuracy "
              "with its Wilson 95 % interval, and per rival the exact McNemar counts: **S+** = searched right and the "
              "rival wrong, **R+** = the rival right and the searched wrong, p = two-sided exact binomial on S+ vs R+; "
              "'beats' / 'loses' at p < 0.05, else 'tie (within noise)'. FLOPs ratio: LLM-only, from each run's traces "
              f"on the first {a['flops_n']} test examples (`run_bench`), the ratio the search budget bounds. Presets: "
              f"every preset `benchmarks/accuracy_tiny.py` runs (its tiny-depth forms) at keep {a['preset_budgets']} "
              "(variants that resolve to the same policy once) plus YOPO's structural presets; those below both "
              "searched policies' FLOPs are not rivals and are listed with FLOPs only.", ""]
    base = next(r for r in runs if r["kind"] == "baseline")
    verdicts = []
    for s in [r for r in runs if r["kind"] == "searched"]:
        rivals = [(runs[p["other"]], p) for p in s["paired"] if runs[p["other"]]["kind"] in ("preset", "baseline")
                  and runs[p["other"]]["flops_ratio"] >= s["flops_ratio"] - 1e-9]
        presets_ = [(o, p) for o, p in rivals if o["kind"] == "preset"]
        beats = [o for o, p in presets_ if p["verdict"] == "beats"]
        ties = [(o, p) for o, p in presets_ if p["verdict"] == "tie"]
        loses = [(o, p) for o, p in presets_ if p["verdict"] == "loses"]
        above = [(o, p) for o, p in presets_ if o["accuracy"] >= s["accuracy"]]
        holds = len(beats) == len(presets_)
        verdicts.append((s, holds, beats, ties, loses, above, presets_))
    lines += ["## Verdict", ""]
    for s, holds, beats, ties, loses, above, presets_ in verdicts:
        b = s["search_budget"]
        line = (f"- **FLOPs <= {b:g}: acceptance {'HOLDS' if holds else 'does NOT hold'}.** Searched `{s['policy']}` "
                f"(FLOPs {s['flops_ratio']:.3f}): {_acc(s)}; unpruned {_acc(base)}. Of the {len(presets_)} preset runs at "
                f"the same or higher FLOPs it beats {len(beats)} beyond noise (McNemar p < 0.05), ties {len(ties)} "
                f"within noise and loses to {len(loses)}")
        if above:
            line += ("; presets with equal or higher held-out accuracy (S+/R+, p): " + ", ".join(
                f"{_name(o)} {o['accuracy']:.4f} at FLOPs {o['flops_ratio']:.3f} ({p['a_only']}/{p['b_only']}, p={p['p']:.2f})"
                for o, p in sorted(above, key=lambda t: -t[0]["accuracy"])))
        gone = [r for r in runs if r.get("missing") and r["flops_ratio"] >= s["flops_ratio"] - 1e-9]
        if gone:
            line += f"; {len(gone)} preset runs at the same or higher FLOPs were NOT evaluated (run cut short)"
        lines.append(line + ".")
    lines += ["", "In words: " + "; ".join(
        f"at FLOPs <= {s['search_budget']:g} the searched policy is never worse beyond noise than a preset at the same or "
        f"higher FLOPs ({len(loses)} losses), beats {len(beats)} of {len(presets_)} and ties the other {len(ties)} "
        f"(the best of those ties reach {max([o['accuracy'] for o, _ in ties] or [float('nan')]):.3f})"
        for s, holds, beats, ties, loses, above, presets_ in verdicts)
        + ". The acceptance asks for 'beats every preset at the same or higher FLOPs': that is not shown at either budget."]
    lines += ["", "Why it cannot hold strictly on this model: the unpruned tiny VLM answers "
              f"{base['accuracy']:.1%} of the held-out questions, and the presets that keep the most compute sit at that "
              "level; a pruned policy can match it but 'beating' it needs the pruned model to answer questions the "
              "unpruned one gets wrong. The paired counts say where the searched policy ties (within noise) rather "
              "than beats.", ""]
    for s in [r for r in runs if r["kind"] == "searched"]:
        info = next(x for x in report["searches"] if x["budget"] == s["search_budget"])
        lines += [f"## FLOPs <= {s['search_budget']:g}", "",
                  f"Searched policy: `{info['policy']}` (predicted FLOPs ratio {info['predicted_flops_ratio']:.3f}, "
                  f"calibration KL {info['kl']:.5f}; {info['candidates']} candidates evaluated in "
                  f"{info['seconds'] / 60:.1f} min; files in `{info['out']}/`: best.yaml, pareto.md / .json, checkpoint.json).", "",
                  "Seeds (presets the space expresses, at the least compression within the budget; calibration KL on "
                  "every batch):", "", "| family | policy | predicted FLOPs | calibration KL |", "|---|---|---|---|"]
        for sd in sorted(info["seeds"], key=lambda x: x["fitness"] if x["fitness"] is not None else 9):
            kl = "-" if sd["fitness"] is None else f"{sd['fitness']:.5f}"
            lines.append(f"| {sd['family']} | `{sd['policy']}` | {sd['flops_ratio']:.3f} | {kl} |")
        lines += ["", "Held-out, paired with the searched policy (runs at the same or higher FLOPs, and the best seed):", "",
                  "| run | policy | FLOPs ratio | accuracy [95 % CI] (correct/n) | S+ | R+ | McNemar p | verdict |",
                  "|---|---|---|---|---|---|---|---|", f"| **searched** | `{s['policy']}` | {s['flops_ratio']:.3f} | {_acc(s)} | | | | |"]
        for p in sorted(s["paired"], key=lambda p: runs[p["other"]]["flops_ratio"]):
            o = runs[p["other"]]
            if o["kind"] == "searched" or (o["kind"] == "seed" and o["search_budget"] != s["search_budget"]):
                continue
            if o["kind"] == "preset" and o["flops_ratio"] < s["flops_ratio"] - 1e-9:
                continue
            v = {"tie": "tie (within noise)", "beats": "searched beats", "loses": "searched loses"}[p["verdict"]]
            lines.append(f"| {_name(o)} | `{o['policy'] or '-'}` | {o['flops_ratio']:.3f} | {_acc(o)} | {p['a_only']} | "
                         f"{p['b_only']} | {p['p']:.3f} | {v} |")
        lines.append("")
    # held-out Pareto front over every evaluated run
    ev = [r for r in runs if r.get("evaluated")]
    front = [r for r in ev if not any(o["flops_ratio"] <= r["flops_ratio"] and o["accuracy"] >= r["accuracy"]
                                      and (o["flops_ratio"] < r["flops_ratio"] or o["accuracy"] > r["accuracy"]) for o in ev)]
    lines += ["## Pareto table (held-out accuracy vs LLM FLOPs, every evaluated run)", "",
              "| run | policy | FLOPs ratio | accuracy [95 % CI] | color | count | exists | location | read | Pareto |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ev, key=lambda r: (r["flops_ratio"], -r["accuracy"])):
        pt = r["per_type"]
        lines.append(f"| {_name(r)} | `{r['policy'] or '-'}` | {r['flops_ratio']:.3f} | {_acc(r)} | "
                     + " | ".join(f"{pt.get(q, float('nan')):.3f}" for q in ("color", "count", "exists", "location", "read"))
                     + f" | {'yes' if r in front else ''} |")
    missing = [r for r in runs if r.get("missing")]
    if missing:
        lines += ["", "**Rivals NOT evaluated (the run was cut short; the verdict above does not cover them):** "
                  + ", ".join(f"{_name(r)} ({r['flops_ratio']:.3f})" for r in missing) + "."]
    low = [r for r in runs if r["kind"] == "preset" and not r.get("evaluated") and not r.get("missing")]
    if low:
        lines += ["", "Not rivals (FLOPs below both searched policies; not evaluated here, see `accuracy_tiny.md`): "
                  + ", ".join(f"{_name(r)} ({r['flops_ratio']:.3f})" for r in sorted(low, key=lambda r: -r["flops_ratio"])) + "."]
    lines += ["", "Each search's own Pareto table (calibration KL vs predicted FLOPs of every candidate it evaluated) is "
              "`search_tiny/flops_<b>/pareto.md`.", ""]
    fc = report["finercut"]
    lines += ["## FinerCut on the tiny VLM", "",
              f"`vtp.calibrate(model, batches, what=\"sublayers\", count=7)` on {fc.get('calibration', 64)} calibration "
              "examples (prompt + answer, every real position; Jensen-Shannon divergence to the unpruned model). "
              "Candidates: the attention of layers 1-3 (layer 0's is where the KV cache length is read) and the MLP of "
              f"layers 0-3. Held-out accuracy on the first {fc.get('n', 500)} test examples (recorded with the earlier run "
              "of this script unless `--finercut`).", "",
              "| step | removed | JS divergence after the step |", "|---|---|---|"]
    for i, ((kind, j), d) in enumerate(zip(fc["order"], fc["distance"])):
        lines.append(f"| {i + 1} | {'attention' if kind == 'attn' else 'MLP'} of layer {j} | {d:.4f} |")
    lines += ["", "| sublayers removed | policy | FLOPs ratio (predicted) | held-out accuracy |", "|---|---|---|---|"]
    for r in fc["rows"]:
        lines.append(f"| {r['removed']} | `{r['policy']}` | {r['flops_ratio']:.3f} | {r['accuracy']:.3f} |")
    lines += ["", "Attention before MLP, deepest first, as the paper reports for Llama."]
    text = "\n".join(lines) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(os.path.dirname(HERE) + os.sep, ""))  # paths inside the repository, relative


if __name__ == "__main__":
    sys.exit(main())
