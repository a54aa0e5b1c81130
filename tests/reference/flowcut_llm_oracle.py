"""Independent reference implementation of FlowCut's LLM-stage pruning (Tong et al., arXiv 2505.19536),
batch size 1.

Written from the paper and the official LLaVA-NeXT code path's behaviour, in its own layer
numbering, sharing no code with ``vlm_tokenprune`` (only torch, the Hugging Face model's own
modules and the FastV oracle's plumbing).

FlowCut at decoder layer ``P`` (``prune_layer``; the paper's setting is P = 1, 0-based):
  * run layers 0 .. P-1 on the whole prompt; inside layer P, take q, k, v = q_proj / k_proj /
    v_proj of the layer-normed input of layer P, RoPE on q and k, key / value heads repeated to
    the query heads (``repeat_kv``);
  * with the LAST prompt token as query and the image tokens as keys, per head h:
        rel_h = softmax_j( q_last . k_j / sqrt(d) ),   sem_h = softmax_j( v_last . v_j / sqrt(d) )
    (softmax over the image tokens only), averaged over heads; dens_j = L1 norm of the
    head-averaged value v_j;
  * score_j = (rel_j / sum rel + sem_j / sum sem) * dens_j; keep the top-k image tokens (ties ->
    lower position);
  * layer P runs on every token; its OUTPUT loses the dropped image tokens, so layers > P run on
    the kept tokens with their ORIGINAL position ids and a plain causal mask.
"""
from __future__ import annotations

import math

import torch

from . import eager_runner as base


def _qkv(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int]):
    """Per-head q, k, v ``[H, T, d]`` of layer ``layer_idx`` on ``hidden`` [1, T, D] (k, v repeated to H heads)."""
    return base.head_projections(eager, layer_idx, hidden, pos)


def terms_from_embeds(eager, embeds: torch.Tensor, img_pos: list[int], prune_layer: int) -> dict[str, dict[int, float]]:
    """``rel``, ``sem``, ``dens`` and ``score`` of every image position, computed in decoder layer ``prune_layer``."""
    T = embeds.shape[1]
    pos = list(range(T))
    with torch.no_grad():
        hidden = base.run_layers(eager, embeds, pos, range(prune_layer))
        q, k, v = _qkv(eager, prune_layer, hidden, pos)
    q, k, v = q.double(), k.double(), v.double()
    H, _, d = q.shape
    last = T - 1
    rel = {p: 0.0 for p in img_pos}
    sem = {p: 0.0 for p in img_pos}
    for h in range(H):
        r = torch.softmax(torch.stack([q[h, last] @ k[h, p] / math.sqrt(d) for p in img_pos]), dim=0)
        s = torch.softmax(torch.stack([v[h, last] @ v[h, p] / math.sqrt(d) for p in img_pos]), dim=0)
        for n, p in enumerate(img_pos):
            rel[p] += float(r[n]) / H
            sem[p] += float(s[n]) / H
    dens = {p: float(v[:, p].mean(dim=0).abs().sum()) for p in img_pos}
    rs, ss = sum(rel.values()), sum(sem.values())
    score = {p: (rel[p] / rs + sem[p] / ss) * dens[p] for p in img_pos}
    return {"rel": rel, "sem": sem, "dens": dens, "score": score}


def logits_from_embeds(eager, embeds, img_pos: list[int], prune_layer: int, keep: list[int]) -> torch.Tensor:
    return base.logits_dropping(eager, embeds, img_pos, keep, before_layer=prune_layer + 1)  # layer P sees every token


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def flowcut_terms(model, inputs: dict, prune_layer: int) -> dict[str, dict[int, float]]:
    embeds = base.prompt_embeds(model, inputs)
    return terms_from_embeds(base.eager_copy(model), embeds, base.image_positions(model, inputs["input_ids"]), prune_layer)


def flowcut_keep(model, inputs: dict, prune_layer: int, k: int) -> list[int]:
    return base.top_k_positions(flowcut_terms(model, inputs, prune_layer)["score"], k)


def flowcut_logits(model, inputs: dict, prune_layer: int, keep: list[int]) -> torch.Tensor:
    embeds = base.prompt_embeds(model, inputs)
    return logits_from_embeds(base.eager_copy(model), embeds, base.image_positions(model, inputs["input_ids"]),
                              prune_layer, keep)


def flowcut_generate(model, inputs: dict, prune_layer: int, k: int, steps: int, rescore: bool,
                     eos_token_id: int | list[int] | None = None) -> list[int]:
    """Greedy tokens without a KV cache; ``rescore`` as in ``fastv_oracle.fastv_generate``."""
    eager = base.eager_copy(model)
    embeds = base.prompt_embeds(model, inputs)
    img_pos = base.image_positions(model, inputs["input_ids"])

    def keep_of(seq):
        return base.top_k_positions(terms_from_embeds(eager, seq, img_pos, prune_layer)["score"], k)

    fixed = keep_of(embeds)
    return base.greedy(eager, embeds, steps, eos_token_id,
                       lambda seq, step: logits_from_embeds(eager, seq, img_pos, prune_layer, keep_of(seq) if rescore else fixed))
