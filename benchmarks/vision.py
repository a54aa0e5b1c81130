"""CPU benchmark of vision-site stages: measured ViT + LLM time of a patched LLaVA vs the FLOPs theory.

Geometry (random weights, built offline): CLIP tower 336 px / patch 14 (576 patches + CLS = 577
tokens), 12 layers of width 256 (4 heads, MLP 512), ``vision_feature_layer=-2`` (feature layer 10), q/k
weights x 8 so the CLS attention is peaked as in a trained CLIP (FlowCut's entropy-adaptive count is ~0 on a
near-uniform random map);
text Llama 8 layers x 512 (8 heads, MLP 1408, vocab 32000); prompt = BOS + 34 text + 576 visual +
29 text = 640 tokens, batch 1, sdpa, fp32, one torch thread.

What is timed: a full forward from pixels (``model(pixel_values=..., input_ids=..., logits_to_keep=1)``:
vision tower + projector + LM prefill, the patch's hooks inside the timer), and the vision part alone
(``get_image_features``, patched or not). Baseline and patched calls are interleaved in one loop (patch
before, unpatch after a patched call, both outside the timer; the order alternates), after a warm-up.

Predicted FLOPs, from the real token counts of the patched run: ViT layer with n tokens
``2 * (4 n d^2 + 2 n^2 d + 2 n d m)`` (d = width, m = MLP width; ``trace.stages[0].vision_tokens_per_layer``),
plus the LM prefill (``vlm_tokenprune.eval.flops.prefill_flops`` on ``trace.tokens_per_layer``). Scoring
and matching inside the tower (FlowCut's CLS rows, MCTF's extra q/k projections and N x N map) are not in
the prediction: they show up in ``quotient`` (predicted / measured; < 1 = slower than the FLOPs say).
``+ scoring`` adds MCTF's one-step-ahead map per merging layer with n input tokens (q/k projections
``4 n d^2``, ``q k^T`` ``2 n^2 d``, the A x B similarity ``n^2 d / 2``); FlowCut's CLS-row scores are ~0.

Usage: ``python benchmarks/vision.py [--repeats 9] [--out benchmarks/results/vision_cpu.md]``
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_tokenprune import Policy, patch  # noqa: E402
from vlm_tokenprune.eval.flops import TextGeometry, prefill_flops  # noqa: E402
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch  # noqa: E402

GEOMETRY = dict(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1408, vocab=32000,
                image_size=336, patch=14, vision_hidden=256, vision_layers=12)
ROW = [34, "img", 29]
QK_SCALE = 8.0
POLICIES = ["flowcut_vit_192", "flowcut_vit", "flowcut_vit_64", "mctf", "mctf:r=16,keep=0.01", "flowcut_vit:keep=1.0"]


def vit_flops(d: int, m: int, tokens: list[int]) -> float:
    return float(sum(2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m) for n in tokens))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(model, full: dict, vis: dict, policy: str, repeats: int, warmup: int) -> dict:
    pol = Policy.parse(policy)
    vc = model.config.vision_config
    times = {k: [] for k in ("base", "pat", "base_vit", "pat_vit")}
    trace = None

    def run(patched: bool, what: str) -> float:
        nonlocal trace
        kwargs = full if what == "full" else vis
        fn = model if what == "full" else model.model.get_image_features
        if not patched:
            return timed(lambda: fn(**kwargs))
        h = patch(model, pol)
        try:
            dt = timed(lambda: fn(**kwargs))
            if what == "full":
                trace = h.last_trace()
        finally:
            h.unpatch()
        return dt

    with torch.no_grad():
        for _ in range(warmup):
            run(False, "full"), run(True, "full")
        for i in range(repeats):
            order = [(False, "full"), (True, "full"), (False, "vit"), (True, "vit")]
            for patched, what in (order if i % 2 == 0 else order[::-1]):
                gc.collect()
                key = ("pat" if patched else "base") + ("" if what == "full" else "_vit")
                times[key].append(run(patched, what))
    med = {k: statistics.median(v) for k, v in times.items()}
    st = trace.stages[0]
    g = TextGeometry.of(model.config.text_config)
    n_layers = vc.num_hidden_layers
    vit_base = vit_flops(vc.hidden_size, vc.intermediate_size, [577] * n_layers)
    vit_pat = vit_flops(vc.hidden_size, vc.intermediate_size, st.vision_tokens_per_layer)
    lm_base = prefill_flops(g, [st.tokens_before] * g.num_hidden_layers, 1)
    lm_pat = prefill_flops(g, trace.tokens_per_layer, 1)
    seen, d = st.vision_tokens_per_layer, vc.hidden_size
    merges = [seen[j - 1] for j in range(1, len(seen)) if seen[j] < seen[j - 1]] if st.criterion == "mctf" else []
    scoring = float(sum(4 * n * d * d + 2.5 * n * n * d for n in merges))
    return {
        "policy": policy,
        "vit_tokens": st.vision_tokens_per_layer,
        "lm_tokens": trace.tokens_per_layer[0],
        "lm_base_tokens": st.tokens_before,
        "base_ms": 1e3 * med["base"], "patched_ms": 1e3 * med["pat"],
        "measured": med["pat"] / med["base"],
        "predicted": (vit_pat + lm_pat) / (vit_base + lm_base),
        "predicted_scoring": (vit_pat + lm_pat + scoring) / (vit_base + lm_base),
        "vit_measured": med["pat_vit"] / med["base_vit"],
        "vit_predicted": vit_pat / vit_base,
        "vit_predicted_scoring": (vit_pat + scoring) / vit_base,
        "scoring_ms": 1e3 * st.seconds,
    }


def _runs(tokens: list[int]) -> str:
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j + 1 < len(tokens) and tokens[j + 1] == tokens[i]:
            j += 1
        out.append(f"{tokens[i]}" + (f"x{j - i + 1}" if j > i else ""))
        i = j + 1
    return " ".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vision_cpu.md"))
    p.add_argument("--policies", default=None, help="';'-separated policies instead of the default list")
    args = p.parse_args(argv)
    policies = [x.strip() for x in args.policies.split(";") if x.strip()] if args.policies else POLICIES
    torch.set_num_threads(1)
    t0 = time.time()
    model = build_tiny_llava("sdpa", seed=0, **GEOMETRY)
    with torch.no_grad():  # a peaked CLS attention, as in a trained CLIP
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_SCALE)
    batch = make_batch(model, [ROW], seed=0)
    full = dict(batch, logits_to_keep=1)
    vis = dict(pixel_values=batch["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
               vision_feature_select_strategy="default")
    rows = [bench(model, full, vis, pol, args.repeats, args.warmup) for pol in policies]
    vc, tc = model.config.vision_config, model.config.text_config
    lines = [
        "# Vision-site stages on CPU: measured vs predicted (ViT + LLM)",
        "",
        f"`python benchmarks/vision.py --repeats {args.repeats}"
        + (f" --policies '{args.policies}'" if args.policies else "") + f"` ({time.time() - t0:.0f} s; {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, 1 thread, shared machine).",
        "",
        f"Random-weight LLaVA: CLIP {vc.num_hidden_layers} layers x {vc.hidden_size} (MLP {vc.intermediate_size}), "
        f"336 px / 14 = 576 patches + CLS, feature layer {vc.num_hidden_layers - 2}; Llama {tc.num_hidden_layers} x "
        f"{tc.hidden_size} (MLP {tc.intermediate_size}); CLIP q/k weights x {QK_SCALE:g} (peaked CLS attention); prompt "
        f"{rows[0]['lm_base_tokens']} tokens, batch 1, sdpa, fp32. Full = vision tower + projector + LM prefill (`logits_to_keep=1`); ViT = "
        f"`get_image_features` alone. Median of {args.repeats} interleaved runs each. measured = patched / baseline "
        "time; predicted = FLOPs ratio from the real per-layer token counts (ViT `2(4nd^2+2n^2d+2ndm)` per layer + "
        "exact LM prefill); `+ scoring` adds MCTF's one-step-ahead attention map per merging layer "
        "(`4nd^2 + 2.5n^2d`); quotient = predicted / measured.",
        "",
        "| policy | ViT tokens per layer | LM tokens | base ms | patched ms | measured | predicted | + scoring | "
        "quotient | ViT measured | ViT predicted | ViT + scoring | scoring ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['policy']}` | {_runs(r['vit_tokens'])} | {r['lm_tokens']} | {r['base_ms']:.0f} | "
                     f"{r['patched_ms']:.0f} | {r['measured']:.3f} | {r['predicted']:.3f} | "
                     f"{r['predicted_scoring']:.3f} | {r['predicted_scoring'] / r['measured']:.2f} | "
                     f"{r['vit_measured']:.3f} | {r['vit_predicted']:.3f} | {r['vit_predicted_scoring']:.3f} | "
                     f"{r['scoring_ms']:.1f} |")
    lines += [
        "",
        "quotient = (predicted + scoring) / measured. The last row keeps everything (hooks only). FlowCut's scores reuse",
        "the layer's own q/k/v (one CLS row), so its ViT saving follows the token counts; MCTF's \"precise\"",
        "one-step-ahead mode computes each merging layer's full attention map once more (q/k projections, an N x N",
        "softmax in fp32, the A x B similarity), about a third of a layer at full length, before the layer runs on the",
        "fused tokens. The machine is shared with other jobs: single runs vary by +-30 %, ratios are interleaved medians.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
