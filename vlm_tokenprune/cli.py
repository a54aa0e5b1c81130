"""``vlm-tokenprune``: list methods, explain a policy's cost, run the shipped tiny VLM, benchmark, profile, draw.

    vlm-tokenprune methods
    vlm-tokenprune explain "fastv:layer=2,keep=0.5" [--model-config llava-1.5-7b | path/to/config.json]
    vlm-tokenprune demo [--policy "fastv:layer=2,keep=0.25"] [--n 10]
    vlm-tokenprune bench --policy fastv [--policy uniform ...] [--budgets 0.5,0.25,0.11] [--n 500] [--out DIR]
    vlm-tokenprune profile --model {tiny,llava-1.5-7b,llava-next-7b,qwen2-vl-7b,PATH} --policy P [--iters 20] [--json F]
    vlm-tokenprune viz [--image IMG --question Q] --policy P --out kept.png
    vlm-tokenprune train {covipal,...} [trainer options]   (learned selectors; `train NAME --help`)

Exit status: 0 on success, 2 for a bad policy, option or config (the message names the field).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Sequence

from .errors import VTPError

PROG = "vlm-tokenprune"

_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000)
_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064)
# name -> (text-config numbers, visual tokens per prompt, description)
KNOWN_MODELS: dict[str, tuple[dict | None, int, str]] = {
    "llava-1.5-7b": (_VICUNA_7B, 576, "LLaVA-1.5-7B: Vicuna-7B LLM, CLIP ViT-L/14-336 -> 24x24 = 576 visual tokens"),
    "llava-next-7b": (_VICUNA_7B, 2880, "LLaVA-NeXT-7B: Vicuna-7B LLM, anyres up to 5 x 576 = 2880 visual tokens"),
    "tiny": (None, 256, "the shipped trained tiny LLaVA of `vlm-tokenprune demo` (vlm_tokenprune/assets/tiny_vlm)"),
    # the newer families (text numbers from the released config.json; visual tokens for one typical image)
    "llava-onevision-7b": (_QWEN2_7B | {"vocab_size": 152128}, 3699,
                           "LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf): Qwen2-7B LLM, SigLIP 384/14, "
                           "one 768x768 image: 27x27 = 729 base + 2x2 crops unpadded to 54x54 = 2916 + 54 newlines"),
    "internvl3-2b": (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, vocab_size=151674), 1792,
                     "InternVL3-2B (OpenGVLab/InternVL3-2B-hf): Qwen2.5-1.5B LLM, InternViT-300M 448/14 + 0.5 pixel "
                     "shuffle -> 256 tokens per tile; 6 tiles + thumbnail = 1792 visual tokens"),
    "internvl3-8b": (_QWEN2_7B | {"vocab_size": 151674}, 1792,
                     "InternVL3-8B (OpenGVLab/InternVL3-8B-hf): Qwen2.5-7B LLM, 256 tokens per 448 px tile; "
                     "6 tiles + thumbnail = 1792 visual tokens"),
    "qwen3-vl-2b": (dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936), 1024,
                    "Qwen3-VL-2B-Instruct: 28 x 2048 LLM (GQA 16/8 x 128), ViT patch 16 + 2x2 merge: one 1024x1024 "
                    "image -> 32x32 = 1024 visual tokens; DeepStack after layers 0-2"),
    "qwen3-vl-8b": (dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936), 1024,
                    "Qwen3-VL-8B-Instruct: 36 x 4096 LLM (GQA 32/8 x 128), one 1024x1024 image -> 1024 visual tokens; "
                    "DeepStack after layers 0-2"),
    "qwen3-vl-30b-a3b": (dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                              num_experts_per_tok=8, moe_intermediate_size=768), 1024,
                         "Qwen3-VL-30B-A3B-Instruct (MoE): 48 x 2048 LLM, 8 of 128 experts of width 768 per token, "
                         "one 1024x1024 image -> 1024 visual tokens"),
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
WIDTH = 100  # columns of `methods` (a stage string that holds a file path may run past it: it must stay one line)


def compact_stage(st: Any) -> str:
    """``st`` as a stage string that parses back to exactly ``st``: ``Stage.describe()`` without the parameters
    whose default gives the same stage (where, budget and positions always shown), so a line of `methods` can
    be copied into a policy."""
    from . import Policy

    text = st.describe()
    name, _, rest = text.partition(":")
    items = [x for x in rest.split(",") if x] if rest else []
    fixed = {"layer", "depth", "site", "keep", "tokens", "of", "rounding", "positions"}
    for item in list(items):
        if item.partition("=")[0] in fixed and not st.structural:
            continue
        trial = [x for x in items if x != item]
        candidate = f"{name}:{','.join(trial)}" if trial else name
        try:
            if Policy.parse(candidate).stages == (st,):
                items = trial
        except VTPError:
            continue
    return f"{name}:{','.join(items)}" if items else name


def _wrapped(text: str, indent: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * indent,
                         break_long_words=False, break_on_hyphens=False) or [""]


def cmd_methods(args: argparse.Namespace) -> int:
    from . import CRITERIA, PRESETS, Policy

    lines = ["Presets: the first word of a policy string, listed with stages that parse back to the same policy",
             "(copy them to change a layer or a budget); depth=32: a paper's layer for a 32-layer LLM, mapped to",
             "the model's depth by patch(). Keys override a one-stage preset (layer, keep, tokens, criterion",
             "params); a multi-stage one takes its criteria's params and rounding.", ""]
    for name, preset in PRESETS.items():
        lines.append(f"{name}" + (f"  [arXiv {preset.arxiv}]" if preset.arxiv else ""))
        try:
            stages = [compact_stage(s) for s in Policy.parse(name).stages]
        except VTPError as e:  # needs an argument (e.g. a calibration file made for the model)
            lines += _wrapped(f"(needs arguments: {e})", 6)
            stages = []
        for i, st in enumerate(stages):
            lines.append(("    = " if i == 0 else "    + ") + st)
        lines += _wrapped(preset.description, 4)
    lines += ["", "Criteria: how a stage scores visual tokens (higher = keep); params with their defaults.", ""]
    for name, crit in CRITERIA.items():
        arxiv = getattr(crit, "arxiv", None)
        lines.append(f"{name}" + (f"  [arXiv {arxiv}]" if arxiv else ""))
        lines += _wrapped(getattr(crit, "paper", "") or "", 4)
        params = ", ".join(f"{k}={p.default!r}" for k, p in crit.params.items())
        if params:
            lines += _wrapped("params: " + params, 4)
    print("\n".join(lines))
    return 0


# -- explain -------------------------------------------------------------------------------------
def _n_visual_from_config(cfg: Any) -> int | None:
    """Visual tokens per prompt from a LLaVA / LLaVA-NeXT config (NeXT: the largest anyres grid, before unpadding)."""
    vc = getattr(cfg, "vision_config", None)
    if vc is None or not getattr(vc, "image_size", None) or not getattr(vc, "patch_size", None):
        return None
    if getattr(cfg, "model_type", "llava") not in ("llava", "llava_next"):
        return None  # other families' token counts depend on the image (tiles, dynamic resolution): --n-visual
    side = vc.image_size // vc.patch_size
    per_tile = side * side + (1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0)
    if getattr(cfg, "model_type", None) == "llava_next":
        pins = getattr(cfg, "image_grid_pinpoints", None) or [[vc.image_size, vc.image_size]]
        tiles = max((h // vc.image_size) * (w // vc.image_size) for h, w in pins)
        return per_tile * (1 + tiles)
    return per_tile


_TOWER_TYPES = {"llava": "clip_vision_model", "llava_next": "clip_vision_model", "llava_onevision": "siglip_vision_model",
                "qwen2_vl": "qwen2_vl"}  # profile's geometries whose tower eval.flops counts


def _with_tower(text: dict, geo: dict | None) -> dict:
    """Text numbers plus the geometry's vision tower (so explain counts tower + projector FLOPs), when known."""
    if geo is None or geo.get("family") not in _TOWER_TYPES:
        return text
    return {"text_config": dict(text), "vision_config": {**geo["vision"], "model_type": _TOWER_TYPES[geo["family"]]}}


def _load_model_config(spec: str) -> tuple[Any, int | None, str]:
    """``spec``: a known name or a path to a config.json -> (config or text numbers, visual tokens, description)."""
    from .errors import InputError

    from .eval.profiler import KNOWN_GEOMETRIES

    if spec not in KNOWN_MODELS and spec in KNOWN_GEOMETRIES:  # profile's random-weight geometries
        geo = KNOWN_GEOMETRIES[spec]
        vis = geo["vision"]
        if geo["family"] == "qwen2_vl":  # the merged grid of the one image profile builds
            n_visual = geo["grid"][0] * geo["grid"][1]
        else:
            n_visual = (vis["image_size"] // vis["patch_size"]) ** 2
        return _with_tower(dict(geo["text"]), geo), n_visual, geo["description"]
    if spec in KNOWN_MODELS:
        numbers, n_visual, desc = KNOWN_MODELS[spec]
        if numbers is None:  # tiny: the shipped model's config (no weights loaded)
            from transformers import AutoConfig

            from .eval.tiny_vlm import ASSET_DIR

            numbers = AutoConfig.from_pretrained(ASSET_DIR)
            n_visual = _n_visual_from_config(numbers) or n_visual
        elif spec in KNOWN_GEOMETRIES:
            numbers = _with_tower(numbers, KNOWN_GEOMETRIES[spec])
        return numbers, n_visual, desc
    if not os.path.isfile(spec):
        raise InputError("--model-config", f"{spec!r} is neither a known model ({', '.join(model_names())}) nor a "
                         "config.json file")
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


def model_names() -> list[str]:
    """Every name ``explain`` / ``profile`` know: explain's geometries, then profile's."""
    from .eval.profiler import KNOWN_GEOMETRIES

    return list(dict.fromkeys([*KNOWN_MODELS, *KNOWN_GEOMETRIES]))


def read_policy(spec: str, family: str | None = None) -> Any:
    """A policy argument: a policy string, or the path of a YAML / JSON policy file (``Policy.parse`` reads both);
    ``family``: the model family a family preset (``flowcut``) takes its setting for."""
    from . import Policy

    return Policy.parse(spec, family=family)


def _family(spec: str, cfg: Any) -> str | None:
    """The ``model_type`` of an explain geometry (a known name, profile's geometry or a config)."""
    from .eval.profiler import KNOWN_GEOMETRIES

    named = {"llava-1.5-7b": "llava", "llava-next-7b": "llava_next", "tiny": "llava"}
    if spec in named:
        return named[spec]
    if spec in KNOWN_GEOMETRIES:
        return KNOWN_GEOMETRIES[spec]["family"]
    return cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)


def _estimate_calibrated_heads(pol: Any, num_layers: int, num_heads: int) -> tuple[Any, list[str]]:
    """``prune_heads`` stages with a calibration file and ``kept``: which heads is the model's, their number is not.

    Returns the policy with those stages written out as ``round((1 - kept) * heads)`` pruned heads per layer
    from ``keep_first`` on (heads 0.. of each layer: KV groups filled first, so k/v savings are optimistic), and
    a note per estimated stage. Other calibrated stages are left for ``structural_flops`` to refuse.
    """
    from . import Policy

    stages, notes = [], []
    for i, st in enumerate(pol.stages):
        p = dict(st.params)
        if st.op == "prune_heads" and "calibration" in p and p.get("kept") is not None:
            n_pruned = round((1 - p["kept"]) * num_heads)
            first = p.get("keep_first", 0)
            heads = ";".join(f"{j}/{h}" for j in range(first, num_layers) for h in range(n_pruned))
            if heads:
                stages.append(Policy.parse(f"prune_heads:heads={heads},scope={p.get('scope', 'visual')}").stages[0])
            notes.append(f"stage {i}: heads from a calibration file: estimated as {n_pruned} of {num_heads} heads "
                         f"pruned in layers {first}..{num_layers - 1} (kept={p['kept']:g}); patch() picks them")
            continue
        stages.append(st)
    return (Policy(tuple(stages)), notes) if notes else (pol, [])


def cmd_explain(args: argparse.Namespace) -> int:
    from . import CRITERIA
    from .errors import InputError
    from .eval.flops import FORMULA, VISION_FORMULA, TextGeometry, policy_flops

    cfg, n_visual, desc = _load_model_config(args.model_config)  # a bad model name before a slow parse
    requested = read_policy(args.policy, _family(args.model_config, cfg))
    if args.n_visual is not None:
        n_visual = args.n_visual
    if n_visual is None:
        raise InputError("--n-visual", f"cannot be derived from {args.model_config}; pass it")
    if n_visual < 1 or args.n_text < 0:
        raise InputError("--n-visual/--n-text", f"need n_visual >= 1 and n_text >= 0, got {n_visual}, {args.n_text}")
    g = TextGeometry.of(cfg)
    pol = requested.at_depth(g.num_hidden_layers)  # a preset's paper layers on this model (as patch() does)
    counted, estimated = _estimate_calibrated_heads(pol, g.num_hidden_layers, g.num_attention_heads)
    structural = [st for st in pol.stages if st.criterion is None]
    res = policy_flops(cfg, counted, args.n_text, n_visual)  # the config: tower + projector counted where known
    if structural:  # layer skips, head pruning, FFN cuts...: what this implementation really computes
        from .eval.flops import structural_flops

        sf = structural_flops(g, counted, args.n_text, n_visual)
        rest = res["flops"] - res["llm_flops"]  # tower + projector (structural ops act in the LLM only)
        res.update({k: v for k, v in sf.items() if k in ("mask_only", "partial")})
        res.update(llm_flops=sf["flops"], llm_ratio=sf["ratio"], flops=rest + sf["flops"],
                   ratio=(rest + sf["flops"]) / res["baseline_flops"],
                   nominal_flops=rest + sf["nominal_flops"], nominal_ratio=(rest + sf["nominal_flops"]) / res["baseline_flops"],
                   llm_nominal_ratio=sf["nominal_ratio"])
    if args.json:
        print(json.dumps({"policy": pol.to_dict(), "requested_policy": requested.to_dict(), "estimated": estimated,
                          "model": args.model_config, "n_text": args.n_text, "n_visual": n_visual, "formula": FORMULA,
                          **res}, indent=2))
        return 0
    if requested != pol:
        print(f"policy as written: {requested.to_string()}")
        print(f"  (layers with depth=R are a paper's for an R-layer LLM: mapped to this model's "
              f"{g.num_hidden_layers} layers by Policy.at_depth, as patch() does)")
    print(f"policy: {pol.to_string()}")
    for note in estimated:
        print(f"  estimate: {note}")
    for i, st in enumerate(pol.stages):
        if st.criterion is None:
            print(f"  stage {i}: {st.describe()}  (site {st.site}, op {st.op})")
            continue
        crit = CRITERIA.get(st.criterion)
        ref = f"  [{crit.paper}{', arXiv ' + crit.arxiv if crit.arxiv else ''}]" if crit.paper else ""
        if st.is_pre_llm:
            print(f"  stage {i}: {st.describe()}  (site {st.site}, op {st.op}; reduces the language model's input, "
                  f"before layer 0){ref}")
            continue
        if st.is_vision:
            print(f"  stage {i}: {st.describe()}  (site {st.site}, op {st.op}; between vision-encoder layers, budget "
                  f"per crop; the LLM sees the kept tokens from layer 0){ref}")
            continue
        after = ("; among the tokens the pre_llm stage left, keep counted of the original visual tokens"
                 if any(s.is_pre_llm for s in pol.stages[:i]) else "")
        print(f"  stage {i}: {st.describe()}  (site {st.site}, op {st.op}; scores on layer {st.layer - 1}'s input, "
              f"drops before layer {st.layer}{after}){ref}")
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
    if res["vision_flops"] is not None:
        print(f"             {VISION_FORMULA}")
    print(f"  baseline : {_tflops(res['baseline_flops'])}")
    print(f"  policy   : {_tflops(res['flops'])}")
    print(f"  ratio    : {res['ratio']:.4f} of baseline ({100 * res['ratio']:.1f} %, {1 / res['ratio']:.2f}x fewer)"
          f"{'  (vision tower + projector + LLM)' if res['vision_flops'] is not None else '  (LLM only: no known tower)'}")
    for part, key in (("LLM", "llm"), ("vision", "vision"), ("projector", "projector")):
        if res[f"{key}_flops"] is not None:
            b = res[f"{key}_baseline_flops"]
            print(f"    {part:9s}: {_tflops(res[f'{key}_flops'])} of {_tflops(b)}"
                  f" (ratio {res[f'{key}_flops'] / b:.4f})" if b else f"    {part:9s}: 0")
    if res["vision_upper_bound_stages"]:
        which = ", ".join(str(i) for i in res["vision_upper_bound_stages"])
        print(f"    (stage(s) {which}: the tower is counted at full length, an upper bound: the criterion's in-tower "
              "schedule depends on the image; trace_flops on handle.last_trace() counts what each layer saw)")
    if structural:
        print(f"  nominal  : {res['nominal_ratio']:.4f} of baseline (what the operations' semantics allow)")
        for key, what in (("mask_only", "simulated with masks, no saving"), ("partial", "savings only partly realised")):
            if res.get(key):
                print(f"  {what}: {', '.join(map(str, res[key]))}")
    if g.experts_per_token:  # MoE: routing is per token, so a pruned token's experts never run
        per_token = 2 * 3 * g.hidden_size * g.intermediate_size  # its k active experts' SwiGLU, every layer
        base_t = (args.n_text + n_visual) * g.num_hidden_layers
        kept_t = sum(res["tokens_per_layer"])
        print(f"  experts  : {g.experts_per_token} of {g.num_experts} per token (active MLP width {g.intermediate_size}, "
              f"included above): baseline {_tflops(per_token * base_t)}, policy {_tflops(per_token * kept_t)}, "
              f"saved {_tflops(per_token * (base_t - kept_t))} (pruned tokens route to no expert)")
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
    from .errors import InputError
    from .eval import profiler
    from .eval.bench import accuracy, evaluate_policy
    from .eval.synthetic import make_split
    from .eval.tiny_vlm import ASSET_DIR, load_tiny_vlm

    pol = Policy.parse(args.policy)  # a policy string or a YAML / JSON file
    if args.n < 1 or args.repeats < 0 or args.batch_size < 1:
        raise InputError("--n/--repeats/--batch-size", f"need n >= 1, repeats >= 0 (0: no timing), batch size >= 1; "
                         f"got {args.n}, {args.repeats}, {args.batch_size}")
    torch.set_num_threads(args.threads)
    model, processor = load_tiny_vlm()
    h = patch(model, pol)  # validate against the model before doing anything
    resolved = h.policy  # a preset's paper layers mapped to this model's depth (Policy.at_depth)
    h.unpatch()
    examples = make_split("test", args.n)
    base = evaluate_policy(model, processor, examples, None, batch_size=args.batch_size)
    pruned = evaluate_policy(model, processor, examples, pol, batch_size=args.batch_size)

    # measured LM prefill of the first question, interleaved with the unpatched model
    inputs = profiler.to_device(profiler.tiny_inputs(processor, 1), model)
    # vision-site policies time their LM prefill on their own tower's features (LMPrefillCall.prepare)
    if args.repeats:
        prefill = profiler.LMPrefillCall(model, inputs, profiler.encode_images(model, inputs))
        t = profiler.interleaved(model, pol, {"prefill": prefill}, iters=args.repeats, warmup=1, device=model.device)
        tb, tp = statistics.median(t["prefill"]["baseline"]), statistics.median(t["prefill"]["patched"])
        scoring_s = statistics.median(t["stage_seconds"])

    tc, vc = model.config.text_config, model.config.vision_config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo model: the shipped trained tiny LLaVA ({ASSET_DIR}), {n_params / 1e6:.2f} M parameters: "
          f"CLIP-style tower {vc.num_hidden_layers} x {vc.hidden_size} ({vc.image_size} px, patch {vc.patch_size} -> "
          f"{(vc.image_size // vc.patch_size) ** 2} visual tokens), Llama {tc.num_hidden_layers} x {tc.hidden_size}; "
          f"{args.threads} torch thread(s)")
    if resolved != pol:
        print(f"policy as written: {pol.to_string()}")
    print(f"policy: {resolved.to_string()}" + ("  (layers mapped to this model's depth)" if resolved != pol else ""))
    print()
    print(f"{len(examples)} questions from the synthetic test split (greedy answers):")
    rows = [[str(i), e["qtype"], e["question"], e["answer"], b, p]
            for i, (e, b, p) in enumerate(zip(examples, base["predictions"], pruned["predictions"]))]
    print(_table(rows, ["#", "type", "question", "answer", "baseline", "pruned"]))
    acc_b, acc_p = accuracy(examples, base["predictions"]), accuracy(examples, pruned["predictions"])
    n_ok = lambda preds: sum(p == e["answer"] for p, e in zip(preds, examples))  # noqa: E731
    print(f"accuracy: baseline {acc_b['all']:.2f} ({n_ok(base['predictions'])}/{len(examples)}), "
          f"pruned {acc_p['all']:.2f} ({n_ok(pruned['predictions'])}/{len(examples)})")
    print()
    print("tokens per decoder layer (question 0; the mean over all questions in brackets):")
    print(_table([[str(j), str(a), f"{b} ({m:.1f})"] for j, (a, b, m) in
                  enumerate(zip(base["tokens_per_example"][0], pruned["tokens_per_example"][0], pruned["tokens_per_layer"]))],
                 ["layer", "baseline", "pruned"]))
    print()
    print(f"theoretical prefill FLOPs ratio: {pruned['flops_ratio']:.3f} (eval/flops.py on each question's own "
          f"tokens per layer, summed over the {len(examples)} questions)")
    if not args.repeats:
        print("measured LM prefill latency: n/a (--repeats 0)")
        return 0
    print(f"measured LM prefill latency (question 0, image features precomputed): baseline {1e3 * tb:.2f} ms, "
          f"pruned {1e3 * tp:.2f} ms (median of {args.repeats}, interleaved); ratio {tp / tb:.3f}")
    print(f"scoring + selection: {1e3 * scoring_s:.2f} ms ({100 * scoring_s / tb:.1f} % of the baseline prefill)")
    print("  (a model this small is dominated by per-call overhead; `vlm-tokenprune profile` and "
          "benchmarks/prefill.py time larger geometries)")
    return 0


# -- bench / profile / viz -------------------------------------------------------------------------
def _budgets(text: str | None) -> list[float] | None:
    from .errors import InputError

    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError("--budgets", f"{text!r}; expected keep fractions joined with commas, e.g. 0.5,0.25,0.11") from None


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .eval.bench import markdown_table, run_bench, write_outputs

    torch.set_num_threads(args.threads)
    result = run_bench(args.policy, _budgets(args.budgets), n=args.n, batch_size=args.batch_size, model_path=args.model,
                       timing_iters=args.timing_iters, backend=args.backend, progress=not args.no_progress)
    paths = write_outputs(result, args.out)
    print(markdown_table(result))
    print()
    print("wrote " + ", ".join(paths.values()))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """EvoPress search (arXiv 2410.14649) for the best policy under a FLOPs budget (``vlm_tokenprune.search``)."""
    import torch

    from .eval.tiny_vlm import load_tiny_vlm
    from .search.api import search_policy

    torch.set_num_threads(args.threads)
    model, processor = load_tiny_vlm(path=None if args.model == "tiny" else args.model)
    if args.per_sample:
        return _per_sample(args, model, processor)
    res = search_policy(
        model, processor, args.budget, space=args.space, calibration=args.calibration, batch_size=args.batch_size,
        generations=args.generations, offspring=args.offspring, seed=args.seed, criterion=args.criterion,
        entry=None if args.entry == "none" else args.entry, levels=args.levels, sublayers=args.sublayers, heads=args.heads,
        heldout=args.heldout, heldout_top=args.heldout_top, out=args.out, resume=args.resume, progress=not args.no_progress,
    )
    acc = "-" if res.accuracy is None else f"{res.accuracy:.3f}"
    print(f"best policy: {res.policy or '(none: the unpruned model)'}")
    print(f"predicted FLOPs ratio {res.flops_ratio:.3f}, KL {res.fitness:.5f}, held-out accuracy {acc}")
    print("wrote " + ", ".join(res.files.values()))
    return 0


def _per_sample(args: argparse.Namespace, model: Any, processor: Any) -> int:
    """CoLa (arXiv 2507.07996): the best layer chain per held-out example by MCTS (analysis only)."""
    import json
    import os

    from .eval.synthetic import make_split
    from .search.cola import per_sample
    from .search.data import processor_image_size

    rows = per_sample(model, processor, make_split("test", args.samples, image_size=processor_image_size(processor)),
                      simulations=args.simulations, length_penalty=args.length_penalty, seed=args.seed,
                      progress=not args.no_progress)
    print(_table([[r["qtype"], r["answer"], f"{r['full_probability']:.3f}", "-".join(map(str, r["chain"])),
                   f"{r['chain_probability']:.3f}", str(len(r["chain"]))] for r in rows],
                 ["question", "answer", "p(answer) full", "best chain", "p(answer) chain", "layers run"]))
    print("analysis only: each chain is found with the answer in hand; serving per-sample chains needs a predictor "
          "of the chain from the input, which CoLa (arXiv 2507.07996) does not give")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "per_sample.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"simulations": args.simulations, "length_penalty": args.length_penalty, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from .eval import profiler

    torch.set_num_threads(args.threads)
    report = profiler.profile(
        args.model, args.policy or ["fastv:layer=2,keep=0.25"], iters=args.iters, warmup=args.warmup, layers=args.layers,
        vision_layers=args.vision_layers, dtype=args.dtype, attn_implementation=args.attn, device=args.device,
        batch=args.batch, n_text=args.n_text, seed=args.seed, backend=args.backend, ttft=not args.no_ttft,
        parts=not args.no_parts, json_path=args.json,
    )
    print(profiler.format_report(report))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    import torch

    from .errors import InputError
    from .eval import profiler
    from .eval.visualize import kept_tokens_figure

    torch.set_num_threads(args.threads)
    if (args.image is None) != (args.question is None):
        raise InputError("--image/--question", "give both, or neither (then a synthetic test-split question is used)")
    if args.image is None:
        from .eval.synthetic import QTYPES, make_example, split_seeds

        ex = make_example(split_seeds("test", args.example + 1)[args.example], QTYPES[args.example % len(QTYPES)])
        image, question = ex["image"], ex["question"]
        print(f"synthetic test example {args.example}: {question!r} (answer {ex['answer']!r})")
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.image).convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise InputError("--image", f"cannot read {args.image}: {e}") from None
        question = args.question
    if args.model == "tiny":
        from .eval.tiny_vlm import load_tiny_vlm

        model, processor = load_tiny_vlm()
    else:
        if not os.path.isdir(args.model):
            raise InputError("--model", f"{args.model!r} is neither 'tiny' nor a local checkpoint folder")
        model, processor = profiler.load_vlm(args.model, dtype=args.dtype)
    fig = kept_tokens_figure(model, processor, image=image, question=question, policy=args.policy, out=args.out)
    print(f"wrote {args.out} ({fig.size[0]}x{fig.size[1]} px)")
    return 0


def trainers() -> list[str]:
    """Names of the trainer modules in ``vlm_tokenprune.train`` (each has ``main(argv)``)."""
    import pkgutil

    from . import train

    return sorted(m.name for m in pkgutil.iter_modules(train.__path__) if m.name != "common" and not m.name.startswith("_"))


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    from .errors import InputError

    names = trainers()
    if args.name not in names:
        raise InputError("train", f"unknown trainer {args.name!r}; allowed: {', '.join(names)}")
    return importlib.import_module(f"{__package__}.train.{args.name}").main(list(args.args))


# -- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog=PROG, description="Inference-time visual-token pruning for Hugging Face VLMs.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("methods", help="list the registered presets and criteria")
    m.set_defaults(func=cmd_methods)

    e = sub.add_parser("explain", help="parse a policy and predict its tokens per layer and prefill FLOPs")
    e.add_argument("policy", help='a policy string, e.g. "fastv:layer=2,keep=0.5", or a YAML / JSON policy file')
    e.add_argument("--model-config", default="llava-1.5-7b", metavar="NAME|PATH",
                   help="a known geometry (" + ", ".join(model_names()) + ") or a path to a Hugging Face config.json "
                   "(default: llava-1.5-7b)")
    e.add_argument("--n-text", type=int, default=64, help="text tokens in the prompt, system prompt included (default 64)")
    e.add_argument("--n-visual", type=int, default=None, help="visual tokens (default: from the model)")
    e.add_argument("--json", action="store_true", help="print the prediction as JSON")
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("demo", help="answer a few synthetic questions with the shipped tiny VLM, with and without a policy (offline)")
    d.add_argument("--policy", default="fastv:layer=2,keep=0.25", help="a policy string or a YAML / JSON policy file (default fastv:layer=2,keep=0.25)")
    d.add_argument("--n", type=int, default=10, help="questions from the synthetic test split (default 10, types balanced)")
    d.add_argument("--batch-size", type=int, default=8, help="questions per generate() batch (default 8)")
    d.add_argument("--repeats", type=int, default=7, help="timed prefills of each kind (default 7; 0: no timing, n/a)")
    d.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="offline benchmark on the shipped tiny VLM: accuracy, tokens, FLOPs, prefill ratio")
    b.add_argument("--policy", action="append", required=True, help="a policy string or a YAML / JSON policy file (repeat for several)")
    b.add_argument("--budgets", default=None, help="keep fractions, e.g. 0.5,0.25,0.11 (multi-stage: see README)")
    b.add_argument("--n", type=int, default=500, help="test-split examples (default 500)")
    b.add_argument("--batch-size", type=int, default=8, help="examples per generate() batch (default 8)")
    b.add_argument("--out", default="vtp_bench", help="output folder for bench.json / .md / .png (default ./vtp_bench)")
    b.add_argument("--model", default=None, help="a checkpoint folder in the tiny VLM's format (default: the shipped one)")
    b.add_argument("--timing-iters", type=int, default=5,
                   help="interleaved prefills timed per policy (default 5; 0: none, the prefill ratio reads n/a)")
    b.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="where the hot ops run: auto (Triton on CUDA when installed), torch, triton (default auto)")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    b.set_defaults(func=cmd_bench)

    se = sub.add_parser("search", help="EvoPress search for the best policy under a FLOPs budget (token budgets, "
                        "FinerCut sublayers, heads); writes best.yaml and a Pareto table")
    se.add_argument("--model", default="tiny", help="tiny (the shipped tiny VLM) or a checkpoint folder in its format")
    se.add_argument("--budget", default="flops=0.3", help="flops=R: predicted LM prefill FLOPs ratio <= R (default 0.3)")
    se.add_argument("--space", default="tokens", help="comma list of tokens, sublayers, heads (default tokens)")
    se.add_argument("--calibration", type=int, default=64, help="calibration examples (synthetic val split; default 64)")
    se.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8)")
    se.add_argument("--generations", type=int, default=20, help="evolution generations (default 20)")
    se.add_argument("--offspring", type=int, default=16, help="children per generation (default 16)")
    se.add_argument("--seed", type=int, default=0, help="random seed of the search (default 0)")
    se.add_argument("--criterion", default="fastv", help="criterion of the LLM token stages (default fastv)")
    se.add_argument("--entry", default="auto", help="stage before the LLM as a policy fragment (e.g. mctf:layer=0), "
                    "auto (MCTF where the model has a CLIP tower) or none")
    se.add_argument("--levels", type=int, default=16, help="token budget levels: keep 1, 1-1/L, ..., 1/L (default 16)")
    se.add_argument("--sublayers", type=int, default=2, help="removed sublayers when the space has sublayers (default 2)")
    se.add_argument("--heads", type=int, default=4, help="heads pruned for visual tokens when the space has heads (default 4)")
    se.add_argument("--heldout", type=int, default=200, help="held-out examples (synthetic test split; default 200)")
    se.add_argument("--heldout-top", type=int, default=8, help="candidates besides the best scored on the held-out split")
    se.add_argument("--out", default="vtp_search", help="output folder (default ./vtp_search)")
    se.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.json")
    se.add_argument("--per-sample", action="store_true", help="CoLa (2507.07996) analysis: the best chain of skipped / "
                    "repeated layers per test example by MCTS (writes OUT/per_sample.json)")
    se.add_argument("--samples", type=int, default=5, help="--per-sample: test examples (default 5)")
    se.add_argument("--simulations", type=int, default=200, help="--per-sample: MCTS simulations per example")
    se.add_argument("--length-penalty", type=float, default=0.1, help="--per-sample: reward = p(answer) - penalty x "
                    "chain length / layers (default 0.1)")
    se.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    se.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    se.set_defaults(func=cmd_search)

    from .eval.profiler import MODEL_CHOICES

    pr = sub.add_parser("profile", help="prefill latency, TTFT, peak memory, tokens and FLOPs of policies vs the baseline")
    pr.add_argument("--model", default="tiny", metavar="{" + ",".join(MODEL_CHOICES) + "}|PATH",
                    help="the shipped tiny VLM, a known geometry (random weights from its config) or a local checkpoint")
    pr.add_argument("--policy", action="append", help="a policy string or a YAML / JSON policy file (repeat for several; default fastv:layer=2,keep=0.25)")
    pr.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    pr.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    pr.add_argument("--iters", type=int, default=20, help="timed prefills per policy and kind (default 20)")
    pr.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones (default 2)")
    pr.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (to fit a CPU)")
    pr.add_argument("--vision-layers", type=int, default=None, help="vision tower depth of a built geometry")
    pr.add_argument("--batch", type=int, default=1, help="rows of the built prompt batch (default 1)")
    pr.add_argument("--n-text", type=int, default=64, help="text tokens of the built prompt (default 64)")
    pr.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps")
    pr.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                    help="where the hot ops run: auto (Triton on CUDA when installed), torch, triton (default auto)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default 0)")
    pr.add_argument("--no-ttft", action="store_true", help="skip the generate(max_new_tokens=1) timings")
    pr.add_argument("--no-parts", action="store_true",
                    help="skip the forward-from-pixels timings split into vision tower (+ projector) and language model")
    pr.add_argument("--json", default=None, help="write the report as JSON")
    pr.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    pr.set_defaults(func=cmd_profile)

    v = sub.add_parser("viz", help="draw each stage's kept visual tokens on the image (one panel per stage)")
    v.add_argument("--policy", required=True, help="a policy string or a YAML / JSON policy file")
    v.add_argument("--out", default="kept.png", help="the PNG to write (default kept.png)")
    v.add_argument("--image", default=None, help="an image file (default: a synthetic test-split image)")
    v.add_argument("--question", default=None, help="the question asked about --image (give both or neither)")
    v.add_argument("--example", type=int, default=1, help="synthetic test example used without --image (default 1)")
    v.add_argument("--model", default="tiny", help="tiny (the shipped VLM) or a local checkpoint folder")
    v.add_argument("--dtype", default="auto", help="auto (fp32 for the tiny VLM), fp32, bf16, fp16 (a checkpoint)")
    v.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    v.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    v.set_defaults(func=cmd_viz)

    t = sub.add_parser("train", help="train a learned selector (covipal, ...): `train NAME --help` lists its options")
    t.add_argument("name", help="the trainer: vlm_tokenprune.train.NAME (e.g. covipal)")
    t.add_argument("args", nargs=argparse.REMAINDER, help="the trainer's own options")
    t.set_defaults(func=cmd_train)
    return p


# -- argument checks (before any model is loaded) ------------------------------------------------------
_AT_LEAST = {  # attribute -> (flag, smallest allowed value)
    "threads": ("--threads", 1), "n": ("--n", 1), "batch_size": ("--batch-size", 1), "batch": ("--batch", 1),
    "repeats": ("--repeats", 0), "iters": ("--iters", 1), "warmup": ("--warmup", 0), "timing_iters": ("--timing-iters", 0),
    "layers": ("--layers", 1), "vision_layers": ("--vision-layers", 1), "n_text": ("--n-text", 0),
    "n_visual": ("--n-visual", 1), "example": ("--example", 0),
}


def _writable_target(path: str, flag: str, folder: bool = False) -> None:
    """``path`` can be written: an existing file / folder we may write, or a new one in a writable folder."""
    from .errors import InputError

    target = os.path.abspath(path)
    if os.path.exists(target):
        if folder != os.path.isdir(target):
            raise InputError(flag, f"{path!r} exists and is {'not ' if folder else ''}a folder")
        if not os.access(target, os.W_OK):
            raise InputError(flag, f"{path!r} is not writable")
        return
    parent = os.path.dirname(target)
    while folder and parent and not os.path.exists(parent):  # bench creates the missing folders
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise InputError(flag, f"cannot write {path!r}: {parent!r} is not a writable folder")


def check_args(args: argparse.Namespace) -> None:
    """Every option of the command, checked before a model (or data) is loaded; an ``InputError`` naming the flag."""
    from .errors import InputError

    for attr, (flag, low) in _AT_LEAST.items():
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise InputError(flag, f"must be an integer >= {low}, got {value}")
    if getattr(args, "example", None) is not None:
        from .eval.synthetic import SPLIT_SEED_SPAN

        if args.example >= SPLIT_SEED_SPAN:
            raise InputError("--example", f"must be below {SPLIT_SEED_SPAN} (the test split's size), got {args.example}")
    device = getattr(args, "device", None)
    if device is not None and device != "auto":
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise InputError("--device", f"{device!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise InputError("--device", f"{device!r} is not available here (torch.cuda.is_available() is "
                             f"{torch.cuda.is_available()})")
        if dev.type not in ("cpu", "cuda", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()):
            raise InputError("--device", f"{device!r} is not available here; allowed: auto, cpu, cuda, cuda:N, mps")
    dtype = getattr(args, "dtype", None)
    if dtype is not None:
        from .eval.profiler import DTYPES

        if dtype != "auto" and dtype not in DTYPES:
            raise InputError("--dtype", f"{dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    attn = getattr(args, "attn", None)
    if attn is not None:
        from .compat import attention_names

        allowed = attention_names()
        if attn not in allowed:
            raise InputError("--attn", f"{attn!r}; allowed: {', '.join(allowed)}")
    policies = getattr(args, "policy", None)
    if policies is not None and args.command in ("demo", "bench", "profile", "viz"):
        from . import Policy

        texts = policies if isinstance(policies, list) else [policies]
        if len(texts) > 1:  # several: every malformed one reported together (issue 16), still before any model
            from .eval.bench import parse_all

            parse_all(texts, "--policy")
        for text in texts:
            Policy.parse(text)
    if args.command == "bench":
        _writable_target(args.out, "--out", folder=True)
        _budgets(args.budgets)
        if args.model is not None and not os.path.isdir(args.model):
            raise InputError("--model", f"{args.model!r} is not a checkpoint folder")
    if args.command == "viz":
        _writable_target(args.out, "--out")
        if args.image is not None and not os.path.isfile(args.image):
            raise InputError("--image", f"{args.image!r} is not a file")
        if args.model != "tiny" and not os.path.isdir(args.model):
            raise InputError("--model", f"{args.model!r} is neither 'tiny' nor a local checkpoint folder")
        if args.model == "tiny" and args.dtype not in ("auto", "fp32", "float32"):
            raise InputError("--dtype", f"{args.dtype!r}: the shipped tiny VLM runs in fp32; allowed with --model tiny: "
                             "auto, fp32 (other dtypes need --model PATH)")
    if args.command == "profile":
        from .eval.profiler import MODEL_CHOICES

        if args.json:
            _writable_target(args.json, "--json")
        if args.model not in MODEL_CHOICES and not os.path.isdir(args.model):
            raise InputError("--model", f"{args.model!r} is neither one of {', '.join(MODEL_CHOICES)} nor a local "
                             "checkpoint folder")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse usage errors: 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "no_progress", False):  # transformers' own bars too (weight loading), not only ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        check_args(args)
        return args.func(args)
    except VTPError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vlm-tokenprune methods | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: point it somewhere that takes it
        return 0
    finally:
        if getattr(args, "no_progress", False):
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
