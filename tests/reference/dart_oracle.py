"""Independent reference for DART (Wen et al., EMNLP 2025, arXiv 2502.11494), batch size 1, no padding.

Written from the paper and the official algorithm's description, sharing no code with
``vlm_tokenprune``: an eager deep copy run layer by layer without a cache (``fastv_oracle``'s
plumbing), plain Python loops for the selection.

DART before decoder layer K:
  * keys of layer K-1: its ``input_layernorm`` -> ``k_proj`` (-> ``k_norm``) with RoPE at the
    token's position, every key head concatenated; a token's pivot score = the L1 norm;
  * pivots: the top ``p_img`` image tokens and the top ``p_txt`` text tokens (every non-image token
    after the first image token) by that score (ties to the lower position);
  * z = the final norm (``model.norm``) of the hidden state entering layer K;
  * candidates = image tokens minus the image pivots, in the order of a Python set of their
    positions; pivots visited in the order of a Python set built from [image pivots, text pivots]
    (the official code iterates sets, and that order decides which pivot takes a contested token);
  * each pivot takes its quota of remaining candidates with the LOWEST cosine similarity to it
    (ties to the earlier candidate); kept image tokens = image pivots + all picks;
  * layers >= K run on the kept tokens with their original positions (gaps).
Quota: ``official`` = k // (p_img + p_txt) each; ``exact`` = k - (image pivots) spread over the
pivots in visiting order (the first ones take one more).
"""
from __future__ import annotations

import torch

from . import fastv_oracle as fo


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + fo.rotate_half(x) * sin


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return float(u @ v) / max(float(u.norm()) * float(v.norm()), 1e-8)


def select_from_embeds(eager, embeds: torch.Tensor, img_pos: list[int], layer: int, k: int,
                       p_img: int = 4, p_txt: int = 4, count: str = "official") -> list[int]:
    lm = eager.model.language_model
    T = embeds.shape[1]
    pos = list(range(T))
    with torch.no_grad():
        h_in = fo.run_layers(eager, embeds, pos, range(layer - 1))
        lay = lm.layers[layer - 1]
        attn = lay.self_attn
        d = attn.head_dim
        key = attn.k_proj(lay.input_layernorm(h_in)).view(1, T, -1, d)
        if hasattr(attn, "k_norm"):
            key = attn.k_norm(key)
        cos, sin = lm.rotary_emb(h_in, torch.tensor([pos]))
        key = _rope(key.transpose(1, 2).float(), cos[:, None].float(), sin[:, None].float())  # [1, Hkv, T, d]
        score = {t: float(key[0, :, t].abs().sum()) for t in range(T)}
        h_out = fo.run_layers(eager, h_in, pos, [layer - 1])
        z = lm.norm(h_out)[0].float()
    img = list(img_pos)
    first = min(img)
    txt = [t for t in range(first, T) if t not in set(img)]
    top = lambda cand, n: sorted(cand, key=lambda t: (-score[t], t))[:n]
    n_img = min(p_img, len(img), k) if count == "exact" else min(p_img, len(img))
    img_piv, txt_piv = top(img, n_img), top(txt, min(p_txt, len(txt)))
    order = list(set(img_piv + txt_piv))
    if count == "official":
        quota = [k // (p_img + p_txt)] * len(order)
    else:
        rest, n = max(0, k - len(img_piv)), max(1, len(order))
        quota = [rest // n + (1 if i < rest % n else 0) for i in range(len(order))]
    left = list(set(img) - set(img_piv))
    kept = set(img_piv)
    for p, q in zip(order, quota):
        sims = [(_cos(z[p], z[c]), i) for i, c in enumerate(left)]
        chosen = [left[i] for _, i in sorted(sims)[: min(q, len(left))]]
        kept |= set(chosen)
        left = [c for c in left if c not in set(chosen)]
    return sorted(kept)


def dart_keep(model, inputs: dict, layer: int, k: int, **kw) -> list[int]:
    embeds = fo.prompt_embeds(model, inputs)
    return select_from_embeds(fo.eager_copy(model), embeds, fo.image_positions(model, inputs["input_ids"]), layer, k, **kw)


def dart_logits(model, inputs: dict, layer: int, keep: list[int]) -> torch.Tensor:
    return fo.fastv_logits(model, inputs, layer, keep)


def dart_generate(model, inputs: dict, layer: int, k: int, steps: int, rescore: bool, eos_token_id=None, **kw) -> list[int]:
    """Greedy tokens, whole sequence recomputed each step; ``rescore``: re-select every step (cache-free generate)."""
    eager = fo.eager_copy(model)
    embeds = fo.prompt_embeds(model, inputs)
    img_pos = fo.image_positions(model, inputs["input_ids"])
    embed_tokens = eager.model.language_model.embed_tokens
    keep = select_from_embeds(eager, embeds, img_pos, layer, k, **kw)
    out: list[int] = []
    for _ in range(steps):
        if rescore:
            keep = select_from_embeds(eager, embeds, img_pos, layer, k, **kw)
        tok = int(fo.logits_from_embeds(eager, embeds, img_pos, layer, keep)[0, -1].argmax())
        out.append(tok)
        if tok == eos_token_id:
            break
        with torch.no_grad():
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[tok]]))], dim=1)
    return out
