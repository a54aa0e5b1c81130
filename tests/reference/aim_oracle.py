"""Independent reference implementation of AIM's in-LLM pruning (Zhong et al., arXiv 2412.03248,
stage B; official ``get_importance`` in LaVi-Lab/AIM), batch size 1.

Written from the paper / official code, sharing no code with ``vlm_tokenprune`` (the model
plumbing comes from ``fastv_oracle``, itself independent of the library):

  * for a stage at layer K, the scoring layer is K-1 (the official code computes the importance
    from a layer's attention and masks tokens from the next layer on);
  * logits = (RoPE(q) . RoPE(k)) * scaling over the FULL current sequence [H, T, T], q and k
    built by hand from the layer's modules, causal mask (keys j > i excluded);
  * M = softmax(logits / tau) per row; pi_0 = 1/T; pi <- (1 - d) pi M + d/T, ``iters`` times;
    importance = sqrt(mean_h pi[h]^2);
  * keep the top-k image tokens by importance (ties -> lower position); text is never dropped;
  * the dropped tokens are REMOVED (not masked): layers >= K run on the kept tokens with their
    original position ids and a plain causal mask; a later stage scores on that shorter
    sequence (T = its length).

Everything in float64 where the oracle computes by itself, no KV cache, one layer call at a time.
"""
from __future__ import annotations

import math

import torch

from .eager_runner import eager_copy, greedy, head_projections, image_positions, prompt_embeds, run_layers


def attention_logits(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """``[H, T, T]`` float64 attention logits of decoder layer ``layer_idx`` on ``hidden`` [1, T, D]
    whose tokens sit at original positions ``pos``; -inf above the diagonal (causal)."""
    q, k, _ = head_projections(eager, layer_idx, hidden, pos, dtype=torch.float64)
    T = q.shape[1]
    logits = torch.einsum("hid,hjd->hij", q, k) * eager.model.language_model.layers[layer_idx].self_attn.scaling
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, float("-inf"))


def pagerank(logits: torch.Tensor, tau: float = 0.1, iters: int = 5, d: float = 0.0) -> list[float]:
    """AIM importance of every token from ``[H, T, T]`` logits."""
    H, T, _ = logits.shape
    M = torch.softmax(logits / tau, dim=-1)  # row-stochastic per head
    out = [0.0] * T
    for h in range(H):
        pi = torch.full((T,), 1.0 / T, dtype=torch.float64)
        for _ in range(iters):
            pi = (1 - d) * (pi @ M[h]) + d / T
        for j in range(T):
            out[j] += float(pi[j]) ** 2 / H
    return [math.sqrt(v) for v in out]


def run(eager, embeds: torch.Tensor, img_pos: list[int], stages: list[tuple[int, int]],
        fixed: list[list[int]] | None = None, tau: float = 0.1, iters: int = 5, d: float = 0.0) -> dict:
    """Run the model with AIM stages ``[(layer, k), ...]`` (or with the kept image positions
    ``fixed[s]`` of each stage given). Returns the logits, the kept sets and, per stage, the
    importance of the image tokens present at its scoring layer."""
    lm = eager.model.language_model
    n_layers = len(lm.layers)
    at = {layer: s for s, (layer, _) in enumerate(stages)}
    assert len(at) == len(stages) and all(1 <= layer < n_layers for layer in at)
    img = set(img_pos)
    cur = list(range(embeds.shape[1]))  # original positions of the current tokens
    hidden, prev = embeds, None
    kept_sets, scores = [], []
    with torch.no_grad():
        for i in range(n_layers):
            if i in at:
                s = at[i]
                visual = [p for p in cur if p in img]
                if fixed is None:
                    imp = pagerank(attention_logits(eager, i - 1, prev, cur), tau, iters, d)
                    score = {p: imp[t] for t, p in enumerate(cur) if p in img}
                    k = stages[s][1]
                    assert 1 <= k <= len(visual)
                    keep = sorted(sorted(visual, key=lambda p: (-score[p], p))[:k])
                    scores.append(score)
                else:
                    keep = list(fixed[s])
                    assert set(keep) <= set(visual)
                kept_sets.append(keep)
                idx = [t for t, p in enumerate(cur) if p not in img or p in set(keep)]
                hidden = hidden[:, idx]
                cur = [cur[t] for t in idx]
            prev = hidden
            hidden = run_layers(eager, hidden, cur, [i])
        logits = eager.lm_head(lm.norm(hidden))
    return {"logits": logits, "kept": kept_sets, "scores": scores, "positions": cur}


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def aim_run(model, inputs: dict, stages: list[tuple[int, int]], fixed=None, **kw) -> dict:
    embeds = prompt_embeds(model, inputs)
    return run(eager_copy(model), embeds, image_positions(model, inputs["input_ids"]), stages, fixed, **kw)


def aim_generate(model, inputs: dict, stages: list[tuple[int, int]], steps: int, rescore: bool,
                 eos_token_id=None, **kw) -> list[int]:
    """Greedy tokens recomputing the whole sequence each step (no KV cache). ``rescore=False``: the
    prompt's kept sets serve every step (= a KV-cached generate); ``True``: re-chosen each step."""
    eager = eager_copy(model)
    embeds = prompt_embeds(model, inputs)
    img_pos = image_positions(model, inputs["input_ids"])
    fixed = run(eager, embeds, img_pos, stages, **kw)["kept"]
    return greedy(eager, embeds, steps, eos_token_id,
                  lambda seq, step: run(eager, seq, img_pos, stages, None if rescore else fixed, **kw)["logits"])
