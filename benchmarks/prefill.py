"""CPU prefill benchmark: measured speed-up of a patched LLaVA vs the FLOPs theory, side by side.

Geometry (the CPU reference, random weights, built offline): text Llama of hidden 512,
8 layers, 8 heads (MHA, as Vicuna), MLP 1408, vocab 32000; CLIP tower 336 px / patch 14
(24 x 24 = 576 visual tokens) with ONE layer of width 64; prompt = BOS + 34 text + 576
visual + 29 text = 640 tokens (64 text), batch 1, sdpa, fp32, one torch thread.

What is timed: the LANGUAGE-MODEL prefill. Image features are computed once and passed as
``mm_encoder_outputs`` (no ``pixel_values``), so each timed call runs embedding + feature
scatter + the 8 decoder layers + the LM head on the last token (``logits_to_keep=1``),
with the patch's own hooks (visual layout, scoring, selection, gathers) inside the timer.
The vision tower's share of a full forward is measured separately and reported.

For each policy, baseline and patched prefills are interleaved in ONE loop on the same
model (patch before a patched call, unpatch after it, both outside the timer; the order
alternates every iteration to cancel drift), after a warm-up. Reported per policy:

- ``measured`` = median(patched) / median(baseline)
- ``predicted`` = FLOPs ratio from ``vlm_tokenprune.eval.flops.trace_flops`` on the real
  ``tokens_per_layer`` of the patched run (baseline: every layer at the prompt length)
- ``quotient`` = predicted / measured; 1.0 means the measured speed-up matches the theory,
  < 1 means the run is slower than the FLOPs predict
- ``overhead`` = median over patched runs of sum(trace.stages[i].seconds) (scoring +
  selection), as % of the baseline median

Usage: ``python benchmarks/prefill.py [--repeats 21] [--out benchmarks/results/prefill_cpu.json]``
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402

from vlm_tokenprune import Policy, patch  # noqa: E402
from vlm_tokenprune.eval.flops import FORMULA, policy_flops, trace_flops  # noqa: E402
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch  # noqa: E402
from vlm_tokenprune.eval.loading import cpu_name  # noqa: E402

GEOMETRY = dict(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1408, vocab=32000,
                image_size=336, patch=14, vision_hidden=64, vision_layers=1)
ROW = [34, "img", 29]  # BOS + 34 + 576 visual + 29 = 640 tokens, 64 of them text
POLICIES = [
    "fastv:layer=2,keep=0.5",
    "fastv:layer=2,keep=0.25",
    "fastv:layer=2,keep=0.11",
    "uniform:layer=2,keep=0.25",
]
CONTROL = "fastv:layer=2,keep=1"  # keeps everything: hooks and bookkeeping only, no scoring, no pruning


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed2(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of ``fn()``."""
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w0, time.thread_time() - c0


def bench_policy(model, kwargs: dict, policy: str, repeats: int, warmup: int) -> dict:
    pol = Policy.parse(policy)
    base_t: list[float] = []
    pat_t: list[float] = []
    base_c: list[float] = []
    pat_c: list[float] = []
    score_t: list[float] = []
    trace = None

    def baseline() -> tuple[float, float]:
        return timed2(lambda: model(**kwargs))

    def patched() -> tuple[float, float]:
        nonlocal trace
        handle = patch(model, pol)
        try:
            dt = timed2(lambda: model(**kwargs))
            trace = handle.last_trace()
        finally:
            handle.unpatch()
        score_t.append(sum(s.seconds for s in trace.stages))
        return dt

    with torch.no_grad():
        for _ in range(warmup):
            baseline(), patched()
        score_t.clear()
        for i in range(repeats):
            order = (baseline, patched) if i % 2 == 0 else (patched, baseline)
            for fn in order:
                gc.collect()
                wall, cpu = fn()
                (base_t if fn is baseline else pat_t).append(wall)
                (base_c if fn is baseline else pat_c).append(cpu)
    tb, tp = statistics.median(base_t), statistics.median(pat_t)
    fl = trace_flops(model.config, trace, policy=pol)
    measured = tp / tb
    paired = statistics.median(p / b for p, b in zip(pat_t, base_t))
    measured_cpu = statistics.median(pat_c) / statistics.median(base_c)
    paired_cpu = statistics.median(p / b for p, b in zip(pat_c, base_c))
    return {
        "policy": policy,
        "policy_dict": pol.to_dict(),
        "tokens_per_layer": trace.tokens_per_layer,
        "baseline_ms_median": 1e3 * tb,
        "patched_ms_median": 1e3 * tp,
        "baseline_ms": [1e3 * t for t in base_t],
        "patched_ms": [1e3 * t for t in pat_t],
        "measured_ratio": measured,
        "measured_ratio_paired_median": paired,
        "baseline_cpu_ms": [1e3 * t for t in base_c],
        "patched_cpu_ms": [1e3 * t for t in pat_c],
        "measured_ratio_cpu": measured_cpu,
        "measured_ratio_cpu_paired_median": paired_cpu,
        "predicted_ratio": fl["llm_ratio"],  # the LM prefill is what is timed (fl["ratio"] adds tower + projector)
        "predicted_total_ratio": fl["ratio"],
        "quotient": fl["llm_ratio"] / measured,
        "quotient_cpu": fl["llm_ratio"] / measured_cpu,
        "flops": fl["flops"],
        "baseline_flops": fl["baseline_flops"],
        "scoring_flops": fl["scoring_flops"],
        "scoring_selection_ms_median": 1e3 * statistics.median(score_t),
        "overhead_pct_of_baseline": 100 * statistics.median(score_t) / tb,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=25, help="timed prefills of each kind per policy (>= 15)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=GEOMETRY["layers"])
    p.add_argument("--no-control", action="store_true", help="skip the keep=1 control row")
    p.add_argument("--policies", default=None, help="';'-separated policies instead of the default list")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "prefill_cpu.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    geometry = {**GEOMETRY, "layers": args.layers}
    t_start = time.time()
    model = build_tiny_llava(attn_implementation="sdpa", seed=0, **geometry)
    batch = make_batch(model, [ROW], seed=0)
    n_visual = int((batch["input_ids"] == model.config.image_token_id).sum())
    n_text = batch["input_ids"].shape[1] - n_visual
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"])
    lm_kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     mm_encoder_outputs={"image": feats}, logits_to_keep=1)

    # vision share of a full forward: vision tower + projector (get_image_features) vs the LM prefill,
    # interleaved on the unpatched model
    vis_t, lm_t = [], []
    with torch.no_grad():
        model.model.get_image_features(pixel_values=batch["pixel_values"]), model(**lm_kwargs)
        for _ in range(9):
            vis_t.append(timed(lambda: model.model.get_image_features(pixel_values=batch["pixel_values"])))
            lm_t.append(timed(lambda: model(**lm_kwargs)))
    vis_ms, lm_ms = 1e3 * statistics.median(vis_t), 1e3 * statistics.median(lm_t)
    vision_share = vis_ms / (vis_ms + lm_ms)

    chosen = [x.strip() for x in args.policies.split(";") if x.strip()] if args.policies else POLICIES
    policies = chosen + ([] if args.no_control else [CONTROL])
    rows = [bench_policy(model, lm_kwargs, pol, args.repeats, args.warmup) for pol in policies]
    for r in rows:
        r["predicted_ratio_from_policy"] = policy_flops(model.config, r["policy"], n_text, n_visual)["llm_ratio"]
        r["control"] = r["policy"] == CONTROL

    tc = model.config.text_config
    header = (f"LM prefill, random-weight LLaVA: Llama {tc.num_hidden_layers} layers x {tc.hidden_size}, "
              f"{tc.num_attention_heads} heads, MLP {tc.intermediate_size}, vocab {tc.vocab_size}; "
              f"{n_text} text + {n_visual} visual = {n_text + n_visual} tokens, batch 1, sdpa, fp32, "
              f"{args.threads} thread(s); median of {args.repeats} interleaved runs each")
    cols = ["policy", "base ms", "patched ms", "measured", "measured CPU", "predicted", "quotient", "quotient CPU",
            "overhead %", "tokens/layer"]
    table = []
    for r in rows:
        tpl = r["tokens_per_layer"]
        table.append([
            r["policy"] + (" (control)" if r["control"] else ""),
            f"{r['baseline_ms_median']:.1f}", f"{r['patched_ms_median']:.1f}",
            f"{r['measured_ratio']:.3f}", f"{r['measured_ratio_cpu']:.3f}", f"{r['predicted_ratio']:.3f}",
            f"{r['quotient']:.3f}", f"{r['quotient_cpu']:.3f}",
            f"{r['overhead_pct_of_baseline']:.2f}", f"{tpl[0]}->{tpl[-1]}",
        ])
    widths = [max(len(str(x)) for x in [c, *(t[i] for t in table)]) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    md = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, table)]
    print(header)
    print(f"vision tower + projector share of a full baseline forward: {100 * vision_share:.1f} % "
          f"(vision {vis_ms:.1f} ms, LM prefill {lm_ms:.1f} ms, medians of 9); the table times the LM prefill only")
    print("\n".join(md))
    print()
    print("robustness check: median over iterations of patched_i / baseline_i (adjacent runs; drift cancels)")
    rob = [[r["policy"], f"{r['measured_ratio_paired_median']:.3f}", f"{r['measured_ratio_cpu_paired_median']:.3f}",
            f"{r['predicted_ratio'] / r['measured_ratio_paired_median']:.3f}",
            f"{r['predicted_ratio'] / r['measured_ratio_cpu_paired_median']:.3f}"] for r in rows]
    rcols = ["policy", "paired wall", "paired CPU", "quotient wall", "quotient CPU"]
    rw = [max(len(x) for x in [c, *(t[i] for t in rob)]) for i, c in enumerate(rcols)]
    rline = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, rw)) + " |"  # noqa: E731
    rob_md = [rline(rcols), "|" + "|".join("-" * (w + 2) for w in rw) + "|", *map(rline, rob)]
    print("\n".join(rob_md))
    print("measured = median patched / median baseline wall time; measured CPU = the same with this thread's CPU "
          "time (insensitive to preemption by other processes); predicted = FLOPs ratio of the run's tokens per layer; "
          "quotient = predicted/measured (1.0 = speed-up as the theory says); "
          "overhead = scoring+selection wall time as % of the baseline wall median")

    result = {
        "benchmark": "prefill_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "geometry": {**geometry, "n_text": n_text, "n_visual": n_visual, "batch": 1, "attn": "sdpa", "dtype": "float32"},
        "timed": "language-model prefill (mm_encoder_outputs precomputed; logits_to_keep=1)",
        "vision_share_of_full_forward": vision_share,
        "vision_ms_median": vis_ms,
        "lm_only_ms_median": lm_ms,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "formula": FORMULA,
        "definitions": {
            "measured_ratio": "median(patched) / median(baseline) prefill wall time (time.perf_counter)",
            "measured_ratio_cpu": "the same with time.thread_time() (CPU time of the one compute thread)",
            "measured_ratio_paired_median": "median over iterations of patched_i / baseline_i (wall)",
            "measured_ratio_cpu_paired_median": "median over iterations of patched_i / baseline_i (CPU time)",
            "quotient_cpu": "predicted_ratio / measured_ratio_cpu",
            "predicted_ratio": "trace_flops(...)['ratio'] on the patched run's tokens_per_layer",
            "quotient": "predicted_ratio / measured_ratio (1.0 = measured speed-up matches the theory)",
            "overhead_pct_of_baseline": "median sum(trace.stages[i].seconds) / median baseline time * 100",
        },
        "table_markdown": "\n".join(md),
        "robustness_table_markdown": "\n".join(rob_md),
        "results": rows,
        "wall_seconds": time.time() - t_start,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
