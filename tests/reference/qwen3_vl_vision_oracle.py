"""Independent reference for vision-site VisPruner on Qwen3-VL (a library extension of arXiv 2412.01818's
official SigLIP rule to Qwen's packed ViT), one unpadded row, no KV cache. Imports nothing from ``vlm_tokenprune``.

Definition checked here (written out with plain loops):
  * the tower runs unchanged; the LAST vision block's input / rotary tables are taken from the unpatched model's
    forward (a hook), its q / k written out: the block's ``norm1`` and ``attn.qkv`` modules, rotate-half rotary;
  * importance of a patch = the post-softmax attention it RECEIVES from the patches of ITS OWN image (one softmax
    per query, head and image; scale head_dim^-0.5), mean over the queries, then over the heads;
  * an LLM token of image i = the ``merge^2`` CONSECUTIVE patch rows its merger packs (token j: rows
    ``merge^2 * j ..``, the processor's window order); its importance = the SUM of its patches', its feature = the
    concatenation of its patches' last-block outputs (``pack`` is checked against the model's merger in the tests);
  * VisPruner's selection (``vispruner_oracle.paper_select``) with those tokens as units, ``T`` per image (all kept
    when ``T >= G``);
  * the language model then sees the kept placeholders only, with the unpruned features, original 3-D positions and
    DeepStack rows at the kept tokens (``qwen3_vl_oracle.forward`` / ``greedy`` with ``start``).
"""
from __future__ import annotations

import torch

from . import qwen3_vl_oracle as q3
from .vispruner_oracle import paper_select


class _Stop(Exception):
    pass


def last_block_io(model, pixel_values, grid_thw):
    """(input ``[S, C]``, (cos, sin), output ``[S, C]``) of the last vision block in the unpatched tower."""
    box = {}
    blk = model.model.visual.blocks[-1]

    def pre(module, args, kwargs):
        box["x"] = args[0] if args else kwargs["hidden_states"]
        box["pe"] = kwargs["position_embeddings"]

    def post(module, args, kwargs, out):
        box["y"] = out
        raise _Stop

    hs = [blk.register_forward_pre_hook(pre, with_kwargs=True), blk.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            model.model.visual(pixel_values, grid_thw=grid_thw)
    except _Stop:
        pass
    finally:
        for h in hs:
            h.remove()
    return box["x"], box["pe"], box["y"]


def _rot(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def importance(model, x, pe, sizes: list[int]) -> list[float]:
    """Per patch: attention received within its image, mean over queries then heads (plain loops)."""
    blk = model.model.visual.blocks[-1]
    H = blk.attn.num_heads
    S, C = x.shape
    d = C // H
    with torch.no_grad():
        qkv = blk.attn.qkv(blk.norm1(x)).view(S, 3, H, d).float()
    cos, sin = (t.float() for t in pe)
    q = qkv[:, 0] * cos[:, None] + _rot(qkv[:, 0]) * sin[:, None]
    k = qkv[:, 1] * cos[:, None] + _rot(qkv[:, 1]) * sin[:, None]
    out, s = [], 0
    for n in sizes:
        rec = [0.0] * n
        for h in range(H):
            for i in range(n):
                row = torch.softmax(torch.stack([q[s + i, h] @ k[s + j, h] for j in range(n)]) * d ** -0.5, dim=0)
                for j in range(n):
                    rec[j] += float(row[j]) / n
        out += [r / H for r in rec]
        s += n
    return out


def pack(y: torch.Tensor, g: int) -> torch.Tensor:
    """``[S, C]`` -> ``[S / g, g * C]``: each LLM token's patches concatenated."""
    return torch.stack([torch.cat([y[t * g + m] for m in range(g)]) for t in range(y.shape[0] // g)])


def select(model, pixel_values, grid_thw, T: int, r: float) -> list[list[int]]:
    """Kept LLM-token indices per image (ascending)."""
    g = model.config.vision_config.spatial_merge_size ** 2
    sizes = [int(t * h * w) for t, h, w in grid_thw.tolist()]
    x, pe, y = last_block_io(model, pixel_values, grid_thw)
    imp = importance(model, x, pe, sizes)
    kept, s = [], 0
    for n in sizes:
        G = n // g
        score = [sum(imp[s + t * g + m] for m in range(g)) for t in range(G)]
        feats = pack(y[s:s + n].float(), g)
        kept.append(list(range(G)) if T >= G else paper_select(score, feats, T, r))
        s += n
    return kept


def start_positions(model, inputs: dict, kept: list[list[int]]) -> tuple[list[int], list[int]]:
    """(positions present before layer 0, kept visual positions) of the row, images in prompt order."""
    ids = inputs["input_ids"][0].tolist()
    vis = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
    g = model.config.vision_config.spatial_merge_size ** 2
    keep_vis, i = [], 0
    for (t, h, w), k in zip(inputs["image_grid_thw"].tolist(), kept):
        G = t * h * w // g
        keep_vis += [vis[i + j] for j in k]
        i += G
    return [p for p in range(len(ids)) if p not in vis or p in keep_vis], keep_vis


def run(model, inputs: dict, T: int, r: float):
    """(kept visual positions, logits [L', V]) of one unpadded row."""
    kept = select(model, inputs["pixel_values"], inputs["image_grid_thw"], T, r)
    start, keep_vis = start_positions(model, inputs, kept)
    logits, _ = q3.forward(q3.eager_copy(model), q3.Prompt(model, inputs), start=start)
    return keep_vis, logits


def greedy(model, inputs: dict, T: int, r: float, steps: int, eos: int | None = None) -> list[int]:
    kept = select(model, inputs["pixel_values"], inputs["image_grid_thw"], T, r)
    start, _ = start_positions(model, inputs, kept)
    return q3.greedy(model, inputs, steps, start=start, eos=eos)
