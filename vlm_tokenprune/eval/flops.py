"""Theoretical prefill FLOPs of the language model, for a policy or for a real run.

One formula, stated once. Per decoder layer that sees ``n`` tokens (Llama-style: RoPE
attention with ``H`` query heads and ``H_kv`` key/value heads of size ``h``, SwiGLU MLP)::

    layer(n) = 2 * ( n*d*q + n*d*kv + n*d*kv + n*q*d      # Q, K, V, O projections
                     + 2 * n^2 * q                        # QK^T and AV (full n x n, no causal halving)
                     + 3 * n*d*m )                        # SwiGLU: gate, up, down (d x m each)

with ``d`` the hidden size, ``q = H*h``, ``kv = H_kv*h``, ``m`` the MLP width and the
factor 2 counting a multiply and an add. Without GQA (``q = kv = d``) this is the exact
LLaMA count ``2 * (4 n d^2 + 2 n^2 d + 3 n d m)`` given in ``methods.md`` section 12,
i.e. FastV's per-layer cost ``4nd^2 + 2n^2d + 2ndm`` (Chen et al., "An Image is Worth
1/2 Tokens After Layer 2", arXiv 2403.06764, restated as Eq. 1 of FEATHER,
arXiv 2412.13180) counted in FLOPs rather than multiply-accumulates and with the third
SwiGLU matrix. A prefill adds the LM head ``2 * d * V`` per token whose logits are
computed (1 by default: generation needs only the last token's logits). A layer that attends through a
sliding window of ``W`` positions (Gemma 3's ``sliding_attention`` layers) counts ``2 * n * min(n, W) * q``
for QK^T and AV (exact without pruning; an upper bound with the holes a pruned prompt leaves in the window).

The vision tower and the projector are counted too (``VisionGeometry``: CLIP / SigLIP towers of
LLaVA / LLaVA-NeXT, Qwen2-VL's tower and merger), so vision-site stages (FlowCut's ViT part, MCTF)
show their tower savings. ``policy_flops`` / ``trace_flops`` report each part and the total:
``flops`` / ``baseline_flops`` / ``ratio`` are the TOTAL (vision + projector + LLM);
``llm_flops`` / ``llm_baseline_flops`` / ``llm_ratio`` the language model alone (what ``ratio``
meant before, so recorded LLM-only results stay comparable under that name); ``vision_flops`` /
``projector_flops`` (and their ``*_baseline_flops``) the other parts, ``None`` when the config has
no tower this module knows (``parts_counted`` says which parts the total holds). A stage that
acts at the feature layer (VisionZip, VisPruner) saves no tower FLOPs; the projector runs on the
kept tokens of any vision-site stage. Predictions (``policy_flops``) count the tower at full
length for vision stages (``vision_upper_bound_stages``: their in-tower schedule depends on the
image); ``trace_flops`` uses the lengths each encoder layer really saw. Crops in a prediction:
``n_visual // patches per crop`` (LLaVA-NeXT: newline tokens and unpadding ignored); Qwen2-VL:
one image of ``n_visual * merge`` patches.

Not counted: norms, RoPE, softmax, embeddings, position embeddings. Biases (Qwen2's q/k/v) are ignored.

The cost of scoring (extra projections a criterion computes to rank tokens) is reported
SEPARATELY as ``scoring_flops``, never folded into ``flops``; criteria without an
estimate (``Criterion.scoring_flops``) report ``None`` (unknown). The scoring layer's own
``k_proj``/``v_proj`` outputs are captured by the patch, so they cost nothing extra.

Predictions follow the budget rule of ``Budget.count`` (``keep`` of the original or, with
``of="current"``, of the current visual tokens; ``tokens`` absolute). A criterion with its
own ``select`` (FEATHER's union with a grid) may keep MORE than its budget: for those
stages (``lower_bound_stages``) the predicted counts are lower bounds; ``trace_flops`` on a
real run gives the exact figures.

All counts are per sequence (one batch row); a batch of ``B`` padded rows costs ``B``
times the count at the padded length. Ratios do not depend on ``B``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import IncompatiblePolicyError, InputError
from ..policy import Policy
from ..registry import CRITERIA

FORMULA = "per layer 2*(n*d*(q+2*kv) + n*q*d + 2*n^2*q + 3*n*d*m) FLOPs (= 2*(4nd^2+2n^2d+3ndm) without GQA) + LM head 2*d*V per logit row"

VISION_FORMULA = ("vision layer 2*(4*n*D^2 + 2*P*D + k*n*D*M) per crop of n tokens (P = n^2, or the sum of "
                  "window sizes squared in Qwen2.5-VL's windowed layers; k = 2, 3 for a SwiGLU MLP) + patch "
                  "embedding; projector 2*sum(in*out) per projected token (Qwen3-VL: merger + DeepStack mergers)")


@dataclass(frozen=True)
class TextGeometry:
    """The numbers of a Llama-style text config that the FLOPs formula needs."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    # mixture-of-experts MLPs (Qwen3-VL-MoE ...): routing is per token, so ``intermediate_size`` is the ACTIVE
    # width ``experts_per_token * moe_intermediate_size`` (a pruned token routes nowhere); the router's d x E
    # projection is not counted (like norms)
    num_experts: int | None = None
    experts_per_token: int | None = None
    # layers that attend through a sliding window of ``sliding_window`` positions (``layer_types``), else ()
    sliding_layers: tuple[int, ...] = ()
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def of(cls, config: Any) -> "TextGeometry":
        """From a ``TextGeometry``, a transformers config (a VLM config uses its ``text_config``)
        or a mapping (e.g. a parsed ``config.json``; a ``"text_config"`` entry is used when present)."""
        if isinstance(config, TextGeometry):
            return config
        if isinstance(config, Mapping):
            src = config["text_config"] if config.get("text_config") is not None else config
            get = src.get
        else:
            text = getattr(config, "text_config", None)
            src = text if text is not None else config
            get = lambda k, default=None: getattr(src, k, default)  # noqa: E731
        values = {}
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            v = get(key)
            if v is None:
                raise InputError(f"text_config.{key}", "is required to count FLOPs (Llama-style text config)")
            values[key] = int(v)
        for key in ("num_key_value_heads", "head_dim"):
            v = get(key, None)
            values[key] = int(v) if v is not None else None
        k, m_e = get("num_experts_per_tok", None), get("moe_intermediate_size", None)
        if k and m_e and get("num_experts", None):  # MoE: the active experts' width per token
            _check_every_layer_sparse(get, values["num_hidden_layers"])
            values.update(intermediate_size=int(k) * int(m_e), num_experts=int(get("num_experts")),
                          experts_per_token=int(k))
        types, window = get("layer_types", None), get("sliding_window", None)
        pattern = get("sliding_window_pattern", None)
        if not types and window and pattern:  # a config.json / geometry giving the pattern only (Gemma 3: 6)
            types = ["full_attention" if (j + 1) % int(pattern) == 0 else "sliding_attention"
                     for j in range(values["num_hidden_layers"])]
        if types and window:  # Gemma 3: 5 of 6 layers slide
            values.update(sliding_layers=tuple(j for j, t in enumerate(types) if t == "sliding_attention"),
                          sliding_window=int(window))
        return cls(**values)


def _check_every_layer_sparse(get: Any, n_layers: int) -> None:
    """One MLP width for every layer: a MoE config whose ``mlp_only_layers`` / ``decoder_sparse_step`` give some
    layers a dense MLP (of ``intermediate_size``) is refused by name rather than counted wrong."""
    only = sorted(int(j) for j in (get("mlp_only_layers", None) or ()) if int(j) < n_layers)
    step = int(get("decoder_sparse_step", None) or 1)
    dense = sorted(set(only) | {j for j in range(n_layers) if (j + 1) % step})
    if dense:
        field = "text_config.mlp_only_layers" if only else "text_config.decoder_sparse_step"
        raise InputError(field, f"decoder layers {dense} have a dense MLP beside the sparse MoE layers; the FLOPs count "
                         "one MLP width (the active experts') for every layer; allowed: every layer sparse "
                         "(mlp_only_layers=[], decoder_sparse_step=1, as in the released Qwen3-VL-MoE checkpoints)")


# -- the formula ---------------------------------------------------------------------------------
def layer_flops(text_config: Any, n: int, layer: int | None = None) -> float:
    """FLOPs of one decoder layer that sees ``n`` tokens (see the module docstring); ``layer``: its index, so a
    sliding-window layer counts its window."""
    g = TextGeometry.of(text_config)
    d, q, kv, m = g.hidden_size, g.q_dim, g.kv_dim, g.intermediate_size
    n = int(n)
    projections = n * d * q + 2 * n * d * kv + n * q * d
    keys = min(n, g.sliding_window) if layer is not None and layer in g.sliding_layers else n
    attention = 2 * n * keys * q
    mlp = 3 * n * d * m
    return float(2 * (projections + attention + mlp))


def lm_head_flops(text_config: Any, logits_tokens: int = 1) -> float:
    g = TextGeometry.of(text_config)
    return float(2 * g.hidden_size * g.vocab_size * int(logits_tokens))


def prefill_flops(text_config: Any, tokens_per_layer: list[int], logits_tokens: int = 1) -> float:
    """Sum of ``layer_flops`` over the decoder layers (``tokens_per_layer[l]``: tokens layer l sees)
    plus the LM head for ``logits_tokens`` rows."""
    g = TextGeometry.of(text_config)
    if len(tokens_per_layer) != g.num_hidden_layers:
        raise InputError(
            "tokens_per_layer", f"has {len(tokens_per_layer)} entries; the model has {g.num_hidden_layers} decoder layers"
        )
    return sum(layer_flops(g, n, j) for j, n in enumerate(tokens_per_layer)) + lm_head_flops(g, logits_tokens)


# -- scoring overhead (reported separately) ------------------------------------------------------
def scoring_flops(text_config: Any, criterion: str, n_tokens: int, n_visual: int, params: Mapping[str, Any] | None = None) -> float | None:
    """FLOPs one stage spends scoring (``Criterion.scoring_flops``, declared by each method), or ``None`` when the
    criterion has no estimate. ``visual_drop`` (no criterion) costs nothing."""
    if criterion == "visual_drop":
        return 0.0
    crit = CRITERIA.get(criterion) if criterion in CRITERIA else None
    if crit is None:
        return None
    if params is None:  # the criterion's defaults
        params = {k: p.default for k, p in crit.params.items()}
    return crit.scoring_flops(TextGeometry.of(text_config), int(n_tokens), int(n_visual), params)


def selects_beyond_budget(criterion: str) -> bool:
    """True when the criterion's kept count may exceed the stage's budget: it overrides ``select`` and does not
    declare ``budget_predicts_count`` (``methods.base.Criterion``)."""
    from ..methods.base import Criterion

    crit = CRITERIA.get(criterion) if criterion in CRITERIA else None
    if crit is None:
        return False
    declared = crit.budget_predicts_count
    return type(crit).select is not Criterion.select if declared is None else not declared


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))


# -- predictions and measurements ----------------------------------------------------------------
def policy_tokens_per_layer(text_config: Any, policy: Any, n_text: int, n_visual: int) -> list[int]:
    """Predicted sequence length each decoder layer sees for one row of ``n_text`` + ``n_visual`` tokens."""
    return _schedule(TextGeometry.of(text_config), Policy.parse(policy), n_text, n_visual)[0]


def _schedule(g: TextGeometry, pol: Policy, n_text: int, n_visual: int, crops: tuple[int, int] | None = None):
    """``crops``: ``(crops, LLM tokens per crop)`` of the prompt's visual tokens; a vision-site stage's budget is
    per crop (``crops * count(per crop)`` plus the visual tokens outside the crops, LLaVA-NeXT's newlines, reach
    the language model); None: the budget counts all ``n_visual`` (one crop)."""
    if n_text < 0 or n_visual < 0:
        raise InputError("n_text/n_visual", f"must be >= 0, got {n_text}, {n_visual}")
    L = g.num_hidden_layers
    pol = pol.at_depth(L) if L >= 2 else pol  # a preset's paper layers on this depth (as patch() does)
    visual = [n_visual] * L
    scoring: list[float | None] = []
    lower: list[int] = []
    upper: list[int] = []
    cur = n_visual
    for i, st in enumerate(pol.stages):
        # shortens the language model's input: every layer sees k visual tokens (vision: n_visual = one crop's patches)
        if st.reduces_input:
            k = st.budget.count(n_visual, cur)
            if st.is_vision and crops is not None and crops[0] * crops[1] <= n_visual:
                c, per = crops
                k = c * min(per, st.budget.count(per, per)) + n_visual - c * per
            params = {key: v for key, v in st.params.items() if key != "positions"}
            scoring.append(0.0 if k == cur else scoring_flops(g, st.criterion, n_text + cur, cur, params))
            visual = [k] * L
            cur = k
            continue
        if not st.changes_tokens:  # structural ops: ``structural_flops``
            continue
        if st.layer >= L:
            raise IncompatiblePolicyError(f"stages[{i}].layer", f"{st.layer} is beyond the model; allowed: 1..{L - 1}")
        if st.op == "visual_drop":
            scoring.append(0.0)
            for layer in range(st.layer, L):
                visual[layer] = 0
            cur = 0
            continue
        k = st.budget.count(n_visual, cur)
        crit = CRITERIA.get(st.criterion) if st.criterion in CRITERIA else None
        adaptive = crit is not None and crit.adaptive_count(st.params)
        if adaptive:  # the budget caps a count the criterion takes from the input: the cap is an upper bound
            k = min(k, cur)
            if k < cur:
                upper.append(i)
        if cur < min(k, n_visual) and st.budget.tokens is not None:
            # tokens=N above what an earlier stage left: the row keeps them all, as patch()
            # does and as FlowCut's official LLaVA-NeXT target does when fewer arrive
            k = cur
        if k > cur:
            where = f"stages[{i}].tokens" if st.budget.tokens is not None else f"stages[{i}].keep"
            raise IncompatiblePolicyError(where, f"keeps {k} visual tokens but only {cur} are left at that point")
        if k == cur:  # the engine leaves the sequence untouched and runs no criterion
            scoring.append(0.0)
        else:
            scoring.append(scoring_flops(g, st.criterion, n_text + cur, cur, st.params))
            if selects_beyond_budget(st.criterion):
                lower.append(i)
            if k < cur and crit is not None:  # merged tokens added back (SparseVLM's recycling)
                k = crit.predicted_count(k, cur, st.params)
        for layer in range(st.layer, L):
            visual[layer] = k
        cur = k
    return [n_text + v for v in visual], scoring, lower, upper


def policy_flops(model_config: Any, policy: Any, n_text: int, n_visual: int, logits_tokens: int = 1) -> dict:
    """Predicted prefill FLOPs of ``policy`` on a prompt of ``n_text`` text and ``n_visual`` visual tokens.

    A stage at layer k keeping ``keep=r`` leaves ``max(1, floor(r * n_visual + 0.5))`` visual
    tokens to layers >= k (``tokens=t`` leaves t); layers below the first stage see all
    ``n_text + n_visual``.

    Returns:
        ``{"tokens_per_layer", "flops", "baseline_flops", "ratio", "scoring_flops",
        "lower_bound_stages", "upper_bound_stages"}``; ``scoring_flops`` (separate, not in ``flops``) is ``None``
        if a criterion has no estimate; ``lower_bound_stages``: stages whose criterion may keep
        more than its budget (the counts after them are lower bounds); ``upper_bound_stages``: stages whose
        criterion takes its count from the input (``Criterion.adaptive_count``), the budget being a cap.
    """
    g = TextGeometry.of(model_config)
    pol = Policy.parse(policy)
    vg = VisionGeometry.of(model_config)
    if vg is not None and n_visual:
        vg = _sized(vg, int(n_visual))
    per_crop = (_crops(vg, int(n_visual)), vg.crop_patches // vg.merge) if vg is not None and n_visual else None
    tokens, scoring, lower, upper = _schedule(g, pol, int(n_text), int(n_visual), per_crop)
    out = _result(g, tokens, [n_text + n_visual] * g.num_hidden_layers, scoring, logits_tokens)
    out["lower_bound_stages"] = lower
    out["upper_bound_stages"] = upper
    parts = base = None
    out["vision_upper_bound_stages"] = []
    if vg is not None and n_visual:
        crops = _crops(vg, int(n_visual))
        base = vision_flops(vg, crops)
        parts = dict(base)
        for i, st in enumerate(pol.stages):
            if st.is_vision:  # the projector sees the kept LLM tokens (InternVL: whole pixel-shuffle groups) per crop
                per = vg.crop_patches // vg.merge  # (Gemma 3: all of them, ``projects_all``); the tower's in-layer
                # schedule is the image's. Qwen's packed towers run the tower and merger whole (``vision.packed``)
                # unless the criterion prunes inside the tower (FlowCut's Qwen2-VL stage: the kept patches)
                crit = CRITERIA.get(st.criterion) if st.criterion in CRITERIA else None
                whole = vg.projects_all and not getattr(crit, "prunes_in_tower", False)
                kept = per if whole else min(per, st.budget.count(per, per))
                parts = vision_flops(vg, crops, projected=crops * kept)
                out["vision_upper_bound_stages"].append(i)
    return _with_parts(out, vg, parts, base)


def trace_flops(text_config: Any, trace: Any, logits_tokens: int = 1, policy: Any = None) -> dict:
    """FLOPs of the prefill a ``handle.last_trace()`` describes (keys as ``policy_flops``, exact counts).

    ``trace.tokens_per_layer`` is the sequence length each decoder layer saw; the baseline
    is every layer at the first layer's length (layer 0 is never pruned). ``policy`` (the
    patched one) supplies criterion parameters for the scoring estimate; without it the
    criteria's defaults are used.
    """
    g = TextGeometry.of(text_config)
    if trace is None:
        raise InputError("trace", "is None: run a forward of the patched model first")
    if getattr(trace, "phase", "prefill") == "decode":
        raise InputError("trace", "is a cached decode step; FLOPs are counted for a prefill trace")
    tokens = list(trace.tokens_per_layer)
    if not tokens:
        raise InputError("trace.tokens_per_layer", "is empty")
    stages = Policy.parse(policy).at_depth(max(2, len(tokens))).stages if policy is not None else None
    scoring = []
    for i, s in enumerate(trace.stages):
        noop = s.tokens_before == s.tokens_after and list(s.visual_before) == list(s.visual_after)
        n_vis = max(s.visual_before) if s.visual_before else 0
        params = dict(stages[i].params) if stages is not None and i < len(stages) else None
        if params is not None:
            params.pop("positions", None)  # a pre_llm stage's, not the criterion's
        scoring.append(0.0 if noop else scoring_flops(g, s.criterion, s.tokens_before, n_vis, params))
    pre = [s for s in trace.stages if s.reduces_input]  # layer 0 saw the reduced input: baseline = its length before
    full = pre[0].tokens_before if pre else tokens[0]
    out = _result(g, tokens, [full] * len(tokens), scoring, logits_tokens)
    out["lower_bound_stages"] = []
    out["upper_bound_stages"] = []
    vg = VisionGeometry.of(text_config)
    parts = base = None
    vis = [s for s in trace.stages if s.is_vision and s.vision_crops is not None]
    if vg is not None and vis and not vg.dynamic:  # the tower's real per-layer lengths, per row (crops / rows);
        # Qwen3-VL's packed tower (dynamic) runs whole under its vision stage: counted below like an untouched one
        s = vis[0]
        crops = s.vision_crops / max(1, len(s.visual_before))
        base = vision_flops(vg, crops)
        parts = vision_flops(vg, crops, s.vision_tokens_per_layer or None,
                             projected=None if vg.projects_all else crops * s.vision_kept_patches)
        if s.vision_tokens_per_layer and len(s.vision_tokens_per_layer) != vg.num_hidden_layers:
            base = vision_flops(vg, crops, [vg.crop_patches + vg.cls] * len(s.vision_tokens_per_layer))
    elif vg is not None and trace.stages and max(trace.stages[0].visual_before or [0]):
        n_vis = max(trace.stages[0].visual_before)
        vg = _sized(vg, n_vis)
        base = parts = vision_flops(vg, _crops(vg, n_vis))  # untouched tower
        # Qwen2-VL's FlowCut stage prunes inside the packed tower: counted at full length, an upper bound
        out["upper_bound_stages"] = [i for i, s in enumerate(trace.stages) if s.is_vision and s.vision_tokens_per_layer]
    return _with_parts(out, vg, parts, base)


def _result(g: TextGeometry, tokens: list[int], base: list[int], scoring: list, logits_tokens: int) -> dict:
    flops = prefill_flops(g, tokens, logits_tokens)
    baseline = prefill_flops(g, base, logits_tokens)
    return {
        "tokens_per_layer": tokens,
        "flops": flops,
        "baseline_flops": baseline,
        "ratio": flops / baseline,
        "scoring_flops": _sum_or_none(scoring),
    }


# -- vision tower and projector --------------------------------------------------------------------
@dataclass(frozen=True)
class VisionGeometry:
    """The numbers of a VLM's vision tower and projector that ``vision_flops`` needs.

    A pre-norm ViT layer seeing ``n`` tokens (CLIP / SigLIP / InternViT / the Qwen-VL towers: Q, K, V, O
    of ``D x D``, attention over ``P`` query-key pairs, a 2-matrix MLP ``D x M``, ``mlp_matrices=3`` for a
    SwiGLU one)::

        vision_layer(n) = 2 * (4*n*D^2 + 2*P*D + mlp_matrices*n*D*M),   P = n^2 (full attention)

    plus the patch embedding ``2 * patches * patch_dim * D`` (a convolution with stride = kernel).
    ``cls``: 1 when the tower prepends a class token (CLIP, InternViT), else 0. ``crop_patches``: patch
    tokens per crop (attention is per crop). ``merge``: patches merged into one LLM visual token (the
    Qwen-VL towers' ``spatial_merge_size**2``, InternVL's pixel shuffle ``1 / downsample_ratio**2``; 1 for
    LLaVA). ``projector``: the ``(in, out)`` linear layers the projector applies per projected token
    (LLaVA's 2-layer MLP on each patch; a Qwen-VL merger or InternVL's MLP on each merged group; Qwen3-VL:
    the merger and each DeepStack merger, which all see every merged group). ``dynamic``: the tower
    encodes one image at its own resolution (Qwen-VL: ``crop_patches`` is that image's, from the visual
    token count), else fixed-size crops (tiles). ``window`` / ``full_layers`` (Qwen2.5-VL): layers not in
    ``full_layers`` attend within windows of ``window x window`` merged tokens (the last window of a row
    or column holds the remainder), so on the merged grid ``h x w`` (``grid``; default: the most square
    one with ``h * w = crop_patches / merge``, ``h <= w``)::

        P_window = merge^2 * S(h) * S(w),   S(x) = (x // window) * window^2 + (x % window)^2

    Norms, activations, biases, rotary / interpolated position embeddings and DeepStack's additions
    into the LLM are not counted (no matrix products).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    crop_patches: int
    patch_dim: int
    cls: int = 0
    merge: int = 1
    mlp_matrices: int = 2
    projector: tuple = ()
    dynamic: bool = False
    window: int = 0
    full_layers: tuple = ()
    grid: tuple | None = None
    # the projector sees every token of a crop under a vision stage (Gemma 3; Qwen's packed towers, unless the
    # criterion ``prunes_in_tower``)
    projects_all: bool = False

    @classmethod
    def of(cls, config: Any) -> "VisionGeometry | None":
        """From a VLM config (transformers or a mapping) with a ``vision_config``: CLIP / SigLIP towers
        (LLaVA, LLaVA-NeXT, OneVision; Gemma 3's SigLIP with its pooling projector: ``merge`` = patches per
        pooled token, one linear per pooled token), InternViT (InternVL), and the towers of Qwen2-VL, Qwen2.5-VL
        (windowed) and Qwen3-VL (DeepStack). ``None`` when the config has no vision tower this module knows (the parts
        are then reported as unknown, never as zero)."""
        if isinstance(config, (TextGeometry, VisionGeometry)):
            return config if isinstance(config, VisionGeometry) else None
        get = (lambda o, k, d=None: o.get(k, d)) if isinstance(config, Mapping) else (lambda o, k, d=None: getattr(o, k, d))
        vc = get(config, "vision_config")
        if vc is None:
            return None
        vget = (lambda k, d=None: vc.get(k, d)) if isinstance(vc, Mapping) else (lambda k, d=None: getattr(vc, k, d))
        text = get(config, "text_config")
        d_text = None
        if text is not None:
            d_text = text.get("hidden_size") if isinstance(text, Mapping) else getattr(text, "hidden_size", None)
        vtype = str(vget("model_type", "") or "")
        if vget("depth") is not None and vget("embed_dim") is not None:  # Qwen2-VL's tower (qwen2_vl)
            D, merge = int(vget("embed_dim")), int(vget("spatial_merge_size", 2)) ** 2
            out = int(vget("hidden_size", d_text or D))
            p, tp, ch = int(vget("patch_size", 14)), int(vget("temporal_patch_size", 2)), int(vget("in_channels", 3))
            return cls(D, int(D * float(vget("mlp_ratio", 4))), int(vget("depth")), 0, ch * tp * p * p, 0, merge, 2,
                       ((D * merge, D * merge), (D * merge, out)), dynamic=True, projects_all=True)
        if vget("depth") is not None and vget("hidden_size") is not None:  # Qwen2.5-VL's / Qwen3-VL's tower
            D, M, L = int(vget("hidden_size")), int(vget("intermediate_size")), int(vget("depth"))
            side = int(vget("spatial_merge_size", 2))
            merge, out = side * side, int(vget("out_hidden_size", d_text or D))
            p, tp, ch = int(vget("patch_size", 14)), int(vget("temporal_patch_size", 2)), int(vget("in_channels", 3))
            merger = ((D * merge, D * merge), (D * merge, out))
            deepstack = vget("deepstack_visual_indexes")
            if deepstack is not None:  # Qwen3-VL: GELU MLP; the merger + one DeepStack merger per index
                return cls(D, M, L, 0, ch * tp * p * p, 0, merge, 2, merger * (1 + len(deepstack)), dynamic=True,
                           projects_all=True)  # a vision stage (vision.packed) runs the tower and mergers on all
            window = int(vget("window_size", 0) or 0) // side // p  # Qwen2.5-VL: SwiGLU MLP, windowed attention
            return cls(D, M, L, 0, ch * tp * p * p, 0, merge, 3, merger, dynamic=True, window=window,
                       full_layers=tuple(int(i) for i in (vget("fullatt_block_indexes") or ())), projects_all=True)
        if "intern" in vtype:  # InternViT (InternVL): CLS + square tiles, pixel shuffle, LayerNorm + 2-layer MLP
            D, M, L = int(vget("hidden_size")), int(vget("intermediate_size")), int(vget("num_hidden_layers"))
            first = lambda v: int(v[0] if isinstance(v, (list, tuple)) else v)  # noqa: E731  ([448, 448] or 448)
            p, side = first(vget("patch_size")), first(vget("image_size")) // first(vget("patch_size"))
            merge = round(1 / float(get(config, "downsample_ratio", 0.5) or 0.5) ** 2)
            dt = int(d_text) if d_text is not None else D
            return cls(D, M, L, side * side, int(vget("num_channels", 3)) * p * p, 1, merge, 2,
                       ((D * merge, dt), (dt, dt)))
        if "clip" in vtype or "siglip" in vtype:
            D, M, L = int(vget("hidden_size")), int(vget("intermediate_size")), int(vget("num_hidden_layers"))
            p, side = int(vget("patch_size")), int(vget("image_size")) // int(vget("patch_size"))
            pooled = get(config, "mm_tokens_per_image")
            if pooled:  # Gemma 3: average pool of the patch grid to mm_tokens_per_image, then one linear D -> text
                dt = int(d_text) if d_text is not None else D
                return cls(D, M, L, side * side, int(vget("num_channels", 3)) * p * p, 0,
                           (side * side) // int(pooled), 2, ((D, dt),), projects_all=True)
            layers = get(config, "vision_feature_layer", -2)
            n_feat = len(layers) if isinstance(layers, (list, tuple)) else 1  # several layers: concatenated
            dt = int(d_text) if d_text is not None else D
            onevision = str(get(config, "model_type", "") or "") == "llava_onevision"  # mask-only vision stage:
            return cls(D, M, L, side * side, int(vget("num_channels", 3)) * p * p, 1 if "clip" in vtype else 0, 1, 2,
                       ((D * n_feat, dt), (dt, dt)), projects_all=onevision)  # every patch is projected
        return None


def merged_grid(vg: VisionGeometry) -> tuple[int, int]:
    """``(h, w)`` merged tokens of the crop: ``vg.grid``, else the most square ``h * w = crop_patches / merge``."""
    if vg.grid is not None:
        return int(vg.grid[0]), int(vg.grid[1])
    n = vg.crop_patches // vg.merge
    h = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0) if n else 0
    return h, (n // h if h else 0)


def attention_pairs(vg: VisionGeometry, n: int, layer: int | None = None) -> int:
    """Query-key pairs of one crop's attention in encoder layer ``layer`` seeing ``n`` tokens: ``n^2``, or on
    Qwen2.5-VL's windowed layers (whole image: ``n == crop_patches``) the sum of each window's size squared."""
    if not vg.window or layer is None or layer in vg.full_layers or n != vg.crop_patches:
        return n * n
    w = vg.window
    S = lambda x: (x // w) * w * w + (x % w) ** 2  # noqa: E731
    h, wd = merged_grid(vg)
    return vg.merge * vg.merge * S(h) * S(wd)


def vision_layer_flops(vg: VisionGeometry, n: int, layer: int | None = None) -> float:
    """FLOPs of vision-encoder layer ``layer`` seeing ``n`` tokens of one crop (see ``VisionGeometry``; ``layer``
    matters only for Qwen2.5-VL's windowed layers)."""
    D, M, n = vg.hidden_size, vg.intermediate_size, int(n)
    return float(2 * (4 * n * D * D + 2 * attention_pairs(vg, n, layer) * D + vg.mlp_matrices * n * D * M))


def vision_flops(vg: VisionGeometry, crops: int, tokens_per_layer: list[int] | None = None,
                 projected: int | None = None) -> dict:
    """FLOPs of the vision tower (``crops`` crops, each layer ``l`` seeing ``tokens_per_layer[l]`` tokens of
    a crop; default: every layer sees all patches + CLS) and of the projector on ``projected`` tokens
    (default: every crop's patches, merged). Returns ``{"vision": ..., "projector": ...}``."""
    full = vg.crop_patches + vg.cls
    tokens = list(tokens_per_layer) if tokens_per_layer is not None else [full] * vg.num_hidden_layers
    embed = 2 * vg.crop_patches * vg.patch_dim * vg.hidden_size
    tower = crops * (embed + sum(vision_layer_flops(vg, n, j) for j, n in enumerate(tokens)))
    if projected is None:
        projected = crops * vg.crop_patches // vg.merge
    proj = 2 * int(projected) * sum(i * o for i, o in vg.projector)
    return {"vision": float(tower), "projector": float(proj)}


def _sized(vg: VisionGeometry, n_visual: int) -> VisionGeometry:
    """A Qwen-VL tower (``dynamic``) encodes one image of ``n_visual * merge`` patches (its size is the image's)."""
    if vg.dynamic and vg.crop_patches != int(n_visual) * vg.merge:
        from dataclasses import replace

        return replace(vg, crop_patches=int(n_visual) * vg.merge, grid=None)
    return vg


def _crops(vg: VisionGeometry, n_visual: int) -> int:
    """Crops a prompt of ``n_visual`` LLM visual tokens came from (LLaVA-NeXT: the largest multiple of a crop
    that fits, newline tokens and unpadding ignored; InternVL: tiles of ``crop_patches / merge`` tokens;
    Qwen-VL: one image)."""
    if vg.dynamic:
        return 1
    per_crop = vg.crop_patches // vg.merge
    return max(1, int(n_visual) // per_crop) if n_visual else 0


def unpruned_flops(model_config: Any, n_text: int, n_visual: int, logits_tokens: int = 1) -> dict:
    """FLOPs of the unpatched model on one row (keys as ``policy_flops``; every ratio 1)."""
    g = TextGeometry.of(model_config)
    tokens = [int(n_text) + int(n_visual)] * g.num_hidden_layers
    out = _result(g, tokens, tokens, [], logits_tokens)
    out.update(lower_bound_stages=[], upper_bound_stages=[], vision_upper_bound_stages=[])
    vg = VisionGeometry.of(model_config)
    parts = None
    if vg is not None and n_visual:
        vg = _sized(vg, int(n_visual))
        parts = vision_flops(vg, _crops(vg, int(n_visual)))
    return _with_parts(out, vg, parts, parts)


def with_untouched_tower(out: dict, model_config: Any, n_text: int, n_visual: int) -> dict:
    """``out`` (``trace_flops``) with the whole vision tower + projector of a row of ``n_visual`` visual tokens added
    to both sides when it counted none because the trace has no stage (structural ops alone leave none) and the
    model has a known tower; ``out`` itself otherwise."""
    if out.get("vision_flops") is not None or not n_visual:
        return out
    whole = unpruned_flops(model_config, int(n_text), int(n_visual))
    if whole["vision_flops"] is None:
        return out
    parts = {"vision": whole["vision_flops"], "projector": whole["projector_flops"]}
    llm = {"flops": out["llm_flops"], "baseline_flops": out["llm_baseline_flops"], "ratio": out["llm_ratio"]}
    return _with_parts({**out, **llm}, VisionGeometry.of(model_config), parts, parts)


def _with_parts(out: dict, vg: VisionGeometry | None, policy_parts: dict | None, base_parts: dict | None) -> dict:
    """Adds the parts and makes ``flops`` / ``baseline_flops`` / ``ratio`` the total (LLM-only under ``llm_*``)."""
    out["llm_flops"], out["llm_baseline_flops"], out["llm_ratio"] = out["flops"], out["baseline_flops"], out["ratio"]
    if vg is None or policy_parts is None:
        out.update(vision_flops=None, vision_baseline_flops=None, projector_flops=None,
                   projector_baseline_flops=None, parts_counted=["llm"])
        return out
    flops = out["flops"] + policy_parts["vision"] + policy_parts["projector"]
    base = out["baseline_flops"] + base_parts["vision"] + base_parts["projector"]
    out.update(vision_flops=policy_parts["vision"], vision_baseline_flops=base_parts["vision"],
               projector_flops=policy_parts["projector"], projector_baseline_flops=base_parts["projector"],
               parts_counted=["vision", "projector", "llm"], flops=flops, baseline_flops=base, ratio=flops / base)
    return out


# -- structural ops ------------------------------------------------------------------------------
def structural_layer_flops(g: TextGeometry, t: int, v: int, ops: Mapping[str, Any], nominal: bool,
                           subset_attention: bool = True, grid_width: int | None = None) -> float:
    """FLOPs of one decoder layer seeing ``t`` text and ``v`` visual tokens under structural ``ops``.

    ``ops`` (for this layer): ``skip_all``, ``skip_visual`` (bools), ``heads_all`` / ``heads_visual``
    (pruned head tuples), ``kv_text_only`` (KV heads whose visual rows skip k/v_proj: all their
    query heads pruned for visual tokens), ``ffn`` (visual MLP width), ``neighbor`` (window),
    ``skip_attn`` / ``skip_ffn`` (bools: the attention / MLP sublayer removed for every token),
    ``attn_visual`` / ``ffn_visual`` (bools: removed for visual tokens; counted as ``skip_visual``'s
    attention / MLP part).

    ``nominal=False`` counts what this implementation computes: ``prune_heads(scope=visual)`` is
    real on every backend (visual rows skip the pruned heads' q/o columns, pruned heads attend
    text x text); with ``subset_attention`` (eager / sdpa)
    ``skip_visual`` computes no visual query and ``neighbor`` lets each visual query attend
    ``t + min((2*(w//2)+1) * W, v)`` keys (whole grid rows of width ``W = grid_width``, default
    ``round(sqrt(v))``: one square grid); without it (2-D-mask backends) ``skip_visual`` still runs
    the visual attention rows. ``nominal=True`` counts what the op's semantics allow (visual
    queries skipped, pruned heads skipped for visual queries and for text x visual pairs, visual
    queries attending ``t + min(w^2, v)`` keys).
    Same conventions as ``layer_flops`` (full n x n attention, multiply-add = 2 FLOPs).
    """
    if ops.get("skip_all"):
        return 0.0
    d, m, h = g.hidden_size, g.intermediate_size, g.head_dim
    H, Hkv = g.num_attention_heads, g.num_key_value_heads
    n = t + v
    heads = H
    kv_heads = Hkv
    pruned_all = tuple(ops.get("heads_all", ()))
    if pruned_all:
        grp = H // Hkv
        kept = [x for x in range(H) if x not in pruned_all]
        per = [sum(1 for x in kept if x // grp == k) for k in range(Hkv)]
        counts = {c for c in per if c}
        heads = len(kept)
        kv_heads = sum(1 for c in per if c) if len(counts) == 1 else heads
    skip_v = bool(ops.get("skip_visual"))
    skip_va = skip_v or bool(ops.get("attn_visual"))  # visual rows: no q_proj, attention rows, o_proj
    skip_vm = skip_v or bool(ops.get("ffn_visual"))  # visual rows: no MLP
    pv = len(ops.get("heads_visual", ()))
    kv_skip = int(ops.get("kv_text_only", 0))
    w = ops.get("neighbor") if (nominal or subset_attention) else None
    if w is None:
        vis_keys = v
    elif nominal:
        vis_keys = min(w * w, v)
    else:
        width = grid_width if grid_width is not None else max(1, round(v ** 0.5))
        vis_keys = min((2 * (w // 2) + 1) * width, v)
    q_rows_vis = 0 if (skip_va and (nominal or subset_attention)) else v  # visual query rows in the attention
    # projections: q and o per head and row (skip_visual: text rows only); k, v for every row
    q_flops = d * h * (heads * t + (heads - pv) * (0 if skip_va else v))
    o_rows_vis = 0 if skip_va else v
    o_flops = d * h * (heads * t + (heads - pv) * o_rows_vis)
    kv_flops = 2 * d * h * (n * kv_heads - v * kv_skip)
    # attention (QK^T + AV): text queries see all n keys (pruned-visual heads: only the t text keys)
    att_text = 2 * t * h * ((heads - pv) * n + pv * t)
    att_vis = 2 * q_rows_vis * h * (heads - pv) * (t + vis_keys) if q_rows_vis else 0
    mlp_vis = 0 if skip_vm else 3 * v * d * ops.get("ffn", m)
    mlp = 3 * t * d * m + mlp_vis
    if ops.get("skip_ffn"):
        mlp = 0
    if ops.get("skip_attn"):
        q_flops = o_flops = kv_flops = att_text = att_vis = 0
    return float(2 * (q_flops + o_flops + kv_flops + mlp) + 2 * (att_text + att_vis))


def structural_flops(model_config: Any, policy: Any, n_text: int, n_visual: int, plan: Any = None,
                     logits_tokens: int = 1, subset_attention: bool = True, grid_width: int | None = None) -> dict:
    """Predicted prefill FLOPs of a policy with structural ops (token stages included).

    ``plan``: the handle's ``StructuralPlan`` (``handle.structural``); without it the plan is built
    from the policy alone (then calibration-file stages are refused: pass the handle's plan).
    ``subset_attention``: ``handle.structural_attention`` (False on 2-D-mask backends such as flash);
    ``grid_width``: tokens per patch-grid row (default ``round(sqrt(n_visual))``).

    Returns ``{"flops", "nominal_flops", "baseline_flops", "ratio", "nominal_ratio",
    "tokens_per_layer", "mask_only", "partial", "mlp_rows"}``: ``flops`` is what this implementation computes,
    ``nominal_flops`` what the operations' semantics allow; ``mask_only`` / ``partial`` list the ops
    whose savings are simulated with masks / only partly realised (see ``structural.plan.SAVINGS``);
    ``mlp_rows`` the rows that run an MLP, summed over the layers (MoE: the tokens routed to their active experts;
    skipped layers, removed MLP sublayers and visual rows of visual-scope skips route nowhere). A MoE geometry
    refuses ``ffn_cut`` by name (``stages[i].op``: patch() refuses it too, there is no gate_proj to slice).
    """
    from ..structural.plan import StructuralPlan, capture_layers, static_plan, text_only_kv_heads

    g = TextGeometry.of(model_config)
    pol = Policy.parse(policy)
    pol = pol.at_depth(g.num_hidden_layers) if g.num_hidden_layers >= 2 else pol  # paper layers on this depth
    if g.num_experts:  # mixture of experts: patch() refuses ffn_cut (no gate_proj), so there is nothing to count
        from ..structural.plan import MOE_FFN_CUT

        cut = [i for i, st in enumerate(pol.stages) if st.op == "ffn_cut"]
        if cut:
            raise IncompatiblePolicyError(f"stages[{cut[0]}].op", MOE_FFN_CUT.format(
                what=f"this text config's MLPs are sparse MoE blocks (num_experts={g.num_experts})"))
    tokens = _schedule(g, pol, int(n_text), int(n_visual))[0]
    if plan is None:
        plan = static_plan(pol, g.num_hidden_layers, g.num_attention_heads, g.intermediate_size)
    if plan is None:
        plan = StructuralPlan(g.num_hidden_layers, g.num_attention_heads)
    totals = {False: 0.0, True: 0.0}
    mlp_rows = 0  # rows that run a decoder layer's MLP (MoE: route to their experts), summed over the layers
    for j, n in enumerate(tokens):
        v = n - int(n_text)
        if not (j in plan.skip_all or j in getattr(plan, "skip_ffn", ())):
            mlp_rows += int(n_text) if j in plan.skip_visual or j in getattr(plan, "ffn_visual", ()) else n
        ops = {"skip_all": j in plan.skip_all, "skip_visual": j in plan.skip_visual,
               "heads_all": plan.heads_all.get(j, ()), "heads_visual": plan.heads_visual.get(j, ()),
               "skip_attn": j in getattr(plan, "skip_attn", ()), "skip_ffn": j in getattr(plan, "skip_ffn", ()),
               "attn_visual": j in getattr(plan, "attn_visual", ()), "ffn_visual": j in getattr(plan, "ffn_visual", ())}
        if j in plan.ffn:
            ops["ffn"] = plan.ffn[j]
        if j in plan.neighbor:
            ops["neighbor"] = plan.neighbor[j]
        gone = len(text_only_kv_heads(plan.heads_visual.get(j, ()), g.num_attention_heads, g.num_key_value_heads))
        for nominal in (False, True):  # the implementation keeps k/v_proj whole where a criterion captures the keys
            ops["kv_text_only"] = gone if nominal or j not in capture_layers(pol) else 0
            totals[nominal] += structural_layer_flops(g, int(n_text), v, ops, nominal, subset_attention,
                                                      grid_width if grid_width is not None else (round(int(n_visual) ** 0.5) or 1))
    head = lm_head_flops(g, logits_tokens)
    base = prefill_flops(g, [int(n_text) + int(n_visual)] * g.num_hidden_layers, logits_tokens)
    mask_only = ["neighbor_attention"] if plan.neighbor and not subset_attention else []
    partial = ["skip_layers(scope=visual)"] if plan.skip_visual and not subset_attention else []
    if getattr(plan, "attn_visual", ()) and not subset_attention:
        partial.append("skip_sublayers(scope=visual, attn)")
    return {
        "tokens_per_layer": tokens,
        "flops": totals[False] + head,
        "nominal_flops": totals[True] + head,
        "baseline_flops": base,
        "ratio": (totals[False] + head) / base,
        "nominal_ratio": (totals[True] + head) / base,
        "mask_only": mask_only,
        "partial": partial,
        "mlp_rows": mlp_rows,
    }
