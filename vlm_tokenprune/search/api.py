"""``search_policy``: the best policy for a model under a FLOPs budget (``vlm-tokenprune search``).

EvoPress (arXiv 2410.14649) over a joint space of token budgets per stage (``tokens``), removed
attention / MLP sublayers (``sublayers``, FinerCut's op, arXiv 2405.18218) and heads pruned for
visual tokens (``heads``). The constraint is the predicted prefill FLOPs ratio of the language model
(``eval.flops.structural_flops``) at the calibration prompts' mean text / visual token counts; the
fitness is the KL divergence of the answer tokens' next-token distributions from the unpruned model
on the calibration split (``val``); every candidate that reached the last selection step is then
scored on the held-out split (``test``), which the search never sees.

A user's own data (``calibration_data`` / ``heldout_data``: JSONL files of ``{"image", "prompt", "answer"}``
records, ``search.records``) replaces the synthetic splits, on any supported VLM: the fitness is the KL on a
record's answer tokens, teacher-forced; a record without an answer is teacher-forced on the unpruned model's
own greedy continuation of ``answer_tokens`` tokens (generated once, before the search: EvoPress's KL to the
dense model on the dense model's outputs). Held-out records are scored by normalised greedy exact match.
The synthetic splits need the shipped tiny VLM's vocabulary (``data.speaks_synthetic``); other models must
bring their own calibration data, and held-out data or ``heldout=0``.

Budget split: the search starts with the token sub-space taking the FLOPs budget (its level sum is
the smallest whose even spread meets it) and the sublayer and head sub-spaces at the counts given
(``sublayers``, ``heads``). The level switch keeps each sub-space's level sum; with ``trade > 0`` that
share of the children comes from ``mutation.budget_trade`` instead, which moves budget between
sub-spaces (and switches the LLM stages' criterion when ``criteria`` lists several) under the one FLOPs
constraint, ending tight. ``trade=0`` keeps the counts fixed. A candidate above the budget is infeasible.

Seeds (``seed_presets``): the presets the space can express, each at the least compression that fits
the budget (``seeds.preset_seeds``), join the first generation and the final selection on all
calibration batches, so the result's calibration divergence is never above a seed's.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import InputError
from .evolution import EvoConfig, evolve
from .head_space import HeadSpace
from .space import JointSpace
from .sublayer_space import SublayerSpace
from .token_space import TokenSpace

SPACES = ("tokens", "sublayers", "heads")


CONSTRAINTS = ("flops", "latency")


def parse_constraint(text: "str | float") -> tuple[str, float]:
    """``"flops=0.3"`` (or 0.3) -> ``("flops", 0.3)``: the largest predicted prefill FLOPs ratio allowed;
    ``"latency=0.5"`` -> ``("latency", 0.5)``: the largest measured prefill latency ratio (``search/latency.py``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        key, value = "flops", float(text)
    else:
        key, eq, val = str(text).partition("=")
        key = key.strip()
        if not eq or key not in CONSTRAINTS:
            raise InputError("budget", f"expected flops=R (a FLOPs ratio of the unpruned model) or latency=R (a measured "
                             f"prefill latency ratio), 0 < R <= 1, got {text!r}")
        try:
            value = float(val)
        except ValueError:
            raise InputError("budget", f"{key} must be a number in (0, 1], got {val!r}") from None
    if not 0 < value <= 1:
        raise InputError("budget", f"{key} must be in (0, 1], got {value}")
    return key, value


def parse_budget(text: "str | float") -> float:
    """``"flops=0.3"`` (or 0.3) -> 0.3: the largest predicted prefill FLOPs ratio allowed (FLOPs only)."""
    key, value = parse_constraint(text)
    if key != "flops":
        raise InputError("budget", f"expected flops=R here, got {text!r}")
    return value


def parse_space(spec: "str | Sequence[str]") -> tuple[str, ...]:
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in items if s not in SPACES]
    if bad or not items:
        raise InputError("space", f"{bad[0] if bad else spec!r}; allowed: a comma list of {', '.join(SPACES)}")
    return tuple(dict.fromkeys(items))


@dataclass
class SearchResult:
    policy: str | None  # the best policy (None: the unpruned model)
    flops_ratio: float  # predicted (structural_flops), whatever the constraint
    fitness: float
    accuracy: float | None
    rows: list = field(default_factory=list)  # every evaluated candidate (see pareto.markdown)
    files: dict = field(default_factory=dict)
    seeds: list = field(default_factory=list)  # the preset seeds: {"family", "levels", "policy", "fitness", "flops_ratio"}
    latency_ratio: float | None = None  # measured (budget latency=R only)


def _entry(model, entry: str | None) -> str | None:
    """``"auto"``: MCTF from vision layer 0 where the model has a CLIP tower, else no entry stage."""
    if entry != "auto":
        return entry
    from ..patching import patch

    try:
        patch(model, "mctf:layer=0,keep=0.5").unpatch()
        return "mctf:layer=0"
    except ValueError:
        return None


def build_space(model, spaces: Sequence[str], *, criterion: str = "fastv", entry: str | None = "auto", levels: int = 16,
                layers: Sequence[int] | None = None, criteria: Sequence[str] = ()) -> JointSpace:
    from ..adapters import resolve_adapter

    seams = resolve_adapter(model).seams(model)
    n = seams.num_layers
    attn0 = seams.decoder_layers[0].self_attn
    n_heads = attn0.q_proj.out_features // attn0.head_dim
    parts = []
    if "tokens" in spaces:
        parts.append(TokenSpace(tuple(layers) if layers else tuple(range(1, n)), criterion, _entry(model, entry), levels,
                                tuple(criteria)))
    if "sublayers" in spaces:  # attention only where the masks are not sized from the layer's cache (mask_layers)
        from ..structural.plan import mask_layers

        parts.append(SublayerSpace(tuple(j for j in range(n) if j not in mask_layers(seams)), tuple(range(n))))
    if "heads" in spaces:
        parts.append(HeadSpace(tuple((j, h) for j in range(1, n) for h in range(n_heads))))
    return JointSpace(tuple(parts))


def check_counts(label: Callable[[str], str] = str, **counts: Any) -> None:
    """Every count / share option of a search, by name (``label(name)``: the CLI's flag), before any model or data is
    touched (``InputError``).

    Integers: ``generations``, ``sublayers``, ``heads``, ``heldout``, ``heldout_top`` >= 0; ``offspring``,
    ``batch_size``, ``calibration``, ``answer_tokens``, ``latency_iters``, ``samples``, ``simulations`` >= 1;
    ``levels`` >= 2; ``seed`` any integer. Floats: ``trade`` in [0, 1], ``length_penalty`` >= 0 (finite).
    Options not given are not checked."""
    import math

    lowest = {"generations": 0, "sublayers": 0, "heads": 0, "heldout": 0, "heldout_top": 0, "offspring": 1,
              "batch_size": 1, "calibration": 1, "answer_tokens": 1, "latency_iters": 1, "samples": 1,
              "simulations": 1, "levels": 2, "seed": None}
    for name, value in counts.items():
        if name in lowest:
            low = lowest[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(label(name), f"must be an integer, got {value!r}")
            if low is not None and value < low:
                raise InputError(label(name), f"must be an integer >= {low}, got {value}")
        elif name in ("trade", "length_penalty"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(label(name), f"must be a finite number, got {value!r}")
            if name == "trade" and not 0 <= value <= 1:
                raise InputError(label("trade"), f"a share of children in [0, 1], got {value}")
            if name == "length_penalty" and value < 0:
                raise InputError(label("length_penalty"), f"must be >= 0, got {value}")
        else:
            raise TypeError(f"check_counts() got an unknown option {name!r}")


def search_policy(model, processor, budget: "str | float" = "flops=0.3", *, space: "str | Sequence[str]" = ("tokens",),
                  calibration: int = 64, batch_size: int = 8, generations: int = 20, offspring: int = 16,
                  steps: Sequence[tuple[int, int]] | None = None, seed: int = 0, criterion: str = "fastv",
                  entry: str | None = "auto", levels: int = 16, sublayers: int = 2, heads: int = 4, heldout: int = 200,
                  heldout_top: int = 8, metric: str = "kl", out: "str | os.PathLike | None" = None, resume: bool = False,
                  progress: bool = True, heldout_fn: Callable[[Any], float] | None = None, criteria: Sequence[str] = (),
                  trade: float = 0.5, seed_presets: bool = True, latency_iters: int = 5,
                  calibration_data: "str | os.PathLike | None" = None, heldout_data: "str | os.PathLike | None" = None,
                  answer_tokens: int = 8) -> SearchResult:
    """Search the best policy under ``budget``; write it and a Pareto table to ``out`` when given.

    ``calibration`` examples (the synthetic ``val`` split) in batches of ``batch_size``; ``steps``
    (EvoPress multi-step selection, calibration batches and survivors per step) default to a quarter,
    half and all of the batches with 4, 2, 1 survivors. ``heldout`` examples of the ``test`` split
    score the best and at most ``heldout_top`` other candidates that reached the last step
    (``heldout_fn(policy) -> accuracy`` replaces the synthetic held-out evaluation). ``criteria``: LLM-stage
    criteria the search chooses among (e.g. ``("fastv", "dart")``; default: ``criterion`` only); ``trade``:
    share of children that move budget between sub-spaces; ``seed_presets``: seed with the presets the
    space expresses. ``budget="latency=R"``: the constraint is the measured prefill latency ratio on this
    machine (one calibration batch, interleaved with the baseline, medians of ``latency_iters``; kept in
    ``out/latency.json`` so a resumed search reuses the measurements).

    ``calibration_data``: a JSONL file of ``{"image", "prompt", "answer"?}`` records (``search.records``; its first
    ``calibration`` records, in batches of at most ``batch_size``) instead of the synthetic ``val`` split; records
    without ``answer`` are teacher-forced on the unpruned model's greedy continuation of ``answer_tokens`` tokens,
    generated once and cached for the whole search. ``heldout_data``: such a file with answers (its first
    ``heldout`` records; disjoint from the calibration records) instead of the synthetic ``test`` split, scored by
    greedy exact match after ``records.normalise_answer``. Every file is checked before the model runs.
    """
    from ..eval.flops import structural_flops
    from ..policy import Policy
    from ..adapters import resolve_adapter
    from .data import calibration_batches, heldout_accuracy, speaks_synthetic
    from .fitness import METRICS, build_calibration, policy_divergence
    from .pareto import markdown, pareto_front, plot

    kind, ratio_max = parse_constraint(budget)
    check_counts(generations=generations, offspring=offspring, batch_size=batch_size, calibration=calibration,
                 levels=levels, sublayers=sublayers, heads=heads, heldout=heldout, heldout_top=heldout_top,
                 answer_tokens=answer_tokens, latency_iters=latency_iters, seed=seed, trade=trade)
    if metric not in METRICS:
        raise InputError("metric", f"{metric!r}; allowed: {', '.join(METRICS)}")
    spaces = parse_space(space)
    if criteria and "tokens" not in spaces:
        raise InputError("criteria", "choosing among criteria needs the tokens space")
    for c in criteria:
        try:
            Policy.parse(f"{c}:layer=1,keep=0.5")
        except ValueError as e:
            raise InputError("criteria", f"{c!r} is not an LLM-stage criterion ({e})") from None
    cal_records, held_records = _read_data(model, processor, calibration_data, heldout_data, answer_tokens, heldout,
                                           heldout_fn, speaks_synthetic(processor))
    resolve_adapter(model)  # an unsupported family is refused by name before any forward
    _check_flops_geometry(model)
    if cal_records is None:
        if calibration < batch_size:
            raise InputError("calibration", f"needs at least one batch ({batch_size} examples), got {calibration}")
        batches, masks, n_text, n_visual = calibration_batches(model, processor, calibration, batch_size)
    else:
        from .record_batches import record_calibration_batches

        if calibration < 1:
            raise InputError("calibration", f"records of calibration_data to use: at least 1, got {calibration}")
        cal_records = cal_records[:calibration]
        batches, masks, n_text, n_visual, _ = record_calibration_batches(
            model, processor, cal_records, min(batch_size, len(cal_records)), answer_tokens)
    cal = build_calibration(model, batches, masks)
    nb = len(cal)
    if steps is None:
        steps = tuple(sorted({(max(1, nb // 4), 4), (max(1, nb // 2), 2), (nb, 1)}, key=lambda s: (s[0], -s[1])))
        steps = tuple(s for i, s in enumerate(steps) if i == len(steps) - 1 or s[0] < steps[i + 1][0])
    config = EvoConfig(generations=generations, offspring=offspring, steps=tuple(tuple(s) for s in steps), seed=seed,
                       trade=trade)
    joint = build_space(model, spaces, criterion=criterion, entry=entry, levels=levels, criteria=criteria)

    ratios: dict = {}

    def ratio(levels_: Sequence[int]) -> float:
        key = tuple(levels_)
        if key not in ratios:
            pol = joint.policy_string(key)
            ratios[key] = 1.0 if pol is None else structural_flops(model.config, pol, n_text, n_visual)["ratio"]
        return ratios[key]

    def conflicts(levels_: Sequence[int]) -> bool:
        pol = joint.policy(levels_)
        if pol is None:
            return False
        read = {st.layer - 1 for st in pol.stages if st.scores_on_llm_layer}
        removed = {a for st in pol.stages if st.op == "skip_sublayers" for a in st.params.get("attn", ())}
        return bool(read & removed)

    def valid(levels_: Sequence[int]) -> bool:
        return joint.valid(levels_) and not conflicts(levels_)

    latency = None
    if kind == "latency":
        from .latency import LatencyRatio

        latency = LatencyRatio(model, cal.batches[0], iters=latency_iters,
                               path=os.path.join(os.fspath(out), "latency.json") if out is not None else None)

    def cost(levels_: Sequence[int]) -> float:
        return ratio(levels_) if latency is None else latency(joint.policy_string(levels_))

    def within(levels_: Sequence[int]) -> bool:
        return cost(levels_) <= ratio_max + 1e-12

    def feasible(levels_: Sequence[int]) -> bool:
        return valid(levels_) and within(levels_)

    start = _start(joint, spaces, sublayers, heads, feasible)
    if start is None:
        raise InputError("budget", f"no policy of space {','.join(spaces)} reaches {kind}={ratio_max} (with sublayers="
                         f"{sublayers}, heads={heads}); allow more (a larger space, more sublayers / heads) or a larger budget")

    def fitness(levels_, b):
        return policy_divergence(model, cal, joint.policy_string(levels_), b, metric)

    ck = os.path.join(os.fspath(out), "checkpoint.json") if out is not None else None
    from .seeds import preset_seeds, seed_policies

    seeds = preset_seeds(joint, feasible) if seed_presets else []
    sig = [joint.units, n_text, n_visual, metric, kind, ratio_max, calibration, batch_size,
           [list(s_.choices) for s_ in joint.spaces if isinstance(s_, TokenSpace)]]
    if cal_records is not None:  # a resumed search runs on the same records and targets
        from .records import digest

        sig += [digest(cal_records), answer_tokens]
    extra = json.dumps(sig)
    res = evolve(fitness, start, joint.max_levels, joint.groups, nb, config, feasible=feasible, checkpoint=ck,
                 resume=resume, progress=progress, extra_signature=extra, seeds=[lv for _, lv in seeds], valid=valid,
                 within=within)
    seed_rows = seed_policies(joint, seeds)
    for r in seed_rows:
        per = res.evaluated.get(tuple(r["levels"]), {})
        r["fitness"] = sum(per.values()) / len(per) if per else None
        r["flops_ratio"] = ratio(r["levels"])

    rows = []
    for lv, per in res.evaluated.items():
        rows.append({"policy": joint.policy_string(lv), "levels": list(lv), "flops_ratio": ratio(lv),
                     "fitness": sum(per.values()) / len(per), "batches": len(per), "accuracy": None})
        if latency is not None:
            rows[-1]["latency_ratio"] = cost(lv)
    best_pol = joint.policy_string(res.best)
    final = sorted((r for r in rows if r["batches"] >= config.steps[-1][0]), key=lambda r: r["fitness"])
    chosen = [r for r in final if r["policy"] == best_pol] + [r for r in final if r["policy"] != best_pol][:heldout_top]
    if held_records is not None:
        from .record_batches import answer_budget, records_accuracy

        held_records = held_records[:heldout]
        n_new = answer_budget(processor, held_records) if held_records else 1
        score = heldout_fn or (lambda pol: records_accuracy(model, processor, held_records, pol, batch_size, n_new))
    else:
        score = heldout_fn or (lambda pol: heldout_accuracy(model, processor, pol, heldout, batch_size))
    data = {"calibration": os.path.abspath(os.fspath(calibration_data)) if calibration_data is not None else "synthetic val",
            "calibration_examples": len(cal_records) if cal_records is not None else calibration,
            "heldout": os.path.abspath(os.fspath(heldout_data)) if heldout_data is not None else "synthetic test",
            "heldout_examples": len(held_records) if held_records is not None else heldout,
            "answer_tokens": answer_tokens}
    if heldout > 0:
        from tqdm.auto import tqdm

        for r in tqdm(chosen, desc="held-out", disable=not progress):
            r["accuracy"] = score(r["policy"])
        rows.append({"policy": None, "levels": None, "flops_ratio": 1.0, "fitness": 0.0, "batches": nb,
                     "accuracy": score(None)})
    best_row = next(r for r in rows if r["policy"] == best_pol and r["levels"] is not None)
    result = SearchResult(best_pol, ratio(res.best), res.fitness, best_row["accuracy"], rows, seeds=seed_rows,
                          latency_ratio=cost(res.best) if latency is not None else None)
    if out is not None:
        result.files = _write(out, result, res, joint, config, {kind: ratio_max}, spaces, n_text, n_visual,
                              data["heldout_examples"], metric, data)
        if latency is not None:
            result.files["latency.json"] = latency.path
        front = pareto_front(rows)
        with open(os.path.join(out, "pareto.md"), "w", encoding="utf-8") as f:
            f.write(f"Search under {kind} <= {ratio_max} (space {','.join(spaces)}; n_text {n_text}, n_visual {n_visual}); "
                    f"calibration: {data['calibration_examples']} examples of {data['calibration']}; held-out accuracy "
                    f"on {data['heldout_examples']} examples of {data['heldout']}.\n\n" + markdown(rows, front))
        result.files["pareto.md"] = os.path.join(out, "pareto.md")
        if plot(rows, front, os.path.join(out, "pareto.png"), ratio_max if kind == "flops" else None):
            result.files["pareto.png"] = os.path.join(out, "pareto.png")
    if best_pol is not None:
        Policy.parse(best_pol)  # the result is an ordinary policy
    return result


def _read_data(model, processor, calibration_data, heldout_data, answer_tokens: int, heldout: int, heldout_fn,
               synthetic: bool):
    """The user's records (or None: the synthetic splits), checked before the model runs."""
    from .records import check_disjoint, read_records

    if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 1:
        raise InputError("answer_tokens", f"greedy tokens generated for a record without an answer: an integer >= 1, "
                         f"got {answer_tokens!r}")
    if heldout_fn is not None and heldout_data is not None:
        raise InputError("heldout_data", "give heldout_data or heldout_fn, not both")
    cal = read_records(calibration_data, "calibration_data") if calibration_data is not None else None
    held = read_records(heldout_data, "heldout_data", require_answer=True) if heldout_data is not None else None
    if cal is not None and held is not None:
        check_disjoint(cal, held)
    model_type = getattr(model.config, "model_type", "?")
    if cal is None and not synthetic:
        raise InputError("calibration_data", f"this {model_type} model's tokenizer is not the shipped tiny VLM's, so the "
                         "synthetic calibration split means nothing to it; give calibration_data= (CLI "
                         "--calibration-data FILE.jsonl: one {\"image\", \"prompt\", \"answer\"} record per line)")
    if held is None and heldout > 0 and heldout_fn is None and not synthetic:
        raise InputError("heldout", f"this {model_type} model's tokenizer is not the shipped tiny VLM's, so the synthetic "
                         "held-out split means nothing to it; give heldout_data= (CLI --heldout-data FILE.jsonl, records "
                         "with answers) or heldout=0 (CLI --heldout 0: no held-out accuracy)")
    return cal, held


def _check_flops_geometry(model) -> None:
    """The FLOPs constraint counts the language model's geometry (``eval.flops``): refuse a family it cannot count."""
    from ..errors import UnsupportedModelError
    from ..eval.flops import unpruned_flops

    try:
        unpruned_flops(model.config, 8, 8)
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise UnsupportedModelError("model", f"the FLOPs constraint cannot count this {model.config.model_type} model's "
                                    f"geometry ({e}); eval.flops counts Llama-style text configs") from None


def _start(joint: JointSpace, spaces, sublayers: int, heads: int, feasible) -> list[int] | None:
    """The search's start: fixed counts for sublayers / heads, and the smallest level sum of the free
    sub-space (tokens if searched, else sublayers, else heads) whose even spread is feasible."""
    free = 0  # the first sub-space takes the budget
    counts = {"sublayers": sublayers, "heads": heads}
    fixed = []
    for i, s in enumerate(joint.spaces):
        if i == free:
            fixed.append(None)
            continue
        lv = s.canonical(counts.get(s.name, 0))
        if lv is None:
            return None
        fixed.append(lv)
    free_space = joint.spaces[free]
    total = 0
    while True:
        lv = free_space.canonical(total)
        if lv is None:
            return None
        cand = [x for part in (lv if f is None else f for f in fixed) for x in part]
        if feasible(tuple(cand)):
            return cand
        total += 1


def _write(out, result: SearchResult, res, joint: JointSpace, config: EvoConfig, budget: dict, spaces, n_text: int,
           n_visual: int, heldout: int, metric: str, data: dict | None = None) -> dict:
    import yaml

    from ..policy import Policy
    from .checkpoint import write_json_atomic

    os.makedirs(out, exist_ok=True)
    files = {}
    txt = result.policy or ""
    with open(os.path.join(out, "best.txt"), "w", encoding="utf-8") as f:
        f.write(txt + "\n")
    files["best.txt"] = os.path.join(out, "best.txt")
    if result.policy is not None:
        with open(os.path.join(out, "best.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(Policy.parse(result.policy).to_dict(), f, sort_keys=False)
        files["best.yaml"] = os.path.join(out, "best.yaml")
    summary = {"budget": budget, "space": list(spaces), "units": joint.units, "n_text": n_text,
               "n_visual": n_visual, "metric": metric, "data": data, "config": {**config.__dict__, "steps": [list(s) for s in config.steps]},
               "best": {"policy": result.policy, "levels": list(res.best), "flops_ratio": result.flops_ratio,
                        "fitness": result.fitness, "heldout_accuracy": result.accuracy, "heldout_examples": heldout,
                        "latency_ratio": result.latency_ratio},
               "seeds": result.seeds, "history": res.history, "rows": result.rows}
    write_json_atomic(os.path.join(out, "pareto.json"), summary)
    files["pareto.json"] = os.path.join(out, "pareto.json")
    return files
