"""Independent reference implementation of FastV (Chen et al., arXiv 2403.06764), batch size 1.

Written from the paper, sharing no code with ``vlm_tokenprune``: only torch and the
Hugging Face model's own modules are used.

FastV, as specified here:
  * run the LLM normally up to decoder layer K-1 (K = ``layer``);
  * in layer K-1, take the post-softmax attention of the LAST token over the whole causal row
    (RoPE applied, exactly the model's attention probabilities), average it over heads, and read
    it at the image-token positions;
  * keep the top-k image tokens (ties -> lower position), drop the others before layer K;
  * layers >= K run on the shortened sequence with the ORIGINAL position ids (gaps) and a plain
    causal mask.

Everything runs without a KV cache, on an eager-attention deep copy of the model, one layer
call at a time. The code favours being obviously correct over being fast.
"""
from __future__ import annotations

import torch

from .eager_runner import (  # noqa: F401  (the runner's plumbing, also read through this module by other oracles)
    causal_mask, eager_copy, greedy, head_projections, image_positions, logits_dropping, prompt_embeds, rotate_half,
    run_layers, top_k_positions,
)


def last_token_attention(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """``[H, T]`` post-softmax attention of the last token over all T tokens in decoder layer
    ``layer_idx`` whose input is ``hidden`` [1, T, D], rebuilt from the layer's modules."""
    q, k, _ = head_projections(eager, layer_idx, hidden, pos)
    scaling = eager.model.language_model.layers[layer_idx].self_attn.scaling
    # the last token sees every earlier token: its causal row is the whole row
    logits = torch.einsum("hd,htd->ht", q[:, -1].float(), k.float()) * scaling
    return torch.softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# FastV on embeddings
# ----------------------------------------------------------------------------------------------
def scores_from_embeds(eager, embeds: torch.Tensor, img_pos: list[int], layer: int) -> dict[int, float]:
    """FastV score of every image position: head-mean attention of the last token, layer ``layer-1``."""
    assert layer >= 1
    T = embeds.shape[1]
    pos = list(range(T))
    with torch.no_grad():
        hidden = run_layers(eager, embeds, pos, range(layer - 1))
        att = last_token_attention(eager, layer - 1, hidden, pos).mean(dim=0)  # [T]
    return {p: float(att[p]) for p in img_pos}


def keep_from_embeds(eager, embeds, img_pos, layer, k) -> list[int]:
    if not 0 <= k <= len(img_pos):
        raise ValueError(f"k={k} with {len(img_pos)} image tokens")
    return top_k_positions(scores_from_embeds(eager, embeds, img_pos, layer), k)


def logits_from_embeds(eager, embeds: torch.Tensor, img_pos: list[int], layer: int, keep: list[int]) -> torch.Tensor:
    return logits_dropping(eager, embeds, img_pos, keep, before_layer=layer)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def fastv_keep(model, inputs: dict, layer: int, k: int) -> list[int]:
    """Kept image-token positions (in the prompt, ascending) for FastV with K=``layer``, top-``k``."""
    embeds = prompt_embeds(model, inputs)
    return keep_from_embeds(eager_copy(model), embeds, image_positions(model, inputs["input_ids"]), layer, k)


def fastv_scores(model, inputs: dict, layer: int) -> dict[int, float]:
    """Image position -> FastV score (for diagnostics: selection margins)."""
    embeds = prompt_embeds(model, inputs)
    return scores_from_embeds(eager_copy(model), embeds, image_positions(model, inputs["input_ids"]), layer)


def fastv_logits(model, inputs: dict, layer: int, keep: list[int]) -> torch.Tensor:
    """``[1, L_kept, V]`` logits of the kept tokens (all text + ``keep``), image tokens dropped before ``layer``."""
    embeds = prompt_embeds(model, inputs)
    return logits_from_embeds(eager_copy(model), embeds, image_positions(model, inputs["input_ids"]), layer, keep)


def fastv_generate(model, inputs: dict, layer: int, k: int, steps: int, rescore: bool,
                   eos_token_id: int | list[int] | None = None) -> list[int]:
    """Greedy tokens, recomputing the whole sequence each step (no KV cache).

    ``rescore=False``: the kept image tokens are chosen once, from the prompt's last token
    (what a KV-cached generate computes). ``rescore=True``: re-chosen every step from the
    current last token (what a cache-free generate computes). Stops after ``steps`` tokens or
    right after emitting ``eos_token_id``.
    """
    eager = eager_copy(model)
    embeds = prompt_embeds(model, inputs)
    img_pos = image_positions(model, inputs["input_ids"])
    fixed = keep_from_embeds(eager, embeds, img_pos, layer, k)

    def logits_of(seq, step):
        keep = keep_from_embeds(eager, seq, img_pos, layer, k) if rescore else fixed
        return logits_from_embeds(eager, seq, img_pos, layer, keep)

    return greedy(eager, embeds, steps, eos_token_id, logits_of)
