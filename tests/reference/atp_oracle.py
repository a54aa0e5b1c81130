"""Independent reference implementation of one ATP-LLaVA module (Ye et al., arXiv 2412.00447), batch size 1.

Written from the paper's equations as this project specifies them (README, methods/atp.py), sharing
no code with ``vlm_tokenprune``: only torch, the Hugging Face model's own modules (an eager copy,
``output_attentions=True``), the FastV oracle's plumbing and the FEATHER oracle's patch-grid layout.
The module's weights are read as plain tensors from its state dict (``fc1.weight`` ...).

For a module between decoder layers K-1 and K:
  * A = the eager model's post-softmax attention in layer K-1 ([H, T, T], RoPE, causal);
  * S_self[j]  = 1/H sum_h 1/N sum_{i visual} A[h, i, j]        (attention from the visual tokens)
    S_cross[j] = 1/H sum_h 1/T' sum_{t instruction} A[h, t, j] (from the text after the first image);
    each min-max normalised over the visual tokens (0 when constant); S_red = (S_self + S_cross) / 2;
  * S_sp[j] = 1 - 1/s for the largest stride s of ``strides`` whose grid (every s-th row and column of
    the token's image, from its first row / column) holds j, else 0 (SAP, lambda = 1, rate 1/s per axis);
  * f = [mean S_self, mean S_cross, std S_self, std S_cross (population), mean over the visual tokens of
    LN(h), mean over the instruction tokens of LN(h)] with h the hidden states entering layer K-1 and
    LN a layer norm without affine (eps 1e-5);
  * (theta_r, theta_s) = sigmoid(W2 gelu(W1 f + b1) + b2);
  * margin[j] = tau * max(S_red[j] - theta_r, S_sp[j] - theta_s); soft mask sigmoid(margin);
    hard mask margin > 0 (the highest margin alone if none is above 0);
  * the visual tokens outside the hard mask are dropped before layer K; the rest keep their
    original position ids.
"""
from __future__ import annotations

import math

import torch

from . import eager_runner as base
from .feather_oracle import grid_layout


def _minmax(vals: list[float]) -> list[float]:
    lo, hi = min(vals), max(vals)
    return [0.0 if hi <= lo else (v - lo) / (hi - lo) for v in vals]


def _layer_norm(x: torch.Tensor) -> list[float]:
    x = [float(v) for v in x.double()]
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return [(v - mean) / math.sqrt(var + 1e-5) for v in x]


def _mean_vectors(vecs: list[list[float]], dim: int) -> list[float]:
    if not vecs:
        return [0.0] * dim
    return [sum(v[d] for v in vecs) / len(vecs) for d in range(dim)]


def _linear(w: torch.Tensor, b: torch.Tensor, x: list[float]) -> list[float]:
    return [sum(float(w[o, i]) * x[i] for i in range(len(x))) + float(b[o]) for o in range(w.shape[0])]


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def spatial(model, inputs, strides) -> dict[int, float]:
    """SAP score per visual position."""
    img = base.image_positions(model, inputs["input_ids"])
    cells = dict(zip(img, grid_layout(model, inputs)))
    first: dict[int, tuple[int, int]] = {}
    for cell in cells.values():
        if cell is not None:
            g, r, c = cell
            r0, c0 = first.get(g, (r, c))
            first[g] = (min(r0, r), min(c0, c))
    out = {}
    for p, cell in cells.items():
        out[p] = 0.0
        if cell is None:
            continue
        g, r, c = cell
        for s in sorted(strides):
            if (r - first[g][0]) % s == 0 and (c - first[g][1]) % s == 0:
                out[p] = 1.0 - 1.0 / s
    return out


def atp_run(model, inputs: dict, weights: dict, hp: dict) -> dict:
    """Every intermediate of the module (per visual position), the kept positions and ``[1, L_kept, V]`` logits."""
    K, tau, strides = hp["layer"], hp["tau"], hp["strides"]
    eager = base.eager_copy(model)
    embeds = base.prompt_embeds(model, inputs)
    T = embeds.shape[1]
    pos = list(range(T))
    img = base.image_positions(model, inputs["input_ids"])
    text = [p for p in pos if p > img[0] and p not in set(img)]
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions[K - 1][0].double()  # [H, T, T]
        hidden = base.run_layers(eager, embeds, pos, range(K - 1))[0]  # [T, D] entering layer K-1
    H = att.shape[0]
    raw_self = [sum(float(att[h, i, j]) for h in range(H) for i in img) / (H * len(img)) for j in img]
    raw_cross = [sum(float(att[h, t, j]) for h in range(H) for t in text) / (H * len(text)) if text else 0.0 for j in img]
    s_self, s_cross = _minmax(raw_self), _minmax(raw_cross)
    s_red = [(a + b) / 2 for a, b in zip(s_self, s_cross)]
    sp = spatial(model, inputs, strides)
    s_sp = [sp[p] for p in img]

    def mean_std(v):
        m = sum(v) / len(v)
        return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    (m_s, sd_s), (m_c, sd_c) = mean_std(s_self), mean_std(s_cross)
    D = hidden.shape[-1]
    f = [m_s, m_c, sd_s, sd_c]
    f += _mean_vectors([_layer_norm(hidden[p]) for p in img], D)
    f += _mean_vectors([_layer_norm(hidden[p]) for p in text], D)
    z = _linear(weights["fc1.weight"], weights["fc1.bias"], f)
    z = [0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in z]
    t = _linear(weights["fc2.weight"], weights["fc2.bias"], z)
    theta_r, theta_s = _sigmoid(t[0]), _sigmoid(t[1])
    margin = [tau * max(r - theta_r, s - theta_s) for r, s in zip(s_red, s_sp)]
    kept = [p for p, m in zip(img, margin) if m > 0] or [img[max(range(len(img)), key=lambda n: margin[n])]]
    logits = run_kept(eager, embeds, K, set(img), kept)
    per = lambda v: dict(zip(img, v))  # noqa: E731
    return {"s_self": per(s_self), "s_cross": per(s_cross), "s_red": per(s_red), "s_sp": per(s_sp),
            "theta_r": theta_r, "theta_s": theta_s, "margin": per(margin),
            "soft": per([_sigmoid(m) for m in margin]), "kept": kept, "logits": logits}


def run_kept(eager, embeds: torch.Tensor, K: int, img: set, kept: list[int]) -> torch.Tensor:
    """Logits of the sequence ``embeds`` with the visual tokens outside ``kept`` dropped before layer K."""
    return base.logits_dropping(eager, embeds, sorted(img), kept, before_layer=K)


def atp_generate(model, inputs: dict, weights: dict, hp: dict, steps: int, eos_token_id=None) -> list[int]:
    """Greedy tokens without a KV cache, the kept set chosen once from the prompt (a cached generate)."""
    run = atp_run(model, inputs, weights, hp)
    eager = base.eager_copy(model)
    embeds = base.prompt_embeds(model, inputs)
    img = set(base.image_positions(model, inputs["input_ids"]))
    return base.greedy(eager, embeds, steps, eos_token_id,
                       lambda seq, step: run["logits"] if step == 0 else run_kept(eager, seq, hp["layer"], img, run["kept"]))


def soft_mask_logits(model, inputs: dict, K: int, soft: dict) -> torch.Tensor:
    """Training forward: ``[1, T, V]`` logits with every token kept and, in layers >= K, ``log M_j`` added to
    the attention logits of every query for each visual key j (``soft``: position -> M_j)."""
    eager = base.eager_copy(model)
    embeds = base.prompt_embeds(model, inputs)
    lm = eager.model.language_model
    T = embeds.shape[1]
    pos = list(range(T))
    causal = base.causal_mask(T, embeds.dtype)
    logm = torch.zeros(1, 1, 1, T, dtype=torch.float64)
    for p, m in soft.items():
        logm[0, 0, 0, p] = math.log(m)
    masked = (causal.double() + logm).clamp(min=torch.finfo(embeds.dtype).min).to(embeds.dtype)
    with torch.no_grad():
        hidden = base.run_layers(eager, embeds, pos, range(K))
        position_ids = torch.tensor([pos], dtype=torch.long)
        cos, sin = lm.rotary_emb(hidden, position_ids)
        for i in range(K, len(lm.layers)):
            out = lm.layers[i](hidden, attention_mask=masked, position_ids=position_ids, position_embeddings=(cos, sin))
            hidden = out[0] if isinstance(out, tuple) else out
        return eager.lm_head(lm.norm(hidden))
