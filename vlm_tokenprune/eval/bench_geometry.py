"""``bench`` on profile's random-weight geometries (``llava-1.5-7b``, ``qwen2-vl-7b``, ...): tokens per layer,
kept visual tokens, theoretical FLOPs and measured prefill ratio of every policy x budget. No accuracy: the
weights are random, so answers mean nothing; accuracy needs a trained model (``bench --model tiny`` or a
checkpoint folder in the tiny VLM's format, :func:`vlm_tokenprune.eval.bench.run_bench`).

Inputs: profile's built prompt (``loading.random_inputs``: ``n_text`` text tokens around one image, random
pixels), repeated ``batch_size`` rows. Timing: the LM prefill interleaved with the baseline, as ``bench``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import IncompatiblePolicyError, InputError, PolicyError
from . import profiler

NO_ACCURACY = ("n/a: random weights (a built geometry); accuracy needs a trained model: --model tiny or a "
               "checkpoint folder in the tiny VLM's format")


def run_bench_geometry(spec: str, policies: Sequence[Any], budgets: Sequence[float] | None = None, *,
                       layers: int | None = None, vision_layers: int | None = None, batch_size: int = 8,
                       n_text: int = 64, timing_iters: int = 5, backend: str = "auto", dtype=None,
                       attn_implementation: str = "sdpa", device=None, seed: int = 0,
                       out: "str | os.PathLike | None" = None) -> dict:
    """Tokens, FLOPs and prefill timing of the baseline and every policy x budget on the random-weight
    geometry ``spec`` (``profiler.KNOWN_GEOMETRIES``); ``accuracy`` is None in every run (see the module)."""
    from .. import patch
    from .bench import with_budget
    from .flops import trace_flops

    if spec not in profiler.KNOWN_GEOMETRIES:
        raise InputError("--model", f"{spec!r} is not a known geometry; allowed: {', '.join(profiler.KNOWN_GEOMETRIES)}")
    if batch_size < 1 or timing_iters < 0:
        raise InputError("--batch-size/--timing-iters", f"need batch size >= 1, timing iters >= 0; got {batch_size}, {timing_iters}")
    for b in budgets or []:
        if not (isinstance(b, (int, float)) and 0 < b <= 1):
            raise InputError("--budgets", f"{b!r}; each budget is a keep fraction in (0, 1]")
    parsed = profiler.parse_all(policies, "--policy")  # every bad policy reported at once, before the model is built
    model, inputs, desc = profiler.load_model(spec, layers=layers, vision_layers=vision_layers, dtype=dtype,
                                              attn_implementation=attn_implementation, device=profiler.resolve_device(device),
                                              seed=seed, batch=batch_size, n_text=n_text)
    runs: list[dict] = [{"label": "baseline", "policy_spec": None, "budget": None, "policy": None}]
    skipped: list[dict] = []
    for spec_i, pol_i in zip(policies, parsed):
        label = spec_i if isinstance(spec_i, str) else pol_i.to_string()
        for b in (budgets if budgets else [None]):
            try:
                pol = with_budget(spec_i, b) if b is not None else pol_i
                h = patch(model, pol, backend=backend)
                pol = h.policy
                h.unpatch()
            except PolicyError as e:
                skipped.append({"label": label, "budget": b, "error": str(e)})
                print(f"skipped {label}{f' keep={b}' if b is not None else ''}: {e}", file=sys.stderr)
                continue
            runs.append({"label": label, "policy_spec": label, "budget": b, "policy": pol})
    if len(runs) == 1:
        raise IncompatiblePolicyError("--policy", "no policy fits this model: " + "; ".join(s["error"] for s in skipped))

    prefill = profiler.LMPrefillCall(model, inputs, profiler.encode_images(model, inputs))
    L = model.config.text_config.num_hidden_layers
    results = []
    for run in runs:
        pol = run["policy"]
        entry = {"label": run["label"], "policy_spec": run["policy_spec"], "budget": run["budget"],
                 "policy": pol.to_dict() if pol is not None else None,
                 "policy_string": pol.to_string() if pol is not None else None, "accuracy": None,
                 "kept_visual_per_stage": [], "flops": {"ratio": 1.0, "llm_ratio": 1.0},
                 "prefill": {"measured_ratio": 1.0 if pol is None else None, "iters": 0}}
        if pol is None:
            entry["tokens_per_layer"] = [int(inputs["input_ids"].shape[1])] * L
        else:
            h = patch(model, pol, backend=backend)
            try:
                with torch.no_grad():
                    model(**inputs, logits_to_keep=1)
                tr = h.last_trace()
            finally:
                h.unpatch()
            entry["tokens_per_layer"] = list(tr.tokens_per_layer)
            entry["kept_visual_per_stage"] = [statistics.fmean(s.visual_after) for s in tr.stages]
            if pol.structural_stages:  # layer skips / head or FFN cuts change the count: not modelled here
                entry["flops"] = {"ratio": None, "llm_ratio": None,
                                  "note": "structural stages: see `vlm-tokenprune explain` for their FLOPs"}
            else:
                fl = trace_flops(model.config, tr, policy=pol)
                entry["flops"] = {"ratio": fl["ratio"], "llm_ratio": fl.get("llm_ratio", fl["ratio"])}
            if timing_iters > 0:
                t = profiler.interleaved(model, pol, {"prefill": prefill}, iters=timing_iters, warmup=1,
                                         device=model.device, backend=backend)
                tb, tp = statistics.median(t["prefill"]["baseline"]), statistics.median(t["prefill"]["patched"])
                entry["prefill"] = {"measured_ratio": tp / tb, "baseline_ms": 1e3 * tb, "patched_ms": 1e3 * tp,
                                    "iters": timing_iters}
        results.append(entry)

    cfg = model.config
    result = {
        "environment": profiler.environment(model.device),
        "model": {"spec": spec, "description": desc, "weights": "random", "model_type": cfg.model_type,
                  "text_layers": L, "dtype": str(model.dtype).replace("torch.", "")},
        "accuracy": NO_ACCURACY,
        "inputs": {"batch": batch_size, "n_text": n_text, "sequence": int(inputs["input_ids"].shape[1])},
        "budgets": list(budgets) if budgets else None,
        "timing": {"what": "LM prefill of the built batch (image features precomputed), logits_to_keep=1",
                   "iters": timing_iters, "protocol": "interleaved with the baseline, order alternating, medians"},
        "runs": results,
        "skipped": skipped,
    }
    if out is not None:
        write_outputs(result, out)
    return result


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown_table(result: dict) -> str:
    """One line per run: kept visual tokens per stage, tokens per layer, FLOPs and prefill ratios; accuracy n/a."""
    head = ["policy", "keep", "kept visual per stage", "tokens per layer", "FLOPs ratio", "LLM FLOPs ratio",
            "prefill ratio", "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        lines.append("| " + " | ".join([
            f"`{r['label']}`" if r["policy"] is not None else "baseline",
            "-" if r["budget"] is None else f"{r['budget']:g}",
            "/".join(f"{k:.0f}" for k in r["kept_visual_per_stage"]) or "-",
            "/".join(f"{t:.0f}" for t in r["tokens_per_layer"]),
            _r(r["flops"]["ratio"]), _r(r["flops"]["llm_ratio"]), _r(r["prefill"]["measured_ratio"]), "n/a",
        ]) + " |")
    lines.append(f"\naccuracy: {result['accuracy']}")
    for s in result.get("skipped", []):
        keep = "" if s.get("budget") is None else f" keep={s['budget']:g}"
        lines.append(f"\nskipped `{s['label']}`{keep}: {s['error']}")
    return "\n".join(lines)


def write_outputs(result: dict, out: "str | os.PathLike", stem: str = "bench") -> dict[str, str]:
    """``<out>/<stem>.json`` and ``.md``; returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{stem}.json"), "md": str(out / f"{stem}.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    m, env = result["model"], result["environment"]
    md = [f"# Offline benchmark: {m['spec']} ({m['description']}; {m['text_layers']} text layers, {m['dtype']})", "",
          f"vlm_tokenprune {env['version']}, torch {env['torch']}, transformers {env['transformers']}, {env['device']}, "
          f"{env['date']}. Built prompt: {result['inputs']}.", "", markdown_table(result)]
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return paths


# -- the CLI's side (``vlm-tokenprune bench --model GEOMETRY``) -----------------------------------------------
def add_cli_args(parser) -> None:
    """bench's ``--model`` (tiny, a checkpoint folder or a known geometry) and the geometry-only flags."""
    parser.add_argument("--model", default=None, metavar="{tiny," + ",".join(profiler.KNOWN_GEOMETRIES) + "}|PATH",
                        help="tiny (default: the shipped trained VLM) or a checkpoint folder in its format: accuracy, "
                             "tokens, FLOPs, timing; or one of profile's known geometries, built with random weights: "
                             "tokens, FLOPs, timing (accuracy n/a)")
    parser.add_argument("--layers", type=int, default=None, help="known geometry: keep only the first N decoder layers (to fit a CPU)")
    parser.add_argument("--vision-layers", type=int, default=None, help="known geometry: vision tower depth")
    parser.add_argument("--n-text", type=int, default=64, help="known geometry: text tokens of the built prompt (default 64)")


def check_cli_args(args) -> None:
    """bench's model flags, before any model is built: exit 2 naming the flag (``InputError``)."""
    geo = profiler.KNOWN_GEOMETRIES.get(args.model)
    if args.model not in (None, "tiny") and geo is None and not os.path.isdir(args.model):
        raise InputError("--model", f"{args.model!r} is neither tiny, one of profile's known geometries "
                         f"({', '.join(profiler.KNOWN_GEOMETRIES)}) nor a checkpoint folder")
    for flag, value in (("--layers", args.layers), ("--vision-layers", args.vision_layers)):
        if value is not None and geo is None:
            raise InputError(flag, f"applies to profile's known geometries only ({', '.join(profiler.KNOWN_GEOMETRIES)}), "
                             f"not to {args.model or 'tiny'!r}")
    if geo is None:
        return
    vision_depth = geo["vision"].get("depth") or geo["vision"].get("num_hidden_layers")
    for flag, value, top in (("--layers", args.layers, geo["text"]["num_hidden_layers"]),
                             ("--vision-layers", args.vision_layers, vision_depth)):
        if value is not None and not 1 <= value <= top:
            raise InputError(flag, f"{value}; allowed: 1..{top} for {args.model}")
    if args.n_text < 2:
        raise InputError("--n-text", f"{args.n_text}; need at least 2 (BOS and one question token)")


def cmd_bench_geometry(args, budgets: Sequence[float] | None) -> int:
    """``vlm-tokenprune bench --model GEOMETRY``: run, write OUT/bench.json and .md, print the table."""
    result = run_bench_geometry(args.model, args.policy, budgets, layers=args.layers, vision_layers=args.vision_layers,
                                batch_size=args.batch_size, n_text=args.n_text, timing_iters=args.timing_iters,
                                backend=args.backend)
    paths = write_outputs(result, args.out)
    print(markdown_table(result))
    print()
    print("wrote " + ", ".join(paths.values()))
    return 0
