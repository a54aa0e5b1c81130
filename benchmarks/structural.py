"""CPU benchmark of the structural ops: measured prefill time ratio vs predicted FLOPs, per op.

Geometry: the CPU reference of ``prefill.py`` (random-weight LLaVA, text Llama hidden 512,
8 layers, 8 heads MHA, MLP 1408, vocab 32000; 576 visual + 64 text = 640 tokens, batch 1,
sdpa, fp32, one torch thread). The LM prefill only is timed (image features precomputed and
passed as ``mm_encoder_outputs``, ``logits_to_keep=1``); baseline and patched prefills
alternate in one loop (patch/unpatch outside the timer), medians reported.

Columns: ``measured`` = median(patched) / median(baseline); ``predicted`` = FLOPs ratio of what
this implementation computes (``eval.flops.structural_flops``; mask-only ops = 1.0; neighbour
attention counted as whole grid rows: each visual query attends text + (2*(w//2)+1) rows of 24);
``nominal`` = FLOPs ratio the op's semantics would allow; ``savings`` = real / partial /
mask-only (``structural.plan.SAVINGS``).

Usage: ``python benchmarks/structural.py [--repeats 9] [--out benchmarks/results/structural_cpu.md]``
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402

from vlm_tokenprune import Policy, patch  # noqa: E402
from vlm_tokenprune.eval.flops import structural_flops  # noqa: E402
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch  # noqa: E402

GEOMETRY = dict(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1408, vocab=32000,
                image_size=336, patch=14, vision_hidden=64, vision_layers=1)
ROW = [34, "img", 29]
HALF_HEADS = ";".join(f"{layer}/{h}" for layer in range(2, 8) for h in range(4, 8))  # 4 of 8 heads in layers 2..7
YOPO_HEADS = ";".join(f"{layer}/{h}" for layer in range(2, 8) for h in range(2, 8))  # 6 of 8 heads (YOPO kept=0.25)
POLICIES = [
    ("skip_layers:layers=3;5", "real"),
    ("skip_layers:layers=1;2;3;4;5;6;7,scope=visual", "real"),
    (f"prune_heads:heads={HALF_HEADS},scope=all", "real"),
    (f"prune_heads:heads={HALF_HEADS},scope=visual", "real"),
    ("ffn_cut:ratio=2", "real"),
    ("neighbor_attention:window=5", "real"),
    ("visual_drop:layer=4", "real"),
    ("fastv:layer=2,keep=0.25+ffn_cut:ratio=2", "real"),
    # the yopo_25 preset's parts with explicit heads (its calibration file is the shipped tiny VLM's); drop at 12/32 -> 3/8
    (f"neighbor_attention:window=5+ffn_cut:ratio=2+prune_heads:heads={YOPO_HEADS},scope=visual+visual_drop:layer=3", "real"),
]


def bench(model, kwargs, policy, n_text, n_visual, repeats, warmup):
    pol = Policy.parse(policy)
    base_t, pat_t = [], []
    plan = None
    subset = True

    def baseline():
        t0 = time.perf_counter()
        model(**kwargs)
        return time.perf_counter() - t0

    def patched():
        nonlocal plan, subset
        h = patch(model, pol)
        try:
            t0 = time.perf_counter()
            model(**kwargs)
            dt = time.perf_counter() - t0
            plan, subset = h.structural, h.structural_attention
        finally:
            h.unpatch()
        return dt

    with torch.no_grad():
        for _ in range(warmup):
            baseline(), patched()
        for i in range(repeats):
            for fn in ((baseline, patched) if i % 2 == 0 else (patched, baseline)):
                gc.collect()
                (base_t if fn is baseline else pat_t).append(fn())
    fl = structural_flops(model.config, pol, n_text, n_visual, plan=plan, subset_attention=subset)
    tb, tp = statistics.median(base_t), statistics.median(pat_t)
    return {"policy": policy, "base_ms": 1e3 * tb, "patched_ms": 1e3 * tp, "measured": tp / tb,
            "predicted": fl["ratio"], "nominal": fl["nominal_ratio"], "mask_only": fl["mask_only"], "partial": fl["partial"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "structural_cpu.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = build_tiny_llava("sdpa", seed=0, **GEOMETRY)
    batch = make_batch(model, [ROW], seed=0)
    n_visual = int((batch["input_ids"] == model.config.image_token_id).sum())
    n_text = batch["input_ids"].shape[1] - n_visual
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"])
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  mm_encoder_outputs={"image": feats}, logits_to_keep=1)
    rows = []
    for policy, kind in POLICIES:
        r = bench(model, kwargs, policy, n_text, n_visual, args.repeats, args.warmup)
        r["savings"] = kind
        rows.append(r)
        print(f"{r['measured']:.3f} measured  {r['predicted']:.3f} predicted  {r['nominal']:.3f} nominal  {kind:9s}  {policy}",
              flush=True)
    tc = model.config.text_config
    lines = [
        "# Structural ops: measured CPU prefill ratio vs predicted FLOPs",
        "",
        f"Recorded {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} with `python benchmarks/structural.py "
        f"--repeats {args.repeats}`; torch {torch.__version__}, transformers {transformers.__version__}.",
        f"LM prefill, random-weight LLaVA: Llama {tc.num_hidden_layers} layers x {tc.hidden_size}, {tc.num_attention_heads} heads, "
        f"MLP {tc.intermediate_size}, vocab {tc.vocab_size}; {n_text} text + {n_visual} visual tokens, batch 1, sdpa, fp32, "
        f"1 thread (a shared 2-core machine: ratios, not absolute times, are the result); median of {args.repeats} interleaved runs.",
        "",
        "`predicted`: FLOPs ratio of what this implementation computes (mask-only ops predict 1.0; neighbour attention "
        "counts whole grid rows per chunk); `nominal`: the ratio the op's semantics would allow with an ideal kernel; "
        "the `prune_heads` row prunes 4 of 8 heads in layers 2-7; the last row is the `yopo_25` preset's composition "
        "(6 of 8 heads pruned for visual computation, visual tokens dropped from layer 3 of 8). FLOPs count attention as "
        "full n x n (no causal halving), as `eval.flops` does.",
        "",
        "| policy | savings | base ms | patched ms | measured | predicted | nominal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pol = r["policy"].replace(HALF_HEADS, "<4 of 8 heads, layers 2-7>").replace(YOPO_HEADS, "<6 of 8 heads, layers 2-7>")
        lines.append(f"| `{pol}` | {r['savings']} | {r['base_ms']:.1f} | {r['patched_ms']:.1f} | {r['measured']:.3f} | "
                     f"{r['predicted']:.3f} | {r['nominal']:.3f} |")
    lines += [
        "",
        "Reading the table (FLOPs count attention as full n x n, while SDPA's causal kernel already skips the upper",
        "triangle, so attention-only savings are overestimated by `predicted` on this backend):",
        "",
        "- `skip_layers` (all), `prune_heads` (all: sliced q/k/v/o_proj), `ffn_cut` (two matmuls on sliced weights) and",
        "  `visual_drop` (tokens really removed) save real compute; measured follows predicted within run noise plus the",
        "  fixed cost (embedding, LM head, hooks).",
        "- `skip_layers` (visual): real; visual rows skip q_proj, attention, o_proj and the MLP (query-subset attention",
        "  backend); their k/v_proj still run, as text queries attend them.",
        "- `prune_heads` (visual, YOPO): real. Visual rows run q_proj for the kept heads only and o_proj on the kept",
        "  heads' columns only (k/v_proj too for KV groups whose heads are all pruned: every pruned head under MHA);",
        "  attention runs the kept heads over all tokens (one call, SDPA's mask-free causal path kept) and the pruned",
        "  heads as text queries x text keys (a second call). The row gathers / scatters and the per-head key copies",
        "  are memory traffic the FLOPs do not count. While decoding, pruned heads mask the prompt's visual keys",
        "  (their cache entries are zeros for fully pruned KV groups, never read); on flash-attention (2-D masks) they",
        "  attend the gathered text keys instead. Before this path the op was mask-only (measured 1.029 here, a per-head",
        "  4-D mask taking SDPA off its mask-free causal path).",
        "- The last row composes the yopo_25 preset's four parts: measured 0.36 against 0.27 predicted.",
        "- `neighbor_attention`: real path (visual queries in chunks of one grid row with only their allowed keys), but",
        "  at 640 tokens on CPU attention is a small share of the layer and the masked chunk calls cost about what the",
        "  causal kernel saves: break-even to slower here. It can pay off only where attention dominates (long visual",
        "  sequences).",
    ]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
