"""Independent reference for FastV (arXiv 2403.06764) on the original LLaVA code base, batch size 1.

Shares no code with ``vlm_tokenprune``: only torch and the model's own modules (norms, projections,
MLP, embeddings, lm_head) are used. The prompt embeddings come from the model's own splice
(``prepare_inputs_labels_for_multimodal``, called on the class, so no instance-level wrapper can
interfere). Attention is written out here (eager: explicit logits, causal mask, softmax), with
RoPE computed from the layer's inv_freq definition at explicit positions, one layer at a time,
without a KV cache:

  * layers < K run on the whole prompt (positions 0..T-1);
  * layer K-1's last-token attention over the whole causal row, averaged over heads, scores the
    image tokens; the top-k (ties: lower position) are kept;
  * layers >= K run on the kept tokens at their ORIGINAL positions (gaps), plain causal.
"""
from __future__ import annotations

import math

import torch

WRAPPED = "prepare_inputs_labels_for_multimodal"


def check_plain(model) -> None:
    """The oracle must never run foreign hooks or wrappers: refuse a patched model."""
    if WRAPPED in vars(model):
        raise RuntimeError("the oracle needs an unpatched model: prepare_inputs_labels_for_multimodal is wrapped")
    for name, mod in model.named_modules():
        if mod._forward_pre_hooks or mod._forward_hooks:
            raise RuntimeError(f"the oracle needs an unpatched model; module {name or '<top>'} has hooks")


def spliced(model, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``[1, T, D]``: the language model's input, image features spliced in by the model's own code."""
    check_plain(model)
    with torch.no_grad():
        out = type(model).prepare_inputs_labels_for_multimodal(model, input_ids, None, None, None, None, images)
    return out[4]


def image_positions(input_ids: torch.Tensor, per_image: int, placeholder: int) -> list[int]:
    """Positions of the image features in the spliced sequence: each placeholder becomes ``per_image`` tokens."""
    pos, out = 0, []
    for t in input_ids[0].tolist():
        if t == placeholder:
            out += list(range(pos, pos + per_image))
            pos += per_image
        else:
            pos += 1
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(pos: list[int], dim: int, base: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, dim]`` at positions ``pos``: angle p * base^(-2i/dim), the two halves repeated."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    ang = torch.outer(torch.tensor(pos, dtype=torch.float32), inv_freq)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qkv(model, layer, hidden: torch.Tensor, pos: list[int]):
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    a = layer.self_attn
    T = hidden.shape[1]
    x = layer.input_layernorm(hidden)
    q = a.q_proj(x).view(1, T, H, d).transpose(1, 2)
    k = a.k_proj(x).view(1, T, Hkv, d).transpose(1, 2)
    v = a.v_proj(x).view(1, T, Hkv, d).transpose(1, 2)
    cos, sin = rope(pos, d, cfg.rope_theta, hidden.dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(H // Hkv, dim=1)  # kv head g serves query heads g*rep .. g*rep+rep-1
    v = v.repeat_interleave(H // Hkv, dim=1)
    return q, k, v, d


def attention_probs(model, layer, hidden: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """``[H, T, T]`` causal attention probabilities of ``layer`` on ``hidden`` [1, T, D]."""
    q, k, _, d = _qkv(model, layer, hidden, pos)
    T = hidden.shape[1]
    logits = (q[0].float() @ k[0].float().transpose(-1, -2)) / math.sqrt(d)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def layer_forward(model, layer, hidden: torch.Tensor, pos: list[int]) -> torch.Tensor:
    q, k, v, d = _qkv(model, layer, hidden, pos)
    T = hidden.shape[1]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = torch.softmax(logits.masked_fill(future, float("-inf")).float(), dim=-1).to(hidden.dtype)
    out = (probs @ v).transpose(1, 2).reshape(1, T, -1)
    hidden = hidden + layer.self_attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def run(model, hidden: torch.Tensor, pos: list[int], layer_ids) -> torch.Tensor:
    layers = model.get_model().layers
    for i in layer_ids:
        hidden = layer_forward(model, layers[i], hidden, pos)
    return hidden


def fastv_scores(model, embeds: torch.Tensor, img: list[int], layer: int) -> dict[int, float]:
    """Image position -> head-mean attention of the last token in decoder layer ``layer - 1``."""
    T = embeds.shape[1]
    pos = list(range(T))
    with torch.no_grad():
        hidden = run(model, embeds, pos, range(layer - 1))
        row = attention_probs(model, model.get_model().layers[layer - 1], hidden, pos)[:, T - 1].mean(0)
    return {p: float(row[p]) for p in img}


def top_k(scores: dict[int, float], k: int) -> list[int]:
    order = sorted(scores, key=lambda p: (-scores[p], p))
    return sorted(order[:k])


def logits(model, embeds: torch.Tensor, img: list[int], layer: int, keep: list[int]) -> torch.Tensor:
    """``[1, T_kept, V]``: image tokens outside ``keep`` dropped before decoder layer ``layer``."""
    T = embeds.shape[1]
    kept = [p for p in range(T) if p not in set(img) or p in set(keep)]
    inner = model.get_model()
    with torch.no_grad():
        hidden = run(model, embeds, list(range(T)), range(layer))
        hidden = run(model, hidden[:, kept], kept, range(layer, len(inner.layers)))
        return model.lm_head(inner.norm(hidden))


def generate(
    model, embeds: torch.Tensor, img: list[int], layer: int, k: int, steps: int
) -> tuple[list[int], list[float]]:
    """Greedy tokens without a cache; the kept image tokens chosen once from the prompt (what a KV-cached
    generate computes). Also returns each step's top-1 minus top-2 logit margin."""
    keep = top_k(fastv_scores(model, embeds, img, layer), k)
    embed = model.get_model().embed_tokens
    toks, margins = [], []
    for _ in range(steps):
        last = logits(model, embeds, img, layer, keep)[0, -1]
        top2 = last.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        tok = int(last.argmax())
        toks.append(tok)
        with torch.no_grad():
            embeds = torch.cat([embeds, embed(torch.tensor([[tok]]))], dim=1)
    return toks, margins
