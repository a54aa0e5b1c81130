"""Prefill profiler: measured latency, time to first token and peak memory of patched vs unpatched prefills.

    from vlm_tokenprune.eval import profiler
    report = profiler.profile("llava-1.5-7b", ["fastv:layer=2,keep=0.25"], layers=2, vision_layers=1)
    profiler.print_report(report)

Models (``load_model``): the shipped trained tiny LLaVA (``"tiny"``), a known geometry built with
random weights from its config (``KNOWN_GEOMETRIES``: no download; ``layers`` / ``vision_layers``
shrink it to fit a CPU), or a local Hugging Face checkpoint directory (``AutoModelForImageTextToText``).
Inputs are one prompt row repeated ``batch`` times: ``n_text`` random text tokens around the image
placeholders (random pixels) for built or local models; synthetic test-split questions for ``"tiny"``.

Protocol (per policy, on one model): warm-up, then ``iters`` iterations, each running one baseline and
one patched call, order alternating every iteration (drift cancels); ``patch()`` / ``unpatch()`` stay
outside the timer; one ``gc.collect()`` before the loop and the cyclic collector off during it (as
``timeit`` does). Three things are timed, each interleaved that way:

- ``prefill``: the language-model prefill. Image features are computed once and passed as
  ``mm_encoder_outputs`` (what ``generate()`` does), so a call runs the embedding, the feature scatter,
  every decoder layer and the LM head on the last token (``logits_to_keep=1``). The patch's own work
  (layout, scoring, selection, gathers) is inside the timer. FLOPs refer to this call.
- ``ttft``: time to first token, ``generate(max_new_tokens=1)`` from pixels (vision tower included).
- ``forward`` (``parts=True``): one forward from pixels, split by forward hooks (``PartsCall``) into
  ``vision`` (vision tower + projector), ``llm`` (the language model, a pre-LLM reduction included)
  and ``other`` (embedding, feature scatter, patch bookkeeping, LM head), each with its ratio vs the
  baseline: vision-site methods shrink ``vision``, LLM-site ones ``llm``.

Timers: CUDA events (after a synchronize) on GPU, ``time.perf_counter`` on CPU. Peak memory:
``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak resident set size (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` before each measured prefill, with glibc's mmap
threshold fixed at 64 KiB during the measurement so freed tensors leave the RSS); ``tracemalloc`` is
not used because it does not see PyTorch's allocator. Both are reported above the memory in use
just before the call (``peak_memory_bytes``) and in absolute terms.
"""
from __future__ import annotations

import os
import statistics
import time  # noqa: F401  (profiler.time: the clock the timing helpers read, patched in tests)
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import compat
from ..errors import PolicyError
from .loading import (  # noqa: F401  (the profiler is also the evaluation tools' one import)
    KNOWN_GEOMETRIES,
    MODEL_CHOICES,
    DTYPES,
    resolve_device,
    resolve_dtype,
    parse_all,
    environment,
    git_commit,
    load_vlm,
    PLAIN_PROMPT,
    build_prompt,
    build_geometry,
    random_inputs,
    tiny_inputs,
    to_device,
    encode_images,
    encoder_outputs_honoured,
    load_model,
)
from .timing import (  # noqa: F401
    make_timer,
    summary,
    interleaved,
    memory_method,
    peak_memory,
    LMPrefillCall,
    part_modules,
    PartsCall,
)


# -- the profile ---------------------------------------------------------------------------------
def profile(model: "str | Any" = "tiny", policies: Sequence[Any] = ("fastv:layer=2,keep=0.25",), *, inputs: dict | None = None,
            iters: int = 20, warmup: int = 2, layers: int | None = None, vision_layers: int | None = None, dtype=None,
            attn_implementation: str = "sdpa", device=None, batch: int = 1, n_text: int = 64, seed: int = 0,
            backend: str = "auto", ttft: bool = True, parts: bool = True,
            json_path: "str | os.PathLike | None" = None) -> dict:
    """Profile ``policies`` against the unpatched model (see the module docstring); returns the report dict.

    ``model``: a spec for :func:`load_model` or an already built model (then pass ``inputs``).
    ``parts``: also time one forward from pixels split into vision tower (+ projector), language
    model and the rest (``PartsCall``), with per-part ratios vs the baseline.
    """
    from .. import patch
    from ..errors import InputError
    from .flops import trace_flops, with_untouched_tower

    if iters < 1 or warmup < 0:
        raise InputError("--iters", f"need iters >= 1 and warmup >= 0, got {iters}, {warmup}")
    if not policies:
        raise InputError("--policy", "give at least one policy")

    pols = parse_all(policies, "--policy")  # every bad policy reported at once, before any model is built
    device = resolve_device(device)
    if isinstance(model, str):
        spec = model
        model, inputs, desc = load_model(spec, layers=layers, vision_layers=vision_layers, dtype=dtype,
                                         attn_implementation=attn_implementation, device=device, seed=seed,
                                         batch=batch, n_text=n_text)
    else:
        if inputs is None:
            raise InputError("inputs", "are required when a model object is given")
        spec, desc = type(model).__name__, type(model).__name__
        inputs = to_device(inputs, model)
    device = model.device
    from ..errors import IncompatiblePolicyError

    fitting, skipped = [], []
    for p in pols:  # validate every policy against the model before timing anything; one that does not fit is
        try:        # reported (report["skipped"]) and the others run
            h = patch(model, p, backend=backend)
        except PolicyError as e:
            skipped.append({"policy": p.to_string(), "error": str(e)})
            continue
        fitting.append(h.policy)  # resolved for this model (a preset's paper layers mapped: Policy.at_depth)
        h.unpatch()
    if not fitting:
        raise IncompatiblePolicyError("--policy", "no policy fits this model: " + "; ".join(s["error"] for s in skipped))
    pols = fitting

    lm_inputs = encode_images(model, inputs)
    ids = inputs["input_ids"]
    tok = getattr(model.config, "image_token_id", None)
    vis_ids = {tok, getattr(model.config, "video_token_id", None)} - {None}
    n_visual = int(sum((ids[0] == t).sum() for t in vis_ids))
    prompt_len = int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else ids.shape[1]
    calls: dict[str, Callable[[], Any]] = {"prefill": LMPrefillCall(model, inputs, lm_inputs)}
    if ttft:
        gen = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=model.config.text_config.pad_token_id)
        calls["ttft"] = lambda: model.generate(**inputs, **gen)
    if parts:
        calls["forward"] = PartsCall(model, lambda: model(**inputs, logits_to_keep=1), device)
    tc = model.config.text_config

    def prefill_memory(patched_policy):
        h = patch(model, patched_policy, backend=backend) if patched_policy is not None else None
        try:
            with torch.no_grad():
                calls["prefill"].prepare(patched_policy)
                return peak_memory(calls["prefill"], device)
        finally:
            if h is not None:
                h.unpatch()

    base_mem = prefill_memory(None)
    rows = []
    for pol in pols:
        r = interleaved(model, pol, calls, iters=iters, warmup=warmup, device=device, backend=backend)
        tr = r["trace"]
        fl = with_untouched_tower(trace_flops(model.config, tr, policy=pol), model.config, prompt_len - n_visual,
                                  n_visual)  # a trace without stages (structural ops alone) counts no tower itself
        pre_b, pre_p = summary(r["prefill"]["baseline"]), summary(r["prefill"]["patched"])
        measured = pre_p["median"] / pre_b["median"]
        mem = prefill_memory(pol)
        row = {
            "policy": pol.to_string(), "policy_dict": pol.to_dict(),
            "tokens_per_layer": tr.tokens_per_layer,
            "kept_visual_per_stage": [s.visual_after for s in tr.stages],
            "baseline_prefill_ms": pre_b, "prefill_ms": pre_p,
            "measured_ratio": measured,
            "measured_ratio_paired_median": statistics.median(
                p / b for p, b in zip(r["prefill"]["patched"], r["prefill"]["baseline"])),
            # the timed part is the LM prefill: its prediction is the LLM-only ratio; the total adds tower + projector
            "predicted_ratio": fl["llm_ratio"], "quotient": fl["llm_ratio"] / measured,
            "predicted_total_ratio": fl["ratio"],
            "flops": fl["flops"], "baseline_flops": fl["baseline_flops"], "scoring_flops": fl["scoring_flops"],
            "flops_parts": {k: fl[k] for k in ("llm_flops", "llm_baseline_flops", "vision_flops", "vision_baseline_flops",
                                               "projector_flops", "projector_baseline_flops")},
            "scoring_selection_ms": summary(r["stage_seconds"]),
            "overhead_pct_of_baseline": 100 * statistics.median(r["stage_seconds"]) / (pre_b["median"] / 1e3),
            "peak_memory_bytes": mem[0], "peak_memory_abs_bytes": mem[1],
            "baseline_peak_memory_bytes": base_mem[0], "baseline_peak_memory_abs_bytes": base_mem[1],
            "memory_ratio": (mem[0] / base_mem[0]) if mem[0] is not None and base_mem[0] else None,
        }
        if ttft:
            tb, tp = summary(r["ttft"]["baseline"]), summary(r["ttft"]["patched"])
            row.update(baseline_ttft_ms=tb, ttft_ms=tp, ttft_ratio=tp["median"] / tb["median"])
        if parts:
            fb, fp = summary(r["forward"]["baseline"]), summary(r["forward"]["patched"])
            row.update(baseline_forward_ms=fb, forward_ms=fp, forward_ratio=fp["median"] / fb["median"], parts={})
            for part, base_s in r["forward"]["baseline_parts"].items():
                pb, pp = summary(base_s), summary(r["forward"]["patched_parts"][part])
                row["parts"][part] = {"baseline_ms": pb, "patched_ms": pp,
                                      "ratio": pp["median"] / pb["median"] if pb["median"] > 0 else None}
        rows.append(row)

    _, timer_name = make_timer(device)
    report = {
        "model": {"spec": spec, "description": desc, "model_type": model.config.model_type,
                  "text_layers": tc.num_hidden_layers, "hidden_size": tc.hidden_size,
                  "attn_implementation": compat.attn_implementation(tc), "dtype": str(model.dtype).replace("torch.", "")},
        "prompt": {"batch": int(ids.shape[0]), "length": prompt_len, "n_visual": n_visual, "n_text": prompt_len - n_visual},
        "protocol": {"iters": iters, "warmup": warmup, "timer": timer_name, "interleaved": True,
                     "prefill": "LM prefill, image features precomputed (mm_encoder_outputs), logits_to_keep=1",
                     "ttft": "generate(max_new_tokens=1) from pixels" if ttft else None,
                     "forward": ("one forward from pixels (logits_to_keep=1), split by forward hooks: vision = vision "
                                 "tower pre-hook .. projector hook, llm = language-model pre-hook .. hook (pre-LLM "
                                 "reduction included, LM head not), other = the rest (embedding, feature scatter, "
                                 "patch bookkeeping, LM head)") if parts else None,
                     "memory": memory_method(device), "backend": backend},
        "environment": environment(device),
        "policies": rows,
        "skipped": skipped,  # policies that do not fit this model: {"policy", "error"}
    }
    if json_path is not None:
        import json

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def format_report(report: dict) -> str:
    """The printed table of a :func:`profile` report."""
    m, p, pr = report["model"], report["prompt"], report["protocol"]
    lines = [
        f"model: {m['description']}",
        f"  {m['model_type']}, {m['text_layers']} text layers, hidden {m['hidden_size']}, {m['attn_implementation']}, {m['dtype']}",
        f"prompt: batch {p['batch']} x ({p['n_text']} text + {p['n_visual']} visual = {p['length']} tokens)",
        f"protocol: warm-up {pr['warmup']}, {pr['iters']} interleaved runs each, timer {pr['timer']}; "
        f"device {report['environment']['device']} ({report['environment']['device_name']})",
        f"memory: {pr['memory']}",
        "",
    ]
    header = ["policy", "base ms", "patched ms (p25-p75)", "measured", "predicted", "quotient", "FLOPs total",
              "overhead %", "TTFT ratio", "peak MB (base)", "tokens/layer"]
    rows = []
    for r in report["policies"]:
        pre = r["prefill_ms"]
        tpl = r["tokens_per_layer"]
        rows.append([
            r["policy"], f"{r['baseline_prefill_ms']['median']:.2f}",
            f"{pre['median']:.2f} ({pre['p25']:.2f}-{pre['p75']:.2f})", f"{r['measured_ratio']:.3f}",
            f"{r['predicted_ratio']:.3f}", f"{r['quotient']:.3f}",
            f"{r['predicted_total_ratio']:.3f}" if r.get("predicted_total_ratio") is not None else "-",
            f"{r['overhead_pct_of_baseline']:.2f}",
            f"{r['ttft_ratio']:.3f}" if "ttft_ratio" in r else "-",
            f"{_mb(r['peak_memory_bytes'])} ({_mb(r['baseline_peak_memory_bytes'])})",
            f"{tpl[0]} -> {tpl[-1]}",
        ])
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines += [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    lines += [f"skipped (does not fit this model): {s['policy']}: {s['error']}" for s in report.get("skipped", [])]
    lines += ["", "measured = median patched / median baseline LM prefill; predicted = LLM FLOPs ratio (eval/flops.py, "
              "this run's tokens per layer); quotient = predicted / measured (1.0: as fast as the FLOPs say); "
              "FLOPs total = vision tower + projector + LLM FLOPs ratio; "
              "overhead = scoring + selection (trace stage seconds) as % of the baseline prefill"]
    if any("parts" in r for r in report["policies"]):
        lines += ["", *format_parts(report)]
    return "\n".join(lines)


def format_parts(report: dict) -> list[str]:
    """Lines of the per-part table (one forward from pixels): median ms baseline -> patched (ratio)."""
    names = [n for n in ("vision", "llm", "other") if any(n in r.get("parts", {}) for r in report["policies"])]
    header = ["policy", "forward ms (ratio)", *[f"{n} ms (ratio)" for n in names]]
    rows = []
    for r in report["policies"]:
        if "parts" not in r:
            continue
        cells = [r["policy"], f"{r['baseline_forward_ms']['median']:.2f} -> {r['forward_ms']['median']:.2f} "
                              f"({r['forward_ratio']:.3f})"]
        for n in names:
            p = r["parts"].get(n)
            cells.append("-" if p is None else f"{p['baseline_ms']['median']:.2f} -> {p['patched_ms']['median']:.2f} "
                                               f"({'n/a' if p['ratio'] is None else format(p['ratio'], '.3f')})")
        rows.append(cells)
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return ["parts of one forward from pixels (median ms, baseline -> patched, ratio):", fmt(header),
            fmt(["-" * w for w in widths]), *map(fmt, rows),
            "vision = vision tower + projector; llm = language model (pre-LLM reduction included); "
            "other = embedding, feature scatter, patch bookkeeping, LM head"]
