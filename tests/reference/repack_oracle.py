"""Independent reference for the position ids after an LLM-stage token drop: ``gaps`` (kept tokens keep their
original ids, FastV's code) and ``repack`` (FlowCut's official LLaVA-NeXT path, arXiv 2505.19536,
``flowcut/modeling_llama_flowcut.py``: after the prune layer ``position_ids = arange(0, kept_len)`` and, while
decoding, ``position_ids -= visual_token_num - target_num`` for the layers after it).

Plain loops over decoder layers of an eager copy, batch size 1, no KV cache, sharing no code with
``vlm_tokenprune`` (torch, the Hugging Face model's own modules and the eager runner only):

  * ``stages``: ``(layer, mode, selector)``; before decoder layer ``layer`` the image tokens outside the
    selector's set leave the sequence; ``mode="repack"`` renumbers every remaining token 0..n'-1 for the layers
    from ``layer`` on, ``"gaps"`` keeps the ids they had. The selector is a list of kept image positions (original
    prompt indices), or an int k: FastV at that point (the last token's attention in layer ``layer - 1``, RoPE at
    the ids that layer uses, full-row softmax, heads averaged; the top k image tokens, ties to the lower index);
  * generation re-runs the whole sequence each step: generated tokens are text (never dropped) appended at the
    end, so the layers before a stage number them after the whole prompt and the layers after a repack after the
    kept prompt, which is what a KV cache built by that prefill continues.
"""
from __future__ import annotations

import math

import torch

from . import eager_runner as base


def fastv_choice(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int], tokens: list[int], img: set[int],
                 k: int) -> list[int]:
    """Top-k image tokens (original indices) by the last token's attention in layer ``layer_idx``."""
    q, kk, _ = base.head_projections(eager, layer_idx, hidden, pos, dtype=torch.float64)
    H, T, d = q.shape
    score = {}
    for h in range(H):
        row = torch.softmax(torch.stack([q[h, T - 1] @ kk[h, j] / math.sqrt(d) for j in range(T)]), dim=0)
        for j, t in enumerate(tokens):
            if t in img:
                score[t] = score.get(t, 0.0) + float(row[j]) / H
    return base.top_k_positions(score, k)


def run(eager, embeds: torch.Tensor, img_pos: list[int], stages: list[tuple]) -> tuple[torch.Tensor, list]:
    """``(logits [1, n_last, V], kept sets)``: the prompt (and any appended tokens) ``embeds`` through every layer
    with ``stages`` applied; ``kept sets``: each stage's kept image positions."""
    lm = eager.model.language_model
    T = embeds.shape[1]
    img = set(img_pos)
    tokens, pos, hidden = list(range(T)), list(range(T)), embeds
    at = {layer: (mode, sel) for layer, mode, sel in stages}
    kept_sets = []
    prev_hidden, prev_pos = None, None  # the input of the layer just run (what a stage after it scores)
    with torch.no_grad():
        for i in range(len(lm.layers)):
            if i in at:
                mode, sel = at[i]
                keep = set(fastv_choice(eager, i - 1, prev_hidden, prev_pos, tokens, img, sel)
                           if isinstance(sel, int) else sel)
                kept_sets.append(sorted(t for t in tokens if t in keep))
                idx = [j for j, t in enumerate(tokens) if t not in img or t in keep]
                hidden = hidden[:, idx]
                tokens = [tokens[j] for j in idx]
                pos = list(range(len(idx))) if mode == "repack" else [pos[j] for j in idx]
            prev_hidden, prev_pos = hidden, pos
            hidden = base.run_layers(eager, hidden, pos, [i])
        return base.lm_logits(eager, hidden), kept_sets


def logits(model, inputs: dict, stages: list[tuple]) -> tuple[torch.Tensor, list]:
    eager = base.eager_copy(model)
    embeds = base.prompt_embeds(model, inputs)
    return run(eager, embeds, base.image_positions(model, inputs["input_ids"]), stages)


def generate(model, inputs: dict, stages: list[tuple], steps: int, eos_token_id=None) -> list[int]:
    """Greedy tokens, no cache: the kept sets are chosen once on the prompt (a cached ``generate()``)."""
    eager = base.eager_copy(model)
    embeds = base.prompt_embeds(model, inputs)
    img_pos = base.image_positions(model, inputs["input_ids"])
    _, kept = run(eager, embeds, img_pos, stages)
    fixed = [(layer, mode, k) for (layer, mode, _), k in zip(stages, kept)]
    return base.greedy(eager, embeds, steps, eos_token_id, lambda seq, step: run(eager, seq, img_pos, fixed)[0])
