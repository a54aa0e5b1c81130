"""Independent eager reference of FinerCut sublayer removal (arXiv 2405.18218), sharing no code with
``vlm_tokenprune``: a plain loop over the Llama decoder layers where each layer is

    h = h + Attention(RMSNorm_1(h))   unless the layer's attention sublayer is removed
    h = h + MLP(RMSNorm_2(h))         unless the layer's MLP sublayer is removed

(causal eager attention with RoPE and GQA, padding keys masked; weights read from the Hugging Face
modules). Visual scope: every row runs both sublayers (text rows attend the visual rows' keys and
values), and the listed sublayers' outputs are not added to the visual rows. Layer 0's input and RoPE tables are captured from the unpatched model; greedy decoding
recomputes the whole sequence every step (no cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _Stop(Exception):
    pass


def _capture(model, inputs: dict):
    box = {}

    def grab(module, args, kwargs):
        box["h"] = (kwargs.get("hidden_states") if not args else args[0]).detach().clone()
        box["rope"] = tuple(t.detach().clone() for t in kwargs["position_embeddings"])
        raise _Stop

    hook = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    return box["h"], box["rope"]


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


def _attention(attn, x, cos, sin, allowed):
    B, T, _ = x.shape
    d = attn.head_dim
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(B, T, -1, d).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(B, T, -1, d).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, T, -1, d).transpose(1, 2)
    H, Hkv = q.shape[1], k.shape[1]
    c, s = cos[:, None], sin[:, None]
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    k = k[:, [h * Hkv // H for h in range(H)]]
    v = v[:, [h * Hkv // H for h in range(H)]]
    scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1)
    out = (probs @ v.double()).to(x.dtype).transpose(1, 2).reshape(B, T, H * d)
    return F.linear(out, attn.o_proj.weight, attn.o_proj.bias)


def _mlp(mlp, x):
    mid = F.silu(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)) * F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    return F.linear(mid, mlp.down_proj.weight, mlp.down_proj.bias)


def logits(model, inputs: dict, attn_removed=(), ffn_removed=(), visual=None, attn_visual=(), ffn_visual=()) -> torch.Tensor:
    """``[B, T, V]`` logits with the listed layers' attention / MLP sublayers omitted (``attn_visual`` /
    ``ffn_visual``: omitted for the ``visual`` ``[B, T]`` rows only)."""
    h, (cos, sin) = _capture(model, inputs)
    B, T = inputs["input_ids"].shape
    cos, sin = cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:])
    valid = inputs["attention_mask"].bool()
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal[None] & valid[:, None, :] | torch.eye(T, dtype=torch.bool)[None]  # padding rows keep themselves
    lm = model.model.language_model
    with torch.no_grad():
        for j, layer in enumerate(lm.layers):
            if j not in attn_removed:
                a = _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, allowed)
                h = h + (a.masked_fill(visual[..., None], 0.0) if j in attn_visual else a)
            if j not in ffn_removed:
                f = _mlp(layer.mlp, layer.post_attention_layernorm(h))
                h = h + (f.masked_fill(visual[..., None], 0.0) if j in ffn_visual else f)
        return model.lm_head(lm.norm(h))


def greedy(model, inputs: dict, steps: int, attn_removed=(), ffn_removed=(), banned: int | None = None,
           image_token: int | None = None, attn_visual=(), ffn_visual=()) -> torch.Tensor:
    """``[B, steps]`` greedy tokens, the whole sequence recomputed every step (``banned``: a token id never chosen;
    ``image_token``: the id whose rows are visual, for ``attn_visual`` / ``ffn_visual``)."""
    cur = dict(inputs)
    B = cur["input_ids"].shape[0]
    out = []
    for _ in range(steps):
        vis = cur["input_ids"] == image_token if image_token is not None else None
        last = logits(model, cur, attn_removed, ffn_removed, vis, attn_visual, ffn_visual)[:, -1]
        if banned is not None:
            last[:, banned] = float("-inf")
        tok = last.argmax(-1)
        out.append(tok)
        cur["input_ids"] = torch.cat([cur["input_ids"], tok[:, None]], 1)
        cur["attention_mask"] = torch.cat([cur["attention_mask"], torch.ones(B, 1, dtype=cur["attention_mask"].dtype)], 1)
    return torch.stack(out, 1)


def chain_logits(model, inputs: dict, chain) -> torch.Tensor:
    """``[B, T, V]`` logits of the decoder layers run in the order ``chain`` (CoLa, arXiv 2507.07996: a layer
    may be skipped or repeated); each layer is the plain pre-norm block."""
    h, (cos, sin) = _capture(model, inputs)
    B, T = inputs["input_ids"].shape
    cos, sin = cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:])
    valid = inputs["attention_mask"].bool()
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal[None] & valid[:, None, :] | torch.eye(T, dtype=torch.bool)[None]
    lm = model.model.language_model
    with torch.no_grad():
        for j in chain:
            layer = lm.layers[j]
            h = h + _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, allowed)
            h = h + _mlp(layer.mlp, layer.post_attention_layernorm(h))
        return model.lm_head(lm.norm(h))
