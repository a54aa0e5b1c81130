"""Independent reference implementation of EfficientVLA's visual-token selection
(Yang et al., arXiv 2506.10100, section "task-relevance and diversity-driven token selection"),
batch size 1.

Written from the paper, sharing no code with ``vlm_tokenprune`` (the model-plumbing helpers
come from ``fastv_oracle``, which is itself independent of the library):

  * run the LLM normally up to decoder layer K-1 (K = ``layer``);
  * take the eager model's OWN attention probabilities of layer K-1 (the ``attn_weights`` its
    eager attention returns, captured by a forward hook on the eager copy);
  * relevance r_i = sum over instruction text tokens j (the non-image tokens after the first
    image token) of (1/H) sum_h A^h[j, i]: text -> visual, because a causal mask makes the
    paper's visual -> text reading zero when the question follows the image;
  * s = min-max normalised r over the image tokens;
  * V_key = top K_key by s; V_task = next floor(alpha * (K_final - K_key)) by s;
    V_div = the K_final - K_key - K_task other image tokens with the highest
    1 - max_{k in V_key} cos(v_j, v_k), v = the hidden states entering layer K-1;
    ties -> lower position;
  * layers >= K run on text + V_key + V_task + V_div with the ORIGINAL position ids and a plain
    causal mask.

Plain Python loops and float64 arithmetic; no KV cache.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from .eager_runner import eager_copy, greedy, image_positions, logits_dropping, prompt_embeds, run_layers


def attention_probs(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """``[H, T, T]``: the eager layer ``layer_idx``'s own attention probabilities on input ``hidden``."""
    box = {}
    attn = eager.model.language_model.layers[layer_idx].self_attn
    h = attn.register_forward_hook(lambda mod, args, out: box.__setitem__("w", out[1]))
    try:
        with torch.no_grad():
            run_layers(eager, hidden, pos, [layer_idx])
    finally:
        h.remove()
    return box["w"][0].double()


def details_from_embeds(eager, embeds, img_pos: list[int], layer: int, k: int, k_key: int = 4, alpha: float = 0.5) -> dict:
    """Everything the selection decides on: relevance, normalised s, the three sets and the diversity."""
    assert layer >= 1 and 1 <= k <= len(img_pos)
    T = embeds.shape[1]
    pos = list(range(T))
    img = set(img_pos)
    with torch.no_grad():
        hidden = run_layers(eager, embeds, pos, range(layer - 1))  # enters layer K-1
    A = attention_probs(eager, layer - 1, hidden, pos)
    text = [j for j in range(img_pos[0], T) if j not in img]
    return select_from_attention(A, hidden[0], img_pos, text, k, k_key, alpha)


def select_from_attention(A: torch.Tensor, hidden: torch.Tensor, img_pos: list[int], text: list[int], k: int,
                          k_key: int = 4, alpha: float = 0.5) -> dict:
    """The selection from the scoring layer's attention probabilities ``A`` [H, T, T] (rows: queries) and the
    hidden states entering it ``hidden`` [T, D]: image candidates ``img_pos``, instruction queries ``text``."""
    assert text, "no instruction text after the image"
    H = A.shape[0]
    r = {}
    for i in img_pos:
        total = 0.0
        for j in text:
            total += sum(float(A[h, j, i]) for h in range(H)) / H
        r[i] = total
    lo, hi = min(r.values()), max(r.values())
    s = {i: (r[i] - lo) / (hi - lo) if hi > lo else 0.0 for i in img_pos}
    rank = sorted(img_pos, key=lambda p: (-s[p], p))
    n_key = min(k_key, k)
    n_task = math.floor(Fraction(repr(alpha)) * (k - n_key))  # exact decimal arithmetic
    n_div = k - n_key - n_task
    key, task = rank[:n_key], rank[n_key: n_key + n_task]
    vec = {i: hidden[i].double().tolist() for i in img_pos}

    def cos(a, b):
        dot = sum(x * y for x, y in zip(vec[a], vec[b]))
        na = math.sqrt(sum(x * x for x in vec[a]))
        nb = math.sqrt(sum(x * x for x in vec[b]))
        return dot / (na * nb)

    rest = [i for i in img_pos if i not in set(key) | set(task)]
    div = {j: 1.0 - max(cos(j, q) for q in key) for j in rest}
    div_rank = sorted(rest, key=lambda p: (-div[p], p))
    return {
        "r": r, "s": s, "rank": rank, "key": key, "task": task, "div": div_rank[:n_div],
        "diversity": div, "div_rank": div_rank, "n_key": n_key, "n_task": n_task, "n_div": n_div,
        "keep": sorted(key + task + div_rank[:n_div]),
    }


def logits_from_embeds(eager, embeds: torch.Tensor, img_pos: list[int], layer: int, keep: list[int]) -> torch.Tensor:
    return logits_dropping(eager, embeds, img_pos, keep, before_layer=layer)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def efficientvla_details(model, inputs: dict, layer: int, k: int, k_key: int = 4, alpha: float = 0.5) -> dict:
    embeds = prompt_embeds(model, inputs)
    return details_from_embeds(eager_copy(model), embeds, image_positions(model, inputs["input_ids"]), layer, k, k_key, alpha)


def efficientvla_keep(model, inputs: dict, layer: int, k: int, k_key: int = 4, alpha: float = 0.5) -> list[int]:
    return efficientvla_details(model, inputs, layer, k, k_key, alpha)["keep"]


def efficientvla_logits(model, inputs: dict, layer: int, keep: list[int]) -> torch.Tensor:
    embeds = prompt_embeds(model, inputs)
    return logits_from_embeds(eager_copy(model), embeds, image_positions(model, inputs["input_ids"]), layer, keep)


def efficientvla_generate(model, inputs: dict, layer: int, k: int, steps: int, rescore: bool,
                          eos_token_id=None, k_key: int = 4, alpha: float = 0.5) -> list[int]:
    """Greedy tokens recomputing the whole sequence each step (no KV cache). ``rescore=False``: the
    prompt's kept set serves every step (= a KV-cached generate); ``True``: re-chosen each step."""
    eager = eager_copy(model)
    embeds = prompt_embeds(model, inputs)
    img_pos = image_positions(model, inputs["input_ids"])
    fixed = details_from_embeds(eager, embeds, img_pos, layer, k, k_key, alpha)["keep"]

    def logits_of(seq, step):
        keep = details_from_embeds(eager, seq, img_pos, layer, k, k_key, alpha)["keep"] if rescore else fixed
        return logits_from_embeds(eager, seq, img_pos, layer, keep)

    return greedy(eager, embeds, steps, eos_token_id, logits_of)
