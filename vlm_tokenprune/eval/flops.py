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
estimate in ``SCORING_FLOPS`` report ``None`` (unknown).

All counts are per sequence (one batch row); a batch of ``B`` padded rows costs ``B``
times the count at the padded length. Ratios do not depend on ``B``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import IncompatiblePolicyError, InputError
from ..policy import Policy

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
def _fastv_scoring(g: TextGeometry, n_tokens: int, n_visual: int, params: Mapping[str, Any]) -> float:
    # ``attention_rows(softmax_over="row")``: q_proj on the last row, k_proj on all n_tokens rows
    # of the scoring layer's input, one row of logits over n_tokens keys.
    return float(2 * g.hidden_size * g.q_dim + 2 * n_tokens * g.hidden_size * g.kv_dim + 2 * n_tokens * g.q_dim)


SCORING_FLOPS: dict[str, Callable[[TextGeometry, int, int, Mapping[str, Any]], float]] = {
    "fastv": _fastv_scoring,
    "random": lambda g, n, v, p: 0.0,
    "uniform": lambda g, n, v, p: 0.0,
}
"""criterion name -> ``f(geometry, tokens entering the scoring layer, visual tokens, params)``."""


def scoring_flops(text_config: Any, criterion: str, n_tokens: int, n_visual: int, params: Mapping[str, Any] | None = None) -> float | None:
    """FLOPs one stage spends scoring, or ``None`` when the criterion has no estimate."""
    fn = SCORING_FLOPS.get(criterion)
    return None if fn is None else fn(TextGeometry.of(text_config), int(n_tokens), int(n_visual), params or {})


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
    cur = n_visual
    for i, st in enumerate(pol.stages):
        if st.layer >= L:
            raise IncompatiblePolicyError(f"stages[{i}].layer", f"{st.layer} is beyond the model; allowed: 1..{L - 1}")
        k = st.budget.count(n_visual)
        if k > cur:
            where = f"stages[{i}].tokens" if st.budget.tokens is not None else f"stages[{i}].keep"
            raise IncompatiblePolicyError(where, f"keeps {k} visual tokens but only {cur} are left at that point")
        if k == cur:  # the engine leaves the sequence untouched and runs no criterion
            scoring.append(0.0)
        else:
            scoring.append(scoring_flops(g, st.criterion, n_text + cur, cur, st.params))
        for layer in range(st.layer, L):
            visual[layer] = k
        cur = k
    return [n_text + v for v in visual], scoring


def policy_flops(model_config: Any, policy: Any, n_text: int, n_visual: int, logits_tokens: int = 1) -> dict:
    """Predicted prefill FLOPs of ``policy`` on a prompt of ``n_text`` text and ``n_visual`` visual tokens.

    A stage at layer k keeping ``keep=r`` leaves ``max(1, floor(r * n_visual + 0.5))`` visual
    tokens to layers >= k (``tokens=t`` leaves t); layers below the first stage see all
    ``n_text + n_visual``.

    Returns:
        ``{"tokens_per_layer", "flops", "baseline_flops", "ratio", "scoring_flops"}``;
        ``scoring_flops`` (separate, not in ``flops``) is ``None`` if a criterion has no estimate.
    """
    g = TextGeometry.of(model_config)
    tokens, scoring = _schedule(g, Policy.parse(policy), int(n_text), int(n_visual))
    return _result(g, tokens, [n_text + n_visual] * g.num_hidden_layers, scoring, logits_tokens)


def trace_flops(text_config: Any, trace: Any, logits_tokens: int = 1) -> dict:
    """FLOPs of the prefill a ``handle.last_trace()`` describes (same keys as ``policy_flops``).

    ``trace.tokens_per_layer`` is the sequence length each decoder layer saw; the baseline
    is every layer at the first layer's length (layer 0 is never pruned).
    """
    g = TextGeometry.of(text_config)
    if trace is None:
        raise InputError("trace", "is None: run a forward of the patched model first")
    if getattr(trace, "phase", "prefill") == "decode":
        raise InputError("trace", "is a cached decode step; FLOPs are counted for a prefill trace")
    tokens = list(trace.tokens_per_layer)
    if not tokens:
        raise InputError("trace.tokens_per_layer", "is empty")
    scoring = []
    for s in trace.stages:
        noop = s.tokens_before == s.tokens_after and list(s.visual_before) == list(s.visual_after)
        n_vis = max(s.visual_before) if s.visual_before else 0
        scoring.append(0.0 if noop else scoring_flops(g, s.criterion, s.tokens_before, n_vis))
    return _result(g, tokens, [tokens[0]] * len(tokens), scoring, logits_tokens)


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
