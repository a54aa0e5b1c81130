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
computed (1 by default: generation needs only the last token's logits).

Not counted: norms, RoPE, softmax, embeddings, the vision tower and the projector (both
are untouched by LLM-site policies). Biases (Qwen2's q/k/v) are ignored.

The cost of scoring (extra projections a criterion computes to rank tokens) is reported
SEPARATELY as ``scoring_flops``, never folded into ``flops``; criteria without an
estimate in ``SCORING_FLOPS`` report ``None`` (unknown). The scoring layer's own
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
from typing import Any, Callable, Mapping

from ..errors import IncompatiblePolicyError, InputError
from ..policy import Policy
from ..registry import CRITERIA

FORMULA = "per layer 2*(n*d*(q+2*kv) + n*q*d + 2*n^2*q + 3*n*d*m) FLOPs (= 2*(4nd^2+2n^2d+3ndm) without GQA) + LM head 2*d*V per logit row"


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
        return cls(**values)


# -- the formula ---------------------------------------------------------------------------------
def layer_flops(text_config: Any, n: int) -> float:
    """FLOPs of one decoder layer that sees ``n`` tokens (see the module docstring)."""
    g = TextGeometry.of(text_config)
    d, q, kv, m = g.hidden_size, g.q_dim, g.kv_dim, g.intermediate_size
    n = int(n)
    projections = n * d * q + 2 * n * d * kv + n * q * d
    attention = 2 * n * n * q
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
    return sum(layer_flops(g, n) for n in tokens_per_layer) + lm_head_flops(g, logits_tokens)


# -- scoring overhead (reported separately) ------------------------------------------------------
def _last_row_scoring(g: TextGeometry, n_keys: int) -> float:
    # q_proj on the last row + one row of logits over n_keys captured keys (RoPE, softmax: not counted)
    return float(2 * g.hidden_size * g.q_dim + 2 * n_keys * g.q_dim)


SCORING_FLOPS: dict[str, Callable[[TextGeometry, int, int, Mapping[str, Any]], float]] = {
    "fastv": lambda g, n, v, p: _last_row_scoring(g, n),  # softmax over the whole causal row
    "feather": lambda g, n, v, p: _last_row_scoring(g, v if p.get("softmax", "keys") == "keys" else n),
    "random": lambda g, n, v, p: 0.0,
    "uniform": lambda g, n, v, p: 0.0,
    # every non-visual token counted as a text query (an upper bound: only the text after the image is),
    # plus the cosines of every visual token to the k_key key tokens
    "efficientvla": lambda g, n, v, p: (n - v) * _last_row_scoring(g, n) + 2.0 * v * p.get("k_key", 4) * g.hidden_size,
}
"""criterion name -> ``f(geometry, tokens entering the scoring layer, visual tokens, params)``."""


def scoring_flops(text_config: Any, criterion: str, n_tokens: int, n_visual: int, params: Mapping[str, Any] | None = None) -> float | None:
    """FLOPs one stage spends scoring, or ``None`` when the criterion has no estimate."""
    fn = SCORING_FLOPS.get(criterion)
    if fn is None:
        return None
    if params is None:  # the criterion's defaults
        crit = CRITERIA.get(criterion) if criterion in CRITERIA else None
        params = {k: p.default for k, p in getattr(crit, "params", {}).items()}
    return fn(TextGeometry.of(text_config), int(n_tokens), int(n_visual), params)


def selects_beyond_budget(criterion: str) -> bool:
    """True when the criterion overrides ``select`` (its kept count may exceed the budget)."""
    from ..methods.base import Criterion

    crit = CRITERIA.get(criterion) if criterion in CRITERIA else None
    return crit is not None and type(crit).select is not Criterion.select and not getattr(crit, "keeps_budget_exactly", False)


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))


# -- predictions and measurements ----------------------------------------------------------------
def policy_tokens_per_layer(text_config: Any, policy: Any, n_text: int, n_visual: int) -> list[int]:
    """Predicted sequence length each decoder layer sees for one row of ``n_text`` + ``n_visual`` tokens."""
    return _schedule(TextGeometry.of(text_config), Policy.parse(policy), n_text, n_visual)[0]


def _schedule(g: TextGeometry, pol: Policy, n_text: int, n_visual: int):
    if n_text < 0 or n_visual < 0:
        raise InputError("n_text/n_visual", f"must be >= 0, got {n_text}, {n_visual}")
    L = g.num_hidden_layers
    visual = [n_visual] * L
    scoring: list[float | None] = []
    lower: list[int] = []
    cur = n_visual
    for i, st in enumerate(pol.stages):
        if st.layer >= L:
            raise IncompatiblePolicyError(f"stages[{i}].layer", f"{st.layer} is beyond the model; allowed: 1..{L - 1}")
        k = st.budget.count(n_visual, cur)
        if k > cur:
            where = f"stages[{i}].tokens" if st.budget.tokens is not None else f"stages[{i}].keep"
            raise IncompatiblePolicyError(where, f"keeps {k} visual tokens but only {cur} are left at that point")
        if k == cur:  # the engine leaves the sequence untouched and runs no criterion
            scoring.append(0.0)
        else:
            scoring.append(scoring_flops(g, st.criterion, n_text + cur, cur, st.params))
            if selects_beyond_budget(st.criterion):
                lower.append(i)
        for layer in range(st.layer, L):
            visual[layer] = k
        cur = k
    return [n_text + v for v in visual], scoring, lower


def policy_flops(model_config: Any, policy: Any, n_text: int, n_visual: int, logits_tokens: int = 1) -> dict:
    """Predicted prefill FLOPs of ``policy`` on a prompt of ``n_text`` text and ``n_visual`` visual tokens.

    A stage at layer k keeping ``keep=r`` leaves ``max(1, floor(r * n_visual + 0.5))`` visual
    tokens to layers >= k (``tokens=t`` leaves t); layers below the first stage see all
    ``n_text + n_visual``.

    Returns:
        ``{"tokens_per_layer", "flops", "baseline_flops", "ratio", "scoring_flops",
        "lower_bound_stages"}``; ``scoring_flops`` (separate, not in ``flops``) is ``None`` if a
        criterion has no estimate; ``lower_bound_stages``: stages whose criterion may keep
        more than its budget (the counts after them are lower bounds).
    """
    g = TextGeometry.of(model_config)
    pol = Policy.parse(policy)
    tokens, scoring, lower = _schedule(g, pol, int(n_text), int(n_visual))
    out = _result(g, tokens, [n_text + n_visual] * g.num_hidden_layers, scoring, logits_tokens)
    out["lower_bound_stages"] = lower
    return out


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
    stages = Policy.parse(policy).stages if policy is not None else None
    scoring = []
    for i, s in enumerate(trace.stages):
        noop = s.tokens_before == s.tokens_after and list(s.visual_before) == list(s.visual_after)
        n_vis = max(s.visual_before) if s.visual_before else 0
        params = dict(stages[i].params) if stages is not None and i < len(stages) else None
        scoring.append(0.0 if noop else scoring_flops(g, s.criterion, s.tokens_before, n_vis, params))
    out = _result(g, tokens, [tokens[0]] * len(tokens), scoring, logits_tokens)
    out["lower_bound_stages"] = []
    return out


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
