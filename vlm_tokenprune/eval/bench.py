"""Offline benchmark: accuracy, tokens, FLOPs and measured prefill ratio of policies on the shipped tiny VLM.

    from vlm_tokenprune.eval.bench import run_bench, write_outputs
    result = run_bench(["fastv", "uniform"], budgets=[0.5, 0.25, 0.11], n=500)
    write_outputs(result, "bench_out")          # bench.json, bench.md, bench.png

Data: the first ``n`` examples of the synthetic test split (``make_split("test", n)``: question types
balanced, example i has type ``QTYPES[i % 5]``), answered greedily by ``tiny_vlm.answer`` (the
model's own prompt, left-padded batches of ``batch_size``). Every policy x budget runs on the same
examples, after the unpruned baseline.

Budgets (``with_budget``; ``BUDGET_RULE``): a budget ``b`` replaces a single-stage policy's budget
with ``keep=b`` (of the original visual tokens). For a multi-stage policy the first stage keeps
``b`` and every later stage whose budget is a fraction of the original is scaled by the same factor
(``b / first keep``), so the schedule's shape (e.g. PyramidDrop's 1 : 1/2 : 1/4) is kept; stages
with ``of="current"`` (already relative to what is left) or ``tokens=`` (absolute counts, e.g. AIM's
final 1 token) are unchanged.

Per run: exact-match accuracy per question type (and ``"all"``), the mean sequence length each
decoder layer saw per example, theoretical prefill FLOPs (``flops.trace_flops`` on each example's
own trace, i.e. per row without batch padding; ratio = sum over examples / baseline sum; ``ratio``
counts the vision tower + projector + LLM, ``llm_ratio`` the language model alone), the
measured LM-prefill ratio on the first batch (``profiler.interleaved``: median patched / median
baseline over ``timing_iters`` interleaved runs), the mean kept row of each stage's visual tokens
(0 = top of the image, 1 = bottom) and every prediction.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..compat import attn_implementation
from ..errors import IncompatiblePolicyError, PolicyError
from ..policy import Budget, Policy
from ..state import StageTrace, Trace
from . import profiler
from .profiler import parse_all

BUDGET_RULE = (
    "single-stage policy: keep=b of the original visual tokens replaces its budget; multi-stage: the first "
    "stage keeps b and later keep-of-original stages are scaled by b / (first stage's keep), keeping the "
    "schedule's shape; of=current and tokens= stages are unchanged"
)


def with_budget(policy: Any, keep: float) -> Policy:
    """``policy`` with its budget set to ``keep`` (see ``BUDGET_RULE``; stages without a token budget,
    e.g. structural ones, are left as they are)."""
    pol = Policy.parse(policy)
    budgeted = [i for i, st in enumerate(pol.stages) if st.budget is not None]
    if not budgeted:
        raise PolicyError("budgets", f"{pol.to_string()!r} has no token budget to set")
    if len(budgeted) == 1:
        i = budgeted[0]
        b = pol.stages[i].budget
        budget = Budget(keep=float(keep), rounding=b.rounding if b.keep is not None else "half_up")  # its own rounding
        return Policy(tuple(replace(st, budget=budget) if j == i else st for j, st in enumerate(pol.stages)))
    first = pol.stages[budgeted[0]].budget
    if first.keep is None or first.of != "original":
        raise PolicyError("budgets", f"the first stage of {pol.to_string()!r} has no keep-of-original budget to scale; "
                                     "write the stages out for each budget instead")
    factor = float(keep) / first.keep
    stages = []
    for st in pol.stages:
        b = st.budget
        if b is not None and b.keep is not None and b.of == "original":
            st = replace(st, budget=Budget(keep=min(1.0, b.keep * factor), rounding=b.rounding))
        stages.append(st)
    return Policy(tuple(stages))


# -- per-example traces --------------------------------------------------------------------------
def row_trace(trace: Trace, b: int, length: int, n_visual: int, num_layers: int) -> Trace:
    """The trace a batch-1 run of row ``b`` (``length`` real tokens, ``n_visual`` of them visual) describes,
    cut out of a padded batch trace: per-layer lengths without the batch's left padding."""
    n_text = length - n_visual
    visual = [n_visual] * num_layers
    stages = []
    for s in trace.stages:
        for layer in range(s.layer, num_layers):
            visual[layer] = s.visual_after[b]
        stages.append(StageTrace(
            site=s.site, layer=s.layer, criterion=s.criterion, kept_positions=[s.kept_positions[b]],
            visual_before=[s.visual_before[b]], visual_after=[s.visual_after[b]],
            tokens_before=n_text + s.visual_before[b], tokens_after=n_text + s.visual_after[b], seconds=s.seconds,
            vision_tokens_per_layer=s.vision_tokens_per_layer, vision_kept_patches=s.vision_kept_patches,
            vision_crops=(s.vision_crops // max(1, len(s.visual_before)) if s.vision_crops is not None else None),
        ))
    return Trace(phase="prefill", stages=stages, tokens_per_layer=[n_text + v for v in visual])


class PrefillRecorder:
    """Forward hook on the model's top module that records the first forward (the prefill) after each
    ``arm()``: row lengths, visual counts, the handle's trace and the kept visual tokens' grid rows."""

    def __init__(self, model, handle=None):
        self.model, self.handle = model, handle
        self.records: list[dict] = []
        self._armed = False
        top = handle.seams.top if handle is not None else model
        self._hook = top.register_forward_hook(self._hook_fn, with_kwargs=True)

    def arm(self) -> None:
        self._armed = True

    def remove(self) -> None:
        self._hook.remove()

    def _hook_fn(self, module, args, kwargs, output):
        if not self._armed:
            return None
        self._armed = False
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        cfg = self.model.config
        vis_ids = {getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)} - {None}
        is_vis = torch.zeros_like(ids, dtype=torch.bool)
        for t in vis_ids:
            is_vis |= ids == t
        if mask is not None:
            is_vis &= mask.bool()
        rec: dict = {"lengths": lengths, "n_visual": is_vis.sum(1).tolist(), "trace": None, "rows": None, "first_visual": None}
        if self.handle is not None:
            tr = self.handle.last_trace()
            rec["trace"] = tr if tr is not None and tr.phase == "prefill" else None
            if rec["trace"] is not None:
                layout = self.handle.adapter.visual_layout(self.handle.model, ids, kwargs)
                rec["first_visual"] = is_vis.float().argmax(1).tolist()
                rec["rows"] = _kept_rows(rec["trace"], layout)
        self.records.append(rec)
        return None


def _kept_rows(trace: Trace, layout) -> list[list[list[float]]] | None:
    """Per stage, per row: the normalised grid row (0 top .. 1 bottom) of each kept visual token."""
    if not layout.coords_known:
        return None
    # normalised row of every visual token on its own grid (segment): row / (grid height - 1); CLS / newline: -1
    height = torch.zeros_like(layout.row)
    for b in range(layout.row.shape[0]):
        vis = layout.is_visual[b] & (layout.row[b] >= 0)
        for seg in layout.segment[b][vis].unique().tolist():
            on = vis & (layout.segment[b] == seg)
            height[b, on] = layout.row[b][on].max() + 1
    norm = torch.where(height > 0, layout.row / (height - 1).clamp(min=1), torch.full_like(layout.row, -1, dtype=torch.float))
    out = []
    for s in trace.stages:
        out.append([[x for x in norm[b, pos].tolist() if x >= 0] for b, pos in enumerate(s.kept_positions)])
    return out


# -- one policy ----------------------------------------------------------------------------------
def accuracy(examples: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match per question type plus ``"all"`` (``tiny_vlm.evaluate``'s definition)."""
    hits: dict[str, list[int]] = {}
    for e, p in zip(examples, predictions):
        hits.setdefault(e["qtype"], []).append(int(p == e["answer"]))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["all"] = sum(int(p == e["answer"]) for e, p in zip(examples, predictions)) / max(len(examples), 1)
    return acc


def _n_token_stages(pol: "Policy | None") -> int:
    """Stages that keep a set of visual tokens (vision, pre-LLM and LLM sites; structural ops keep none)."""
    return sum(not st.structural for st in pol.stages) if pol is not None else 0


def evaluate_policy(model, processor, examples: Sequence[dict], policy: Any = None, *, batch_size: int = 8,
                    backend: str = "auto", max_new_tokens: int = 4, progress=None) -> dict:
    """Answer ``examples`` with ``policy`` (None: unpatched); predictions plus per-example tokens and FLOPs."""
    from .. import patch
    from .flops import prefill_flops, trace_flops, unpruned_flops, with_untouched_tower
    from .tiny_vlm import answer

    pol = Policy.parse(policy) if policy is not None else None
    handle = patch(model, pol, backend=backend) if pol is not None else None
    pol = handle.policy if handle is not None else None  # resolved for this model (a preset's paper layers mapped)
    rec = PrefillRecorder(model, handle)
    preds: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            rec.arm()
            preds += answer(model, processor, [e["image"] for e in chunk], [e["question"] for e in chunk],
                            batch_size=batch_size, max_new_tokens=max_new_tokens)
            if progress is not None:
                progress.update(1)
    finally:
        rec.remove()
        if handle is not None:
            handle.unpatch()
    plan = getattr(handle, "structural", None) if handle is not None else None

    L = model.config.text_config.num_hidden_layers
    tokens, flops, base, scoring, kept_visual, kept_idx = [], [], [], [], [], []
    llm: list[float] = []  # the language model alone (flops / base: vision tower + projector + LLM)
    llm_base: list[float] = []
    n_stages = _n_token_stages(pol)
    row_sums = [[0.0, 0] for _ in range(n_stages)]
    for r in rec.records:
        for b, (length, n_vis) in enumerate(zip(r["lengths"], r["n_visual"])):
            if r["trace"] is None:  # baseline, or an input the patch passed through
                t = [length] * L
                flops.append(unpruned_flops(model.config, length - n_vis, n_vis)["flops"])  # tower + projector + LLM
                base.append(flops[-1])
                llm.append(prefill_flops(model.config, t))
                llm_base.append(llm[-1])
                scoring.append(0.0)
                kept_visual.append([])
                kept_idx.append([])
            else:
                tr = row_trace(r["trace"], b, length, n_vis, L)
                t = tr.tokens_per_layer
                fl = trace_flops(model.config, tr, policy=pol)
                if pol.structural_stages:  # layer skips, head/FFN cuts...: what the implementation computes
                    from .flops import structural_flops

                    sf = structural_flops(model.config, pol, length - n_vis, n_vis, plan=plan,
                                          subset_attention=bool(getattr(handle, "structural_attention", True)))
                    fl = with_untouched_tower(fl, model.config, length - n_vis, n_vis)  # structural ops alone
                    fl = {**fl, "flops": fl["flops"] - fl["llm_flops"] + sf["flops"], "llm_flops": sf["flops"],
                          "baseline_flops": fl["baseline_flops"] - fl["llm_baseline_flops"] + sf["baseline_flops"],
                          "llm_baseline_flops": sf["baseline_flops"]}
                flops.append(fl["flops"])
                base.append(fl["baseline_flops"])
                llm.append(fl["llm_flops"])
                llm_base.append(fl["llm_baseline_flops"])
                scoring.append(fl["scoring_flops"])
                kept_visual.append([s.visual_after[0] for s in tr.stages])
                first = r["first_visual"][b]
                kept_idx.append([[p - first for p in s.kept_positions[0]] for s in tr.stages])
                if r["rows"] is not None:
                    for si in range(n_stages):
                        vals = r["rows"][si][b]
                        row_sums[si][0] += sum(vals)
                        row_sums[si][1] += len(vals)
            tokens.append(t)
    n = max(len(tokens), 1)
    return {
        "predictions": preds,
        "tokens_per_example": tokens,
        "kept_visual_per_example": kept_visual,
        "kept_index_per_example": kept_idx,  # per example, per stage: kept visual tokens, as indices from the first visual token
        "tokens_per_layer": [sum(t[layer] for t in tokens) / n for layer in range(L)],
        "flops_per_example": sum(flops) / n,
        "baseline_flops_per_example": sum(base) / n,
        "flops_ratio": sum(flops) / sum(base) if base else 1.0,  # vision tower + projector + LLM
        "llm_flops_ratio": sum(llm) / sum(llm_base) if llm_base else 1.0,  # the language model alone
        "scoring_flops_per_example": None if any(s is None for s in scoring) else sum(scoring) / n,
        "kept_row_mean": [s / c if c else None for s, c in row_sums],
    }


# -- the benchmark -------------------------------------------------------------------------------
def _label(spec: Any) -> str:
    return spec if isinstance(spec, str) else Policy.parse(spec).to_string()


def run_bench(policies: Sequence[Any], budgets: Sequence[float] | None = None, *, n: int = 500, batch_size: int = 8,
              out: "str | os.PathLike | None" = None, model=None, processor=None, model_path: "str | os.PathLike | None" = None,
              timing_iters: int = 5, backend: str = "auto", progress: bool = True, examples: Sequence[dict] | None = None,
              labels: Sequence[str] | None = None) -> dict:
    """Run the test split for the baseline and every policy x budget; returns the result dict
    (written with :func:`write_outputs` when ``out`` is given).

    ``policies``: policy strings, dicts or ``Policy`` objects; ``budgets``: keep fractions applied with
    :func:`with_budget` (None: each policy as given). ``model``/``processor`` default to the shipped tiny
    VLM (or ``load_tiny_vlm(path=model_path)``). ``labels``: names for the policies in tables and plots
    (default: the policy strings).
    """
    from tqdm.auto import tqdm

    from .. import patch
    from ..errors import InputError
    from .flops import FORMULA
    from .synthetic import make_split
    from .tiny_vlm import load_tiny_vlm, prompts

    if n < 1 or batch_size < 1 or timing_iters < 0:
        raise InputError("--n/--batch-size/--timing-iters", f"need n >= 1, batch size >= 1, timing iters >= 0; got {n}, {batch_size}, {timing_iters}")
    if budgets is not None:
        for b in budgets:
            if not (isinstance(b, (int, float)) and 0 < b <= 1):
                raise InputError("--budgets", f"{b!r}; each budget is a keep fraction in (0, 1]")
    if labels is not None and len(labels) != len(policies):
        raise InputError("labels", f"{len(labels)} labels for {len(policies)} policies")
    parsed = parse_all(policies, "--policy")  # every bad policy reported at once, before any model is built
    if model is None:
        model, processor = load_tiny_vlm(path=model_path)
    examples = list(examples) if examples is not None else make_split("test", n)

    # every run, validated against the model before anything long starts; one that does not fit this model
    # (or this budget) is reported in "skipped" and the others run
    runs: list[dict] = [{"label": "baseline", "policy_spec": None, "budget": None, "policy": None}]
    skipped: list[dict] = []
    for i, (spec, parsed_pol) in enumerate(zip(policies, parsed)):
        label = labels[i] if labels is not None else _label(spec)
        for b in (budgets if budgets else [None]):
            try:
                pol = with_budget(spec, b) if b is not None else parsed_pol
                h = patch(model, pol, backend=backend)
                pol = h.policy  # resolved for this model (Policy.at_depth)
                h.unpatch()
            except PolicyError as e:
                skipped.append({"label": label, "budget": b, "error": str(e)})
                print(f"skipped {label}{f' keep={b}' if b is not None else ''}: {e}", file=sys.stderr)
                continue
            runs.append({"label": label, "policy_spec": _label(spec), "budget": b, "policy": pol})
    if len(runs) == 1:
        raise IncompatiblePolicyError("--policy", "no policy fits this model: " + "; ".join(s["error"] for s in skipped))

    # the batch whose LM prefill is timed (the first one), image features precomputed once
    first = examples[:batch_size]
    timed_inputs = profiler.to_device(dict(processor(images=[e["image"] for e in first], text=prompts([e["question"] for e in first]),
                                                     return_tensors="pt", padding=True)), model)
    # vision-site policies re-encode the pixels through their patched tower (outside the timer)
    prefill = profiler.LMPrefillCall(model, timed_inputs, profiler.encode_images(model, timed_inputs))

    n_batches = math.ceil(len(examples) / batch_size)
    bar = tqdm(total=n_batches * len(runs), desc="bench", unit="batch", disable=not progress, file=sys.stderr)
    results = []
    try:
        for run in runs:
            bar.set_description(run["label"] + (f" keep={run['budget']}" if run["budget"] is not None else ""))
            pol = run["policy"]
            ev = evaluate_policy(model, processor, examples, pol, batch_size=batch_size, backend=backend, progress=bar)
            # the baseline is 1 by definition; a policy not timed (timing_iters=0) is n/a, not "as fast as the baseline"
            timing = {"measured_ratio": 1.0 if pol is None else None, "iters": 0}
            if pol is not None and timing_iters > 0:
                t = profiler.interleaved(model, pol, {"prefill": prefill}, iters=timing_iters, warmup=1,
                                         device=model.device, backend=backend)
                tb, tp = statistics.median(t["prefill"]["baseline"]), statistics.median(t["prefill"]["patched"])
                timing = {"measured_ratio": tp / tb, "baseline_ms": 1e3 * tb, "patched_ms": 1e3 * tp, "iters": timing_iters}
            results.append({
                "label": run["label"], "policy_spec": run["policy_spec"], "budget": run["budget"],
                "policy": pol.to_dict() if pol is not None else None,
                "policy_string": pol.to_string() if pol is not None else None,
                "accuracy": accuracy(examples, ev["predictions"]),
                "tokens_per_layer": ev["tokens_per_layer"],
                "kept_visual_per_stage": [statistics.fmean(k[i] for k in ev["kept_visual_per_example"])
                                          for i in range(_n_token_stages(pol))] if pol is not None else [],
                "flops": {"ratio": ev["flops_ratio"], "llm_ratio": ev["llm_flops_ratio"],
                          "per_example": ev["flops_per_example"],
                          "baseline_per_example": ev["baseline_flops_per_example"],
                          "scoring_per_example": ev["scoring_flops_per_example"]},
                "prefill": timing,
                "kept_row_mean": ev["kept_row_mean"],
                "predictions": ev["predictions"],
            })
    finally:
        bar.close()

    cfg = model.config
    result = {
        "environment": profiler.environment(model.device),
        "model": {"path": str(getattr(model, "name_or_path", "") or model_path or ""), "model_type": cfg.model_type,
                  "text_layers": cfg.text_config.num_hidden_layers, "hidden_size": cfg.text_config.hidden_size,
                  "attn_implementation": attn_implementation(cfg.text_config), "dtype": str(model.dtype).replace("torch.", "")},
        "data": {"split": "test", "n": len(examples), "balanced": True,
                 "examples": [{"seed": e.get("seed"), "qtype": e["qtype"], "question": e["question"], "answer": e["answer"]}
                              for e in examples]},
        "batch_size": batch_size, "budgets": list(budgets) if budgets else None, "budget_rule": BUDGET_RULE,
        "timing": {"what": "LM prefill of the first batch (image features precomputed), logits_to_keep=1",
                   "iters": timing_iters, "protocol": "interleaved with the baseline, order alternating, medians"},
        "flops_formula": FORMULA,
        "runs": results,
        "skipped": skipped,
    }
    if out is not None:
        write_outputs(result, out)
    return result


# -- outputs -------------------------------------------------------------------------------------
def _fmt_tokens(tpl: Sequence[float]) -> str:
    return "/".join(f"{t:.0f}" for t in tpl)


def markdown_table(result: dict) -> str:
    """One line per run: tokens per layer, FLOPs and prefill ratios, accuracy overall and per type."""
    qtypes = [k for k in result["runs"][0]["accuracy"] if k != "all"]
    head = ["policy", "keep", "tokens per layer (mean)", "FLOPs ratio (total)", "LLM FLOPs ratio", "prefill ratio",
            "acc all", *qtypes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        acc = r["accuracy"]
        keep = "-" if r["budget"] is None else f"{r['budget']:g}"
        lines.append("| " + " | ".join([
            f"`{r['label']}`" if r["policy"] is not None else "baseline", keep, _fmt_tokens(r["tokens_per_layer"]),
            f"{r['flops']['ratio']:.3f}", _ratio(r["flops"].get("llm_ratio")), _ratio(r["prefill"]["measured_ratio"]),
            f"{acc['all']:.3f}",
            *[f"{acc[q]:.3f}" for q in qtypes],
        ]) + " |")
    for s in result.get("skipped", []):  # run_bench's (label, budget, error); accuracy_tiny's (preset, why)
        keep = "" if s.get("budget") is None else f" keep={s['budget']:g}"
        lines.append(f"\nskipped `{s.get('label', s.get('preset'))}`{keep}: {s.get('error', s.get('why'))}")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plot(result: dict, path: "str | os.PathLike") -> bool:
    """Accuracy vs theoretical FLOPs ratio, one line per policy across budgets; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'vlm_tokenprune[eval]'); skipping the PNG plot",
              file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    groups: dict[str, list[dict]] = {}
    for r in result["runs"]:
        if r["policy"] is None:
            ax.scatter([1.0], [r["accuracy"]["all"]], marker="*", s=160, color="black", zorder=3, label="baseline")
        else:
            groups.setdefault(r["label"], []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["flops"]["ratio"])
        ax.plot([r["flops"]["ratio"] for r in rs], [r["accuracy"]["all"] for r in rs], marker="o", label=label)
    ax.set_xlabel("theoretical prefill FLOPs ratio (LLM, vs baseline)")
    ax.set_ylabel("exact-match accuracy (all types)")
    m = result["model"]
    ax.set_title(f"{m['model_type']} ({m['text_layers']} layers), synthetic test split, n={result['data']['n']}", fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_outputs(result: dict, out: "str | os.PathLike", stem: str = "bench") -> dict[str, str]:
    """``<out>/<stem>.json``, ``.md`` and (with matplotlib) ``.png``; returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{stem}.json"), "md": str(out / f"{stem}.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    env, m, d = result["environment"], result["model"], result["data"]
    md = [
        f"# Offline benchmark: {m['model_type']} ({m['text_layers']} text layers, {m['dtype']}), synthetic test split",
        "",
        f"n = {d['n']} (question types balanced), batch {result['batch_size']}, greedy exact match. "
        f"vlm_tokenprune {env['version']} (commit {env['git_commit'] or 'unknown'}), torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['device']} ({env['device_name']}), {env['date']}.",
        "",
        markdown_table(result),
        "",
        "tokens per layer: mean sequence length each decoder layer saw per example; FLOPs ratio: "
        "`eval/flops.py` on each example's own trace; prefill ratio: measured LM prefill of the first batch, "
        f"median of {result['timing']['iters']} interleaved runs (CPU timings are noisy). Budgets: {result['budget_rule']}.",
    ]
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    png = out / f"{stem}.png"
    if plot(result, png):
        paths["png"] = str(png)
    return paths
