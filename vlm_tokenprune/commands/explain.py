"""``vlm-tokenprune explain``: a policy's predicted tokens per layer and FLOPs on a known model geometry or a
config.json (no weights loaded)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .text import runs, tflops


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
    "qwen2.5-vl-7b": (_QWEN2_7B, 576,
                      "Qwen2.5-VL-7B-Instruct: Qwen2.5-7B LLM (28 x 3584, GQA 28/4), ViT 32 x 1280 with window attention "
                      "(112 px windows; full attention in blocks 7/15/23/31), one 672x672 image -> 24x24 = 576 tokens"),
    "qwen3-vl-30b-a3b": (dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                              num_experts_per_tok=8, moe_intermediate_size=768), 1024,
                         "Qwen3-VL-30B-A3B-Instruct (MoE): 48 x 2048 LLM, 8 of 128 experts of width 768 per token, "
                         "one 1024x1024 image -> 1024 visual tokens"),
}


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
                "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl_vision", "internvl": "internvl_vision",
                "qwen3_vl": "qwen3_vl_vision", "gemma3": "siglip_vision_model"}  # geometries whose tower eval.flops counts
_INTERN_VIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=[448, 448], patch_size=[14, 14])
# explain's models without a profile geometry: their vision towers (numbers of the released config.json)
_TOWERS: dict[str, dict] = {
    "internvl3-2b": dict(family="internvl", vision=_INTERN_VIT_300M),
    "qwen2.5-vl-7b": dict(family="qwen2_5_vl", vision=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        out_hidden_size=3584)),
    "qwen3-vl-2b": dict(family="qwen3_vl", vision=dict(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3, out_hidden_size=2048, deepstack_visual_indexes=[5, 11, 17])),
}


def _with_tower(text: dict, geo: dict | None) -> dict:
    """Text numbers plus the geometry's vision tower (so explain counts tower + projector FLOPs), when known."""
    if geo is None or geo.get("family") not in _TOWER_TYPES:
        return text
    out = {"text_config": dict(text), "vision_config": {**geo["vision"], "model_type": _TOWER_TYPES[geo["family"]]}}
    if "tokens_per_image" in geo:  # Gemma 3's pooling projector
        out["mm_tokens_per_image"] = geo["tokens_per_image"]
    return out


def _load_model_config(spec: str) -> tuple[Any, int | None, str]:
    """``spec``: a known name or a path to a config.json -> (config or text numbers, visual tokens, description)."""
    from ..errors import InputError

    from ..eval.profiler import KNOWN_GEOMETRIES

    if spec not in KNOWN_MODELS and spec in KNOWN_GEOMETRIES:  # profile's random-weight geometries
        geo = KNOWN_GEOMETRIES[spec]
        vis = geo["vision"]
        if geo["family"] == "qwen2_vl":  # the merged grid of the one image profile builds
            n_visual = geo["grid"][0] * geo["grid"][1]
        elif "tokens_per_image" in geo:  # the projector pools the tower's grid (Gemma 3: 4096 patches -> 256)
            n_visual = geo["tokens_per_image"]
        else:
            n_visual = (vis["image_size"] // vis["patch_size"]) ** 2
        return _with_tower(dict(geo["text"]), geo), n_visual, geo["description"]
    if spec in KNOWN_MODELS:
        numbers, n_visual, desc = KNOWN_MODELS[spec]
        if numbers is None:  # tiny: the shipped model's config (no weights loaded)
            from transformers import AutoConfig

            from ..eval.tiny_vlm import ASSET_DIR

            numbers = AutoConfig.from_pretrained(ASSET_DIR)
            n_visual = _n_visual_from_config(numbers) or n_visual
        elif spec in KNOWN_GEOMETRIES or spec in _TOWERS:
            numbers = _with_tower(numbers, KNOWN_GEOMETRIES.get(spec) or _TOWERS[spec])
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
    from ..eval.profiler import KNOWN_GEOMETRIES

    return list(dict.fromkeys([*KNOWN_MODELS, *KNOWN_GEOMETRIES]))


def read_policy(spec: str, family: str | None = None) -> Any:
    """A policy argument: a policy string, or the path of a YAML / JSON policy file (``Policy.parse`` reads both);
    ``family``: the model family a family preset (``flowcut``) takes its setting for."""
    from .. import Policy

    return Policy.parse(spec, family=family)


def _family(spec: str, cfg: Any) -> str | None:
    """The ``model_type`` of an explain geometry (a known name, profile's geometry or a config)."""
    from ..eval.profiler import KNOWN_GEOMETRIES

    named = {"llava-1.5-7b": "llava", "llava-next-7b": "llava_next", "tiny": "llava"}
    if spec in named:
        return named[spec]
    if spec in KNOWN_GEOMETRIES:
        return KNOWN_GEOMETRIES[spec]["family"]
    if spec in _TOWERS:
        return _TOWERS[spec]["family"]
    return cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)


def _estimate_calibrated_heads(pol: Any, num_layers: int, num_heads: int) -> tuple[Any, list[str]]:
    """``prune_heads`` stages with a calibration file and ``kept``: which heads is the model's, their number is not.

    Returns the policy with those stages written out as ``round((1 - kept) * heads)`` pruned heads per layer
    from ``keep_first`` on (heads 0.. of each layer: KV groups filled first, so k/v savings are optimistic), and
    a note per estimated stage. Other calibrated stages are left for ``structural_flops`` to refuse.
    """
    from .. import Policy

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
    from .. import CRITERIA
    from ..errors import InputError
    from ..eval.flops import FORMULA, VISION_FORMULA, TextGeometry, policy_flops

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
        from ..eval.flops import structural_flops

        sf = structural_flops(g, counted, args.n_text, n_visual)
        rest = res["flops"] - res["llm_flops"]  # tower + projector (structural ops act in the LLM only)
        res.update({k: v for k, v in sf.items() if k in ("mask_only", "partial", "mlp_rows")})
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
    for line in runs(res["tokens_per_layer"]):
        print(f"  {line}")
    if res["lower_bound_stages"]:
        which = ", ".join(str(i) for i in res["lower_bound_stages"])
        print(f"  (stage(s) {which}: the criterion may keep more than its budget, e.g. a grid on top of the top-k; "
              "the counts from there on are lower bounds and the FLOPs below are optimistic; "
              "handle.last_trace() gives the real counts)")
    if res.get("upper_bound_stages"):
        which = ", ".join(str(i) for i in res["upper_bound_stages"])
        print(f"  (stage(s) {which}: the criterion takes its count from the input, e.g. SparseVLM's attention rank; "
              "the budget caps it, so the counts from there on are upper bounds and the FLOPs below pessimistic; "
              "handle.last_trace() gives the real counts)")
    print("theoretical prefill FLOPs (exact Llama count, vlm_tokenprune.eval.flops):")
    print(f"  formula  : {FORMULA}")
    if res["vision_flops"] is not None:
        print(f"             {VISION_FORMULA}")
    print(f"  baseline : {tflops(res['baseline_flops'])}")
    print(f"  policy   : {tflops(res['flops'])}")
    print(f"  ratio    : {res['ratio']:.4f} of baseline ({100 * res['ratio']:.1f} %, {1 / res['ratio']:.2f}x fewer)"
          f"{'  (vision tower + projector + LLM)' if res['vision_flops'] is not None else '  (LLM only: no known tower)'}")
    for part, key in (("LLM", "llm"), ("vision", "vision"), ("projector", "projector")):
        if res[f"{key}_flops"] is not None:
            b = res[f"{key}_baseline_flops"]
            print(f"    {part:9s}: {tflops(res[f'{key}_flops'])} of {tflops(b)}"
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
        kept_t = res.get("mlp_rows", sum(res["tokens_per_layer"]))  # structural: skipped MLPs route nowhere
        print(f"  experts  : {g.experts_per_token} of {g.num_experts} per token (active MLP width {g.intermediate_size}, "
              f"included above): baseline {tflops(per_token * base_t)}, policy {tflops(per_token * kept_t)}, "
              f"saved {tflops(per_token * (base_t - kept_t))} (pruned tokens and skipped MLPs route to no expert)")
    sc = res["scoring_flops"]
    if sc is None:
        print("  scoring  : unknown (no estimate for a criterion); not included above")
    else:
        print(f"  scoring  : {tflops(sc)} ({100 * sc / res['baseline_flops']:.2f} % of baseline), reported separately, not included above")
    return 0
