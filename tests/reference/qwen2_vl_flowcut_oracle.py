"""Independent reference for FlowCut's vision-encoder stage on Qwen2-VL as the authors' Qwen code runs it
(arXiv 2505.19536, ``FlowCut_Qwen``), one unpadded row, no KV cache. Imports nothing from ``vlm_tokenprune``.

Written out here with plain loops:
  * the tower: ``patch_embed``, then every block BY HAND per image (its ``norm1``, ``attn.qkv``, rotate-half rotary
    with the tower's own per-patch tables taken from the unpatched forward (``qwen3_vl_vision_oracle``), one softmax per query and head within
    the image, ``attn.proj``, ``norm2``, ``mlp``), on the image's current patches only;
  * after block ``idx`` of ``L``, while an image has more than ``4 T`` patches: per head the image's mean query
    ``g_h``; ``a_j`` = mean over heads of softmax_j(g_h . k_h,j / sqrt(d)); ``S_j = a_j * sum_c |mean_h v_h,j,c|``;
    ``S_cum = S`` the first time, then ``(S_cum + S) / 2``; when ``L - idx - 1`` is even the image keeps
    ``max(N - P, 4 T)`` patches (top ``S_cum``, ties to the lower index, in order), ``P`` = round((N - 4 T) /
    sqrt(rpl) * (1 - (H / log N)^2)) with ``H = -sum a log(a + 1e-7)``, or all but ``4 T`` after the last block;
  * the model's merger on the kept patches of all images in order (4 consecutive kept patches per token);
  * the language model: image i's merged tokens replace its FIRST K_i placeholders (their M-RoPE positions),
    its other placeholders are removed; text keeps its positions (``pre_llm_oracle.qwen_logits``).
"""
from __future__ import annotations

import math

import torch

from .fastv_qwen_oracle import prompt_inputs
from .pre_llm_oracle import qwen_greedy, qwen_logits
from .qwen3_vl_vision_oracle import last_block_io


def _rot(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _block(blk, x, cos, sin):
    """One vision block on ONE image's patches ``[n, C]`` (full attention within the image), and its q, k, v
    ``[n, H, d]`` (rotary on q, k) in fp32."""
    H = blk.attn.num_heads
    n, C = x.shape
    d = C // H
    qkv = blk.attn.qkv(blk.norm1(x)).view(n, 3, H, d)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q = (q.float() * cos[:, None].float() + _rot(q.float()) * sin[:, None].float())
    k = (k.float() * cos[:, None].float() + _rot(k.float()) * sin[:, None].float())
    out = torch.zeros(n, H, d)
    for h in range(H):
        for i in range(n):
            w = torch.softmax(torch.stack([q[i, h] @ k[j, h] for j in range(n)]) * d ** -0.5, dim=0)
            out[i, h] = sum(w[j] * v[j, h].float() for j in range(n))
    y = x + blk.attn.proj(out.reshape(n, C).to(x.dtype))
    return y + blk.mlp(blk.norm2(y)), q, k, v.float()


def _scores(q, k, v):
    n, H, d = q.shape
    a = [0.0] * n
    for h in range(H):
        g = sum(q[i, h] for i in range(n)) / n
        w = torch.softmax(torch.stack([g @ k[j, h] for j in range(n)]) / math.sqrt(d), dim=0)
        for j in range(n):
            a[j] += float(w[j]) / H
    dens = [float(sum(v[j, h] for h in range(H)).abs().sum() / H) for j in range(n)]
    return a, [a[j] * dens[j] for j in range(n)]


def tower(model, pixel_values, grid_thw, T: int):
    """(kept patch indices per image, merged tokens per image ``[K_i, D]``) for ``T`` LLM tokens per image."""
    vis = model.model.visual
    g = vis.spatial_merge_size ** 2
    sizes = [int(t * h * w) for t, h, w in grid_thw.tolist()]
    _, (cos, sin), _ = last_block_io(model, pixel_values, grid_thw)  # every block of the unpatched tower gets them
    with torch.no_grad():
        x_all = vis.patch_embed(pixel_values)
    L = len(vis.blocks)
    kept_all, feats, s0 = [], [], 0
    for n in sizes:
        target = g * min(n // g, T)
        kept = list(range(n))
        x = x_all[s0:s0 + n]
        cum = None
        for idx, blk in enumerate(vis.blocks):
            rows = [s0 + p for p in kept]
            with torch.no_grad():
                x, q, k, v = _block(blk, x, cos[rows], sin[rows])
            if len(kept) <= target:
                continue
            a, s = _scores(q, k, v)
            cum = s if cum is None else [0.5 * c + 0.5 * t for c, t in zip(cum, s)]
            rpl = L - idx - 1
            if rpl % 2:
                continue
            N = len(kept)
            if rpl:
                ent = -sum(p * math.log(p + 1e-7) for p in a)
                drop = int(torch.round(torch.tensor((N - target) / math.sqrt(rpl) * (1 - (ent / math.log(N)) ** 2))))
            else:
                drop = N
            count = max(N - drop, target)
            top = sorted(sorted(range(N), key=lambda j: (-cum[j], j))[:count])
            kept, cum, x = [kept[j] for j in top], [cum[j] for j in top], x[top]
        kept_all.append(kept)
        feats.append(x)
        s0 += n
    with torch.no_grad():
        merged = vis.merger(torch.cat(feats))
    out, s = [], 0
    for kept in kept_all:
        out.append(merged[s:s + len(kept) // g])
        s += len(kept) // g
    return kept_all, out


def reduced_row(model, inputs: dict, T: int):
    """(embeds ``[n', D]``, M-RoPE positions ``[3, n']``, kept visual positions, next position) of the row."""
    emb, pos3 = prompt_inputs(model, inputs)
    emb = emb[0].clone()
    _, merged = tower(model, inputs["pixel_values"], inputs["image_grid_thw"], T)
    ids = inputs["input_ids"][0].tolist()
    img = model.config.image_token_id
    runs, p = [], 0
    while p < len(ids):
        if ids[p] == img:
            q = p
            while q < len(ids) and ids[q] == img:
                q += 1
            runs.append(list(range(p, q)))
            p = q
        else:
            p += 1
    keep_vis = []
    for run, m in zip(runs, merged):
        for j in range(m.shape[0]):
            emb[run[j]] = m[j]
            keep_vis.append(run[j])
    vis = {p for r in runs for p in r}
    keep = [p for p in range(len(ids)) if p not in vis or p in keep_vis]
    return emb[keep], pos3[:, keep], keep_vis, int(pos3.max()) + 1


def logits(model, inputs: dict, T: int):
    x, pos3, keep_vis, _ = reduced_row(model, inputs, T)
    return keep_vis, qwen_logits(model, x, pos3)


def greedy(model, inputs: dict, T: int, steps: int, suppress=()) -> list[int]:
    x, pos3, _, nxt = reduced_row(model, inputs, T)
    return qwen_greedy(model, x, pos3, nxt, steps, suppress)
