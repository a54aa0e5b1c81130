"""Resolve a policy's structural stages against one model: concrete layers and heads, checked
before any hook exists (``patch()`` calls ``resolve`` first; a failure leaves the model untouched).

``StructuralPlan`` is what the hooks install, layer by layer:

- ``skip_all``: decoder layers that do not run at all (hidden states pass through; their KV
  cache stays empty). Layer ``<= first_full_attention_layer`` is refused: the cache length
  (``DynamicCache.get_seq_length()``) and the masks are read there.
- ``skip_visual``: layers where visual hidden states pass through unchanged; text tokens run the
  layer and attend the visual tokens' keys/values computed at this layer from their incoming
  hidden states (and cached: decoded tokens see them too).
- ``heads_all``: ``{layer: pruned heads}`` removed for every token by slicing q/k/v/o_proj.
- ``heads_visual``: ``{layer: pruned heads}`` (YOPO): no query attends visual keys in them and
  visual queries get zero output from them. With the query-subset attention (eager / sdpa) this
  saves compute (``attention.subset_attention``, ``hooks._install_head_slices``); without it, masks only.
- ``ffn``: ``{layer: m_visual}``: visual tokens use the first ``m_visual`` MLP channels.
- ``neighbor``: ``{layer: w}``: visual->visual attention within a w x w window of the patch grid.
- ``skip_attn`` / ``skip_ffn``: layers whose self-attention / MLP sublayer is removed for every
  token (FinerCut, arXiv 2405.18218): the residual stream passes it unchanged. Attention is
  refused at layers ``<= first_full_attention_layer`` (as ``skip_all``) and where a token stage's
  criterion reads the layer's keys.
- ``attn_visual`` / ``ffn_visual``: the same for visual tokens only (``scope=visual``): visual rows
  get nothing from the sublayer; text rows run it, attending the visual tokens' keys / values
  computed at this layer from their incoming hidden states (cached for decoding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..compat import attention_bases
from .calibration import load_artifact, select_heads, select_layers, select_sublayers
from ..errors import IncompatiblePolicyError, PolicyError, UnsupportedModelError
from ..policy import Policy

# what each op really saves with this implementation (reported by describe() and eval.flops)
SAVINGS = {
    "skip_all": "real: the layer does not run",
    "skip_visual": "real: visual rows skip q_proj, attention, o_proj and the MLP (text queries in a query-subset attention call)",
    "skip_visual_2d": "partial: visual rows skip q_proj, o_proj and the MLP; with a 2-D-mask backend (flash) their attention rows still run (zero queries)",
    "heads_all": "real: q/k/v/o_proj sliced to the kept heads",
    "heads_visual": "real: visual rows skip the pruned heads' q/o_proj columns (and k/v_proj of KV groups whose heads are all "
                    "pruned); attention: kept heads over all tokens, pruned heads text queries x text keys only",
    "ffn": "real: visual rows run two matmuls on the sliced first m/ratio channels",
    "neighbor": "real: visual queries attend in chunks of one grid row, each with only its allowed keys (text + the w//2 rows above)",
    "skip_attn": "real: q/k/v/o_proj and the attention do not run (the layer's KV cache stays empty)",
    "skip_ffn": "real: the MLP does not run",
    "attn_visual": "real: visual rows skip q_proj, attention and o_proj (text queries in a query-subset attention call; "
                   "k/v_proj still run)",
    "attn_visual_2d": "partial: visual rows skip q_proj and o_proj; with a 2-D-mask backend (flash) their attention rows still run",
    "ffn_visual": "real: the MLP runs on the text rows only",
}


# ffn_cut on a mixture-of-experts MLP (Qwen3-VL-MoE): refused by name (``stages[i].op``)
MOE_FFN_CUT = (
    "ffn_cut slices the MLP's gate_proj / up_proj / down_proj channels, and {what}: a "
    "mixture of experts (routed experts whose weights are 3-D tensors: there is no gate_proj to slice, and a cut of "
    "every expert's channels is not what YOPO defines); allowed on this model: skip_layers, prune_heads, "
    "neighbor_attention, skip_sublayers (attn and ffn: removing the whole MoE block is defined), visual_drop, token stages"
)


@dataclass(frozen=True)
class StructuralPlan:
    num_layers: int
    num_heads: int
    skip_all: tuple[int, ...] = ()
    skip_visual: tuple[int, ...] = ()
    heads_all: dict = field(default_factory=dict)  # layer -> tuple of pruned heads
    heads_visual: dict = field(default_factory=dict)
    ffn: dict = field(default_factory=dict)  # layer -> visual MLP width
    neighbor: dict = field(default_factory=dict)  # layer -> window
    skip_attn: tuple[int, ...] = ()  # layers whose attention sublayer is removed (all tokens)
    skip_ffn: tuple[int, ...] = ()  # layers whose MLP sublayer is removed (all tokens)
    attn_visual: tuple[int, ...] = ()  # layers whose attention sublayer is removed for visual tokens
    ffn_visual: tuple[int, ...] = ()  # layers whose MLP sublayer is removed for visual tokens

    @property
    def needs_4d_mask(self) -> bool:
        return bool(self.neighbor)

    def no_visual_attention(self, j: int) -> bool:
        """Visual rows get nothing from layer j's attention (skip_layers / skip_sublayers scope=visual)."""
        return j in self.skip_visual or j in self.attn_visual

    def describe(self, subset_attention: bool = True) -> list[str]:
        """One line per op, with what it really saves (``subset_attention``: the query-subset backend is installed)."""
        out = []
        if self.skip_all:
            out.append(f"skip layers {list(self.skip_all)} for all tokens [{SAVINGS['skip_all']}]")
        if self.skip_visual:
            key = "skip_visual" if subset_attention else "skip_visual_2d"
            out.append(f"skip layers {list(self.skip_visual)} for visual tokens [{SAVINGS[key]}]")
        for name, d in (("heads_all", self.heads_all), ("heads_visual", self.heads_visual)):
            if d:
                n = sum(len(v) for v in d.values())
                what = "all tokens" if name == "heads_all" else "visual computation"
                out.append(f"prune {n} heads over {len(d)} layers for {what} [{SAVINGS[name]}]: "
                           + "; ".join(f"{layer}:{list(h)}" for layer, h in sorted(d.items())))
        if self.ffn:
            widths = sorted(set(self.ffn.values()))
            out.append(f"visual FFN cut to {widths} channels on {len(self.ffn)} layers [{SAVINGS['ffn']}]")
        if self.skip_attn:
            out.append(f"remove the attention sublayer of layers {list(self.skip_attn)} [{SAVINGS['skip_attn']}]")
        if self.skip_ffn:
            out.append(f"remove the MLP sublayer of layers {list(self.skip_ffn)} [{SAVINGS['skip_ffn']}]")
        if self.attn_visual:
            key = "attn_visual" if subset_attention else "attn_visual_2d"
            out.append(f"remove the attention sublayer of layers {list(self.attn_visual)} for visual tokens [{SAVINGS[key]}]")
        if self.ffn_visual:
            out.append(f"remove the MLP sublayer of layers {list(self.ffn_visual)} for visual tokens [{SAVINGS['ffn_visual']}]")
        if self.neighbor:
            out.append(f"neighbour visual attention, window {sorted(set(self.neighbor.values()))} on {len(self.neighbor)} layers "
                       f"[{SAVINGS['neighbor']}]")
        return out


def text_only_kv_heads(pruned: Any, num_heads: int, num_kv_heads: int) -> tuple[int, ...]:
    """KV heads all of whose query heads are in ``pruned`` (visual scope): no query ever reads their
    visual keys/values, so k/v_proj run on the text rows only there (MHA: every pruned head)."""
    g = num_heads // num_kv_heads
    return tuple(k for k in range(num_kv_heads) if all(h in pruned for h in range(k * g, (k + 1) * g)))


def capture_layers(policy: Policy) -> set[int]:
    """Layers whose k/v_proj outputs a token stage's criterion captures (kept unsliced, so criteria
    read the same keys with and without head pruning)."""
    return {st.layer - 1 for st in policy.stages if st.scores_on_llm_layer}


def _layers(spec: Any, n: int, where: str) -> tuple[int, ...]:
    if spec == "all":
        return tuple(range(n))
    bad = [x for x in spec if x >= n]
    if bad:
        raise IncompatiblePolicyError(where, f"layer {bad[0]} is beyond the model; allowed: 0..{n - 1}")
    return tuple(spec)


def mask_layers(seams: Any) -> tuple[int, ...]:
    """Layers whose KV cache the model reads the cache length and mask sizes from, so their attention must run:
    every layer up to ``first_full_attention_layer``, and with ``layer_types`` (Gemma 3) the first layer of each
    type (transformers builds the sliding mask at the first sliding layer, the full mask at the first full one)."""
    types = list(getattr(seams.text_config, "layer_types", None) or [])
    firsts = {types.index(t) for t in set(types)}
    return tuple(sorted(set(range(seams.first_full_attention_layer + 1)) | firsts))


def _allowed_layers(protected: tuple[int, ...], n: int) -> str:
    """``a..b, c..d``: the layers 0..n-1 outside ``protected``, as ranges."""
    rest = [x for x in range(n) if x not in protected]
    runs: list[list[int]] = []
    for x in rest:
        if runs and runs[-1][1] == x - 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs) or "none"


def _mask_layer_refusal(layers: Any, seams: Any, what: str, where: str) -> None:
    protected = mask_layers(seams)
    low = [x for x in layers if x in protected]
    if low:
        at = ", ".join(map(str, protected))
        raise IncompatiblePolicyError(where, f"layer {low[0]}{what} (the KV cache length and the masks are read at "
                                      f"layer{'s' if len(protected) > 1 else ''} {at}); allowed: "
                                      f"{_allowed_layers(protected, seams.num_layers)}")


def _check_attention_removable(attn: Any, seams: Any, captured: set, where: str) -> None:
    """Attention sublayers can go only at layers whose cache length / masks are not read (``mask_layers``), and not
    where a token stage's criterion reads the layer's keys."""
    _mask_layer_refusal(attn, seams, "'s attention cannot be removed", where)
    read = sorted(set(attn) & captured)
    if read:
        raise IncompatiblePolicyError(where, f"layer {read[0]}'s attention is read by a token stage's criterion (the stage at "
                                      f"layer {read[0] + 1}); remove another layer's attention or move the stage")


def _check_linear(m: Any, where: str) -> None:
    if type(m) is not nn.Linear:
        raise UnsupportedModelError(where, f"is {type(m).__name__}; structural ops need plain torch.nn.Linear projections")


def resolve(model: nn.Module, policy: Policy, seams: Any) -> StructuralPlan | None:
    """The concrete plan of ``policy``'s structural stages on ``model`` (None: no structural stage)."""

    stages = [(i, s) for i, s in enumerate(policy.stages) if s.structural and s.op != "visual_drop"]
    if not stages:
        return None
    n = seams.num_layers
    attn0 = seams.decoder_layers[0].self_attn
    n_heads = attn0.q_proj.out_features // attn0.head_dim
    kw: dict = {"num_layers": n, "num_heads": n_heads}
    for i, st in stages:
        where = f"stages[{i}]"
        p = dict(st.params)
        if st.op == "skip_layers":
            if "calibration" in p:
                art = load_artifact(p["calibration"], model, "layers", f"{where}.calibration")
                kept = max(1, min(n, round(p["layers_kept"] * n / p["of"])))
                layers = select_layers(art, n - kept, protect=mask_layers(seams), where=f"{where}.layers_kept")
            else:
                layers = _layers(p["layers"], n, f"{where}.layers")
            if p["scope"] == "all":
                _mask_layer_refusal(layers, seams, " cannot be skipped for all tokens", f"{where}.layers")
                kw["skip_all"] = tuple(layers)
            else:
                kw["skip_visual"] = tuple(layers)
        elif st.op == "prune_heads":
            if "calibration" in p:
                art = load_artifact(p["calibration"], model, "heads", f"{where}.calibration")
                pairs = select_heads(art, threshold=p.get("threshold"), top_n=p.get("top_n"), keep_first=p["keep_first"],
                                     kept=p.get("kept"))
            else:
                pairs = p["heads"]
            per: dict = {}
            for layer, h in pairs:
                if layer >= n:
                    raise IncompatiblePolicyError(f"{where}.heads", f"layer {layer} is beyond the model; allowed: 0..{n - 1}")
                if h >= n_heads:
                    raise IncompatiblePolicyError(f"{where}.heads", f"head {h} (layer {layer}) is beyond the model; allowed: 0..{n_heads - 1}")
                per.setdefault(layer, []).append(h)
            per = {k: tuple(sorted(v)) for k, v in per.items()}
            for layer in per:
                attn = seams.decoder_layers[layer].self_attn
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    _check_linear(getattr(attn, name, None), f"decoder layer {layer}.self_attn.{name}")
            if p["scope"] == "all":
                full = [k for k, v in per.items() if len(v) == n_heads]
                if full:
                    raise IncompatiblePolicyError(f"{where}.heads", f"prunes every head of layer {full[0]}; keep at least one "
                                                  "(or skip the layer with skip_layers)")
                kw["heads_all"] = per
            else:
                kw["heads_visual"] = per
        elif st.op == "ffn_cut":
            out = {}
            for layer in _layers(p["layers"], n, f"{where}.layers"):
                mlp = getattr(seams.decoder_layers[layer], "mlp", None)
                if mlp is not None and getattr(mlp, "gate_proj", None) is None and hasattr(mlp, "experts"):
                    raise IncompatiblePolicyError(f"{where}.op", MOE_FFN_CUT.format(
                        what=f"decoder layer {layer}'s mlp is {type(mlp).__name__}"))
                for name in ("gate_proj", "up_proj", "down_proj"):
                    _check_linear(getattr(mlp, name, None), f"decoder layer {layer}.mlp.{name}")
                m = mlp.gate_proj.out_features
                out[layer] = max(1, int(m // p["ratio"]))
            kw["ffn"] = out
        elif st.op == "neighbor_attention":
            kw["neighbor"] = {layer: p["window"] for layer in _layers(p["layers"], n, f"{where}.layers")}
        elif st.op == "skip_sublayers":
            if "calibration" in p:
                art = load_artifact(p["calibration"], model, "sublayers", f"{where}.calibration")
                count = max(0, min(2 * n, round(p["removed"] * 2 * n / p["of"])))
                attn, ffn = select_sublayers(art, count, n, where=where)
            else:
                attn = _layers(p.get("attn", ()), n, f"{where}.attn")
                ffn = _layers(p.get("ffn", ()), n, f"{where}.ffn")
            if p["scope"] == "all":  # visual scope: k/v_proj still run for every token (cache, criteria)
                _check_attention_removable(attn, seams, capture_layers(policy), f"{where}.attn")
            for layer in ffn:
                if getattr(seams.decoder_layers[layer], "mlp", None) is None:
                    raise UnsupportedModelError(f"decoder layer {layer}.mlp", "is missing; skip_sublayers(ffn) needs an mlp module")
            names = ("skip_attn", "skip_ffn") if p["scope"] == "all" else ("attn_visual", "ffn_visual")
            kw[names[0]], kw[names[1]] = tuple(attn), tuple(ffn)
    plan = StructuralPlan(**kw)
    if plan.needs_4d_mask and seams.mask_format == "2d":
        raise UnsupportedModelError(
            "attn_implementation",
            f"{seams.attn_implementation!r} takes 2-D padding masks; neighbor_attention needs a 4-D mask; allowed: eager, sdpa",
        )
    if plan.heads_visual:
        if attention_bases(seams) is None:
            raise UnsupportedModelError(
                "attn_implementation",
                f"{seams.attn_implementation!r}: prune_heads(scope=visual) splits the heads inside the attention call and "
                "found no attention function to delegate to on every decoder layer; allowed: eager, sdpa, flash-attention",
            )
    if plan.skip_all:  # the other ops have nothing to do on a layer that does not run
        drop = set(plan.skip_all)
        plan = StructuralPlan(
            n, n_heads, plan.skip_all, tuple(x for x in plan.skip_visual if x not in drop),
            {k: v for k, v in plan.heads_all.items() if k not in drop},
            {k: v for k, v in plan.heads_visual.items() if k not in drop},
            {k: v for k, v in plan.ffn.items() if k not in drop},
            {k: v for k, v in plan.neighbor.items() if k not in drop},
            tuple(x for x in plan.skip_attn if x not in drop), tuple(x for x in plan.skip_ffn if x not in drop),
            tuple(x for x in plan.attn_visual if x not in drop), tuple(x for x in plan.ffn_visual if x not in drop),
        )
    return plan


def static_plan(policy: Policy, num_layers: int, num_heads: int, intermediate_size: int) -> StructuralPlan | None:
    """A plan from the policy alone (no model, no calibration file): for FLOPs predictions."""

    kw: dict = {}
    for i, st in enumerate(policy.stages):
        if not st.structural or st.op == "visual_drop":
            continue
        p = dict(st.params)
        if "calibration" in p:
            raise PolicyError(f"stages[{i}].calibration", "a calibration file is resolved against the model: predict with "
                              "structural_flops(..., plan=handle.structural) after patch(), or give the layers / heads explicitly")
        if st.op == "skip_layers":
            kw["skip_all" if p["scope"] == "all" else "skip_visual"] = _layers(p["layers"], num_layers, f"stages[{i}].layers")
        elif st.op == "prune_heads":
            per: dict = {}
            for layer, h in p["heads"]:
                per.setdefault(layer, []).append(h)
            kw["heads_all" if p["scope"] == "all" else "heads_visual"] = {k: tuple(v) for k, v in per.items()}
        elif st.op == "ffn_cut":
            width = max(1, int(intermediate_size // p["ratio"]))
            kw["ffn"] = {j: width for j in _layers(p["layers"], num_layers, f"stages[{i}].layers")}
        elif st.op == "neighbor_attention":
            kw["neighbor"] = {j: p["window"] for j in _layers(p["layers"], num_layers, f"stages[{i}].layers")}
        elif st.op == "skip_sublayers":
            names = ("skip_attn", "skip_ffn") if p["scope"] == "all" else ("attn_visual", "ffn_visual")
            kw[names[0]] = _layers(p.get("attn", ()), num_layers, f"stages[{i}].attn")
            kw[names[1]] = _layers(p.get("ffn", ()), num_layers, f"stages[{i}].ffn")
    return StructuralPlan(num_layers, num_heads, **kw) if kw else None
