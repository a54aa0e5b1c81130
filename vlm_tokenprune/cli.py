"""``vlm-tokenprune``: list methods, explain a policy's cost, run an offline demo.

    vlm-tokenprune methods
    vlm-tokenprune explain "fastv:layer=2,keep=0.5" [--model-config llava-1.5-7b | path/to/config.json]
    vlm-tokenprune demo [--policy "fastv:layer=2,keep=0.25"] [--seed 0]

Exit status: 0 on success, 2 for a bad policy, option or config (the message names the field).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

from .errors import VTPError

PROG = "vlm-tokenprune"

# The tiny random-weight LLaVA that ``demo`` builds (and ``explain --model-config tiny`` describes):
# 6 Llama layers of width 128, a 1-layer CLIP tower, 96x96 images in 8x8 patches -> 144 visual tokens.
DEMO_MODEL = dict(layers=6, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=256,
                  image_size=96, patch=8, vision_hidden=32, vision_layers=1)
DEMO_ROW = [16, "img", 24]  # 1 BOS + 16 text + 144 visual + 24 text = 185 tokens

_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000)
# name -> (text-config numbers, visual tokens per prompt, description)
KNOWN_MODELS: dict[str, tuple[dict | None, int, str]] = {
    "llava-1.5-7b": (_VICUNA_7B, 576, "LLaVA-1.5-7B: Vicuna-7B LLM, CLIP ViT-L/14-336 -> 24x24 = 576 visual tokens"),
    "llava-next-7b": (_VICUNA_7B, 2880, "LLaVA-NeXT-7B: Vicuna-7B LLM, anyres up to 5 x 576 = 2880 visual tokens"),
    "tiny": (None, 144, "the tiny random-weight LLaVA of `vlm-tokenprune demo` (144 visual tokens)"),
}


# -- output helpers ------------------------------------------------------------------------------
def _table(rows: list[list[str]], header: list[str], notes: list[str] | None = None) -> str:
    """Left-aligned columns; ``notes[i]`` (if any) is printed on its own line under row i, indented."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt(header), fmt(["-" * w for w in widths])]
    for i, r in enumerate(rows):
        lines.append(fmt(r))
        if notes and notes[i]:
            lines.append(" " * (widths[0] + 4) + notes[i])
    return "\n".join(lines)


def _runs(tokens: list[int]) -> list[str]:
    """``[640, 640, 352, ...]`` -> ``["layers  0-1 : 640", ...]`` (consecutive equal lengths merged)."""
    out, start = [], 0
    width = len(str(len(tokens) - 1))
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or tokens[i] != tokens[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            out.append(f"layer{'s' if i - 1 > start else ' '} {span.ljust(2 * width + 1)}: {tokens[start]}")
            start = i
    return out


def _tflops(x: float) -> str:
    return f"{x / 1e12:.4g} TFLOPs" if x >= 1e11 else f"{x / 1e9:.4g} GFLOPs"


# -- methods -------------------------------------------------------------------------------------
def _compact_stage(st: Any) -> str:
    """``criterion:layer=L,keep=K`` (criterion parameters are listed in the criteria table)."""
    b = f"keep={st.budget.keep}" if st.budget.keep is not None else f"tokens={st.budget.tokens}"
    b += "" if st.budget.of == "original" else f",of={st.budget.of}"
    return f"{st.criterion}:layer={st.layer},{b}"


def cmd_methods(args: argparse.Namespace) -> int:
    from . import CRITERIA, PRESETS, Policy

    rows, notes = [], []
    for name, preset in PRESETS.items():
        try:
            parts = [_compact_stage(s) for s in Policy.parse(name).stages]
        except VTPError:
            parts = [json.dumps(dict(s), sort_keys=True) for s in preset.stages]
        stages = " + ".join(parts if len(parts) <= 3 else [parts[0], "...", parts[-1]])
        stages += f" ({len(parts)} stages)" if len(parts) > 3 else ""
        rows.append([name, stages, preset.arxiv or "-"])
        notes.append(preset.description)
    print("Presets (the first word of a policy string; keys override them: layer, keep, tokens, criterion params)")
    print(_table(rows, ["name", "stages", "arXiv"], notes))
    print()
    rows, notes = [], []
    for name, crit in CRITERIA.items():
        params = ", ".join(f"{k}={p.default!r}" for k, p in crit.params.items()) or "-"
        rows.append([name, getattr(crit, "arxiv", None) or "-", params])
        notes.append(getattr(crit, "paper", ""))
    print("Criteria (how a stage scores visual tokens; higher = keep)")
    print(_table(rows, ["name", "arXiv", "params (defaults)"], notes))
    return 0


# -- explain -------------------------------------------------------------------------------------
def _n_visual_from_config(cfg: Any) -> int | None:
    """Visual tokens per prompt from a LLaVA / LLaVA-NeXT config (NeXT: the largest anyres grid, before unpadding)."""
    vc = getattr(cfg, "vision_config", None)
    if vc is None or not getattr(vc, "image_size", None) or not getattr(vc, "patch_size", None):
        return None
    side = vc.image_size // vc.patch_size
    per_tile = side * side + (1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0)
    if getattr(cfg, "model_type", None) == "llava_next":
        pins = getattr(cfg, "image_grid_pinpoints", None) or [[vc.image_size, vc.image_size]]
        tiles = max((h // vc.image_size) * (w // vc.image_size) for h, w in pins)
        return per_tile * (1 + tiles)
    return per_tile


def _load_model_config(spec: str) -> tuple[Any, int | None, str]:
    """``spec``: a known name or a path to a config.json -> (config or text numbers, visual tokens, description)."""
    from .errors import InputError

    if spec in KNOWN_MODELS:
        numbers, n_visual, desc = KNOWN_MODELS[spec]
        if numbers is None:  # tiny: build the config (no weights)
            from .eval.tiny_models import tiny_llava_config

            numbers = tiny_llava_config(**DEMO_MODEL)
        return numbers, n_visual, desc
    if not os.path.isfile(spec):
        raise InputError("--model-config", f"{spec!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor a config.json file")
    try:
        with open(spec, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError("--model-config", f"cannot read {spec}: {e}") from None
    if not isinstance(data, dict):
        raise InputError("--model-config", f"{spec} does not hold a JSON object")
    cfg: Any = data
    try:  # fill the defaults a config.json leaves out (llava-hf text_configs are sparse)
        from transformers.models.auto import CONFIG_MAPPING

        if data.get("model_type") in CONFIG_MAPPING:
            cfg = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except Exception:  # noqa: BLE001  (fall back to the raw numbers)
        cfg = data
    n_visual = _n_visual_from_config(cfg) if not isinstance(cfg, dict) else None
    return cfg, n_visual, f"{spec} (model_type {data.get('model_type', '?')})"


def cmd_explain(args: argparse.Namespace) -> int:
    from . import CRITERIA, Policy
    from .errors import InputError
    from .eval.flops import FORMULA, TextGeometry, policy_flops

    pol = Policy.parse(args.policy)
    cfg, n_visual, desc = _load_model_config(args.model_config)
    if args.n_visual is not None:
        n_visual = args.n_visual
    if n_visual is None:
        raise InputError("--n-visual", f"cannot be derived from {args.model_config}; pass it")
    if n_visual < 1 or args.n_text < 0:
        raise InputError("--n-visual/--n-text", f"need n_visual >= 1 and n_text >= 0, got {n_visual}, {args.n_text}")
    g = TextGeometry.of(cfg)
    res = policy_flops(g, pol, args.n_text, n_visual)
    if args.json:
        print(json.dumps({"policy": pol.to_dict(), "model": args.model_config, "n_text": args.n_text,
                          "n_visual": n_visual, "formula": FORMULA, **res}, indent=2))
        return 0
    print(f"policy: {pol.to_string()}")
    for i, st in enumerate(pol.stages):
        crit = CRITERIA.get(st.criterion)
        ref = f"  [{crit.paper}{', arXiv ' + crit.arxiv if crit.arxiv else ''}]" if crit.paper else ""
        print(f"  stage {i}: {st.describe()}  (site {st.site}, op {st.op}; scores on layer {st.layer - 1}'s input, "
              f"drops before layer {st.layer}){ref}")
    print(f"model: {args.model_config}: {desc}")
    print(f"  text geometry: d={g.hidden_size}, m={g.intermediate_size}, {g.num_hidden_layers} layers, "
          f"{g.num_attention_heads} heads / {g.num_key_value_heads} kv heads x {g.head_dim}, vocab {g.vocab_size}")
    print(f"prompt: {args.n_text} text + {n_visual} visual = {args.n_text + n_visual} tokens (one row)")
    print("predicted tokens per decoder layer:")
    for line in _runs(res["tokens_per_layer"]):
        print(f"  {line}")
    if res["lower_bound_stages"]:
        which = ", ".join(str(i) for i in res["lower_bound_stages"])
        print(f"  (stage(s) {which}: the criterion may keep more than its budget, e.g. a grid on top of the top-k; "
              "the counts from there on are lower bounds and the FLOPs below are optimistic; "
              "handle.last_trace() gives the real counts)")
    print("theoretical prefill FLOPs (exact Llama count, vlm_tokenprune.eval.flops):")
    print(f"  formula  : {FORMULA}")
    print(f"  baseline : {_tflops(res['baseline_flops'])}")
    print(f"  policy   : {_tflops(res['flops'])}")
    print(f"  ratio    : {res['ratio']:.4f} of baseline ({100 * res['ratio']:.1f} %, {1 / res['ratio']:.2f}x fewer)")
    sc = res["scoring_flops"]
    if sc is None:
        print("  scoring  : unknown (no estimate for a criterion); not included above")
    else:
        print(f"  scoring  : {_tflops(sc)} ({100 * sc / res['baseline_flops']:.2f} % of baseline), reported separately, not included above")
    return 0


# -- demo ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import Policy, patch
    from .eval.flops import policy_flops, trace_flops
    from .eval.tiny_models import build_tiny_llava, make_batch

    torch.set_num_threads(args.threads)
    pol = Policy.parse(args.policy)
    model = build_tiny_llava(seed=args.seed, **DEMO_MODEL)
    batch = make_batch(model, [DEMO_ROW], seed=args.seed)
    n_visual = int((batch["input_ids"] == model.config.image_token_id).sum())
    n_text = batch["input_ids"].shape[1] - n_visual
    patch(model, pol).unpatch()  # validate against the model before timing anything

    # baseline tokens per layer: count with plain pre-hooks on one untimed forward
    seen: list[int] = []
    layers = model.model.language_model.layers
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for layer in layers]
    with torch.no_grad():
        model(**batch, logits_to_keep=1)
    for h in hooks:
        h.remove()

    def run(patched: bool) -> tuple[float, Any]:
        handle = patch(model, pol) if patched else None
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                model(**batch, logits_to_keep=1)
                dt = time.perf_counter() - t0
            return dt, handle.last_trace() if handle else None
        finally:
            if handle is not None:
                handle.unpatch()

    base_t, pat_t, trace = [], [], None
    run(False), run(True)  # warm-up
    for i in range(args.repeats):  # interleaved, order alternating to cancel drift
        for patched in ((False, True) if i % 2 == 0 else (True, False)):
            dt, tr = run(patched)
            (pat_t if patched else base_t).append(dt)
            trace = tr or trace
    with torch.no_grad():
        gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
        L = batch["input_ids"].shape[1]
        ids_base = model.generate(**batch, **gen)[0, L:].tolist()
        with patch(model, pol):
            ids_pat = model.generate(**batch, **gen)[0, L:].tolist()

    measured = trace_flops(model.config, trace, policy=pol)
    predicted = policy_flops(model.config, pol, n_text, n_visual)
    tb, tp = statistics.median(base_t), statistics.median(pat_t)
    scoring_s = sum(s.seconds for s in trace.stages)
    tc = model.config.text_config
    print(f"demo model: tiny random-weight LLaVA (seed {args.seed}): {tc.num_hidden_layers} Llama layers, hidden "
          f"{tc.hidden_size}, {tc.num_attention_heads} heads / {tc.num_key_value_heads} kv, MLP {tc.intermediate_size}; "
          f"CLIP tower {DEMO_MODEL['image_size']}px / patch {DEMO_MODEL['patch']}")
    print(f"prompt: {n_text} text + {n_visual} visual = {n_text + n_visual} tokens, batch 1, "
          f"attention {tc._attn_implementation}, {args.threads} torch thread(s)")
    print(f"policy: {pol.to_string()}")
    print()
    print(_table([[str(j), str(a), str(b)] for j, (a, b) in enumerate(zip(seen, trace.tokens_per_layer))],
                 ["layer", "baseline tokens", "patched tokens"]))
    print()
    agree = "matches" if measured["flops"] == predicted["flops"] else f"differs from the prediction {predicted['ratio']:.3f}"
    print(f"theoretical prefill FLOPs ratio (this run's tokens per layer): {measured['ratio']:.3f} ({agree})")
    print(f"measured prefill latency (whole forward, vision tower included): baseline {1e3 * tb:.2f} ms, patched {1e3 * tp:.2f} ms (median of {args.repeats}, "
          f"interleaved); ratio {tp / tb:.3f}")
    print(f"scoring + selection: {1e3 * scoring_s:.2f} ms ({100 * scoring_s / tb:.1f} % of the baseline prefill)")
    print("  (a model this small is dominated by per-call overhead; see benchmarks/prefill.py for a larger geometry)")
    print()
    print(f"greedy ids, baseline: {ids_base}")
    print(f"greedy ids, patched : {ids_pat}")
    print("note: the weights are random, so these ids are not text and their agreement means little; "
          "a trained tiny model comes later.")
    return 0


# -- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog=PROG, description="Inference-time visual-token pruning for Hugging Face VLMs.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("methods", help="list the registered presets and criteria")
    m.set_defaults(func=cmd_methods)

    e = sub.add_parser("explain", help="parse a policy and predict its tokens per layer and prefill FLOPs")
    e.add_argument("policy", help='policy string, e.g. "fastv:layer=2,keep=0.5"')
    e.add_argument("--model-config", default="llava-1.5-7b", metavar="{tiny,llava-1.5-7b,llava-next-7b}|PATH",
                   help="a known geometry or a path to a Hugging Face config.json (default: llava-1.5-7b)")
    e.add_argument("--n-text", type=int, default=64, help="text tokens in the prompt, system prompt included (default 64)")
    e.add_argument("--n-visual", type=int, default=None, help="visual tokens (default: from the model)")
    e.add_argument("--json", action="store_true", help="print the prediction as JSON")
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("demo", help="run a tiny random-weight LLaVA with and without a policy, side by side (offline)")
    d.add_argument("--policy", default="fastv:layer=2,keep=0.25")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--repeats", type=int, default=7, help="timed prefills of each kind (default 7)")
    d.add_argument("--new-tokens", type=int, default=8, help="greedy tokens to generate (default 8)")
    d.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse usage errors: 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except VTPError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
