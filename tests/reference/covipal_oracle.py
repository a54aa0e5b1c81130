"""Independent reference for CoViPAL's pruning (Tang et al., arXiv 2508.17243), one row at a time.

Written from the paper's equations and the module layout documented for this package, sharing no
code with ``vlm_tokenprune``: plain Python loops over tokens and heads, torch only for vector
arithmetic, the weights read by name from the state dict.

    S = p_theta(H_v, H_t);   I = TopK(S, r * n_v)                       (paper, inference)

p_theta, on the real tokens of one row (visual tokens first, then the instruction text = the real
non-visual tokens after the first visual token):
    z_i   = W_in LN_in(x_i) + b_in + e[type_i]
    per block:  u_i = LN1(z_i); q_i, k_i, v_i = thirds of W_qkv u_i + b_qkv; per head h:
                a_ij = softmax_j(q_i^h . k_j^h / sqrt(d_h)),  o_i^h = sum_j a_ij v_j^h
                z_i += W_proj [o_i^1 .. o_i^H] + b_proj
                z_i += W_2 GELU(W_1 LN2(z_i) + b_1) + b_2
    S_k   = w_head . LN_out(z_k) + b_head                              (k visual)
TopK: the k = max(1, floor(r * n_v + 0.5)) highest scores, ties to the lower position.
"""
from __future__ import annotations

import math

import torch


def _ln(x, w, b, eps=1e-5):
    mu = sum(float(t) for t in x) / len(x)
    var = sum((float(t) - mu) ** 2 for t in x) / len(x)
    return (x - mu) / math.sqrt(var + eps) * w + b


def _gelu(x):
    return torch.tensor([0.5 * float(t) * (1.0 + math.erf(float(t) / math.sqrt(2.0))) for t in x], dtype=x.dtype)


def scores(sd: dict, heads: int, h_v: list, h_t: list) -> list[float]:
    """PPM scores of the visual tokens ``h_v`` (list of [D] tensors) given the text ``h_t``."""
    sd = {k: v.double() for k, v in sd.items()}
    xs = [x.double() for x in h_v] + [x.double() for x in h_t]
    types = [0] * len(h_v) + [1] * len(h_t)
    z = [sd["w_in.weight"] @ _ln(x, sd["ln_in.weight"], sd["ln_in.bias"]) + sd["w_in.bias"] + sd["type_emb"][t]
         for x, t in zip(xs, types)]
    d = z[0].shape[0] if z else 0
    hd = d // heads
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for blk in range(n_blocks):
        p = lambda name: sd[f"blocks.{blk}.{name}"]  # noqa: E731
        qkv = [p("qkv.weight") @ _ln(t, p("ln1.weight"), p("ln1.bias")) + p("qkv.bias") for t in z]
        q = [t[:d] for t in qkv]
        k = [t[d:2 * d] for t in qkv]
        v = [t[2 * d:] for t in qkv]
        K, V = torch.stack(k), torch.stack(v)  # [n, d]: every token's key / value, one row each
        new = []
        for i in range(len(z)):
            outs = []
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                logits = (K[:, sl] @ q[i][sl]).tolist()  # q_i^h . k_j^h for every j
                logits = [a / math.sqrt(hd) for a in logits]
                m = max(logits)
                w = [math.exp(a - m) for a in logits]
                tot = sum(w)
                outs.append(torch.tensor([a / tot for a in w], dtype=V.dtype) @ V[:, sl])  # sum_j a_ij v_j^h
            zi = z[i] + p("proj.weight") @ torch.cat(outs) + p("proj.bias")
            u = _ln(zi, p("ln2.weight"), p("ln2.bias"))
            zi = zi + p("fc2.weight") @ _gelu(p("fc1.weight") @ u + p("fc1.bias")) + p("fc2.bias")
            new.append(zi)
        z = new
    return [float(sd["head.weight"][0] @ _ln(z[i], sd["ln_out.weight"], sd["ln_out.bias"]) + sd["head.bias"][0])
            for i in range(len(h_v))]


def top_k(s: list[float], keep: float) -> list[int]:
    """Indices (ascending) of the k best scores, ties to the lower index."""
    k = max(1, math.floor(keep * len(s) + 0.5))
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    return sorted(order[:k])


def kept_positions(emb, ids, image_token_id: int, sd: dict, heads: int, keep: float) -> list[int]:
    """Row-local positions of the kept visual tokens: ``emb`` [n, D] the LM input of the row's real tokens."""
    vis = [i for i in range(len(ids)) if int(ids[i]) == image_token_id]
    if not vis:
        return []
    text = [i for i in range(vis[0], len(ids)) if int(ids[i]) != image_token_id]
    s = scores(sd, heads, [emb[i] for i in vis], [emb[i] for i in text])
    return [vis[j] for j in top_k(s, keep)]


def guidance_attention(attn_weights, ids, image_token_id: int, query: str = "last") -> list[float]:
    """Stage-1 label from an eager layer's attention ``[H, n, n]`` of one row: the attention each visual token
    receives from the last token (``query="last"``) or from every instruction-text token (``"text"``: the
    non-visual tokens after the first visual one), summed over heads and queries, renormalised over the
    visual tokens."""
    vis = [i for i in range(len(ids)) if int(ids[i]) == image_token_id]
    if query == "last":
        queries = [len(ids) - 1]
    else:
        queries = [i for i in range(vis[0], len(ids)) if int(ids[i]) != image_token_id]
    raw = [sum(float(attn_weights[h, q, j]) for h in range(attn_weights.shape[0]) for q in queries) for j in vis]
    tot = sum(raw)
    return [a / tot for a in raw]
