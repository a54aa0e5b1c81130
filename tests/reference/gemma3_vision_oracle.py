"""Independent reference for VisPruner's official SigLIP variant (arXiv 2412.01818, ``siglip_encoder.py``) at
Gemma 3's vision site (arXiv 2503.19786), sharing no code with ``vlm_tokenprune`` (torch, the Hugging Face model's
own modules, and the other reference files).

Per image (batch size 1 per row):
  * SigLIP written out layer by layer: the model's own embeddings, ``layer_norm1`` / q, k, v, out projections /
    ``layer_norm2`` / MLP, eager attention with one softmax per query and head (plain loops);
  * importance of a patch = the post-softmax attention it RECEIVES in the last layer, averaged over all queries,
    then over the heads (SigLIP has no CLS);
  * the projector average-pools ``k x k`` windows of the ``side x side`` patch grid into one LLM token each (window
    ``(r, c)`` = patches ``(r*k + i) * side + c*k + j``, from the config's geometry); a window is a unit: its
    importance is the sum of its patches', its feature the concatenation of its patches' last-layer outputs
    (raster order), and VisPruner's selection (``vispruner_oracle.paper_select``: important by importance, diverse
    by duplicate removal) picks ``T`` windows;
  * a kept window's LLM token: ``post_layernorm`` of its patches, their mean, ``mm_soft_emb_norm``, the projection;
  * the language model runs on the row with the dropped windows' placeholders removed, rotary positions original
    (``positions=gaps``), masks as ``gemma3_oracle`` defines them (sliding window over original positions, the
    bidirectional image block over the kept image tokens).
"""
from __future__ import annotations

import math

import torch

from . import gemma3_oracle as go
from . import vispruner_oracle as vp


def windows(model) -> list[list[int]]:
    """The patches each LLM token pools, from the config's geometry (raster order of windows and members)."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    per = math.isqrt(cfg.mm_tokens_per_image)
    k = side // per
    return [[(r * k + i) * side + c * k + j for i in range(k) for j in range(k)]
            for r in range(per) for c in range(per)]


def siglip(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image ``[3, H, W]`` -> (last encoder layer's output ``[N, D]``, importance ``[N]``: last-layer attention
    received, mean over queries then heads)."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    layers = tower.encoder.layers
    with torch.no_grad():
        x = tower.embeddings(pixels[None])[0]
        N, D = x.shape
        received = torch.zeros(N)
        for li, layer in enumerate(layers):
            att = layer.self_attn
            H = att.num_heads
            d = D // H
            h = layer.layer_norm1(x)
            q, k, v = att.q_proj(h), att.k_proj(h), att.v_proj(h)
            out = torch.zeros(N, D)
            for hh in range(H):
                sl = slice(hh * d, (hh + 1) * d)
                for i in range(N):
                    p = torch.softmax((k[:, sl] @ q[i, sl]) * att.scale, 0)
                    out[i, sl] = p @ v[:, sl]
                    if li == len(layers) - 1:
                        received += p / (N * H)
            x = x + att.out_proj(out)
            x = x + layer.mlp(layer.layer_norm2(x))
    return x, received


def select(model, pixels: torch.Tensor, T: int, r: float) -> tuple[list[int], torch.Tensor]:
    """(kept windows, ascending; ``[T, text_D]`` their LLM tokens) of one image."""
    win = windows(model)
    out, imp = siglip(model, pixels)
    scores = [float(sum(imp[p] for p in m)) for m in win]
    feats = torch.stack([torch.cat([out[p] for p in m]) for m in win])
    kept = vp.paper_select(scores, feats, T, r) if T < len(win) else list(range(len(win)))
    proj = model.model.multi_modal_projector
    tower = model.model.vision_tower
    with torch.no_grad():
        post = getattr(tower, "vision_model", tower).post_layernorm(out)
        pooled = torch.stack([sum(post[p] for p in win[t]) / len(win[t]) for t in kept])
        tokens = proj.mm_soft_emb_norm(pooled) @ proj.mm_input_projection_weight
    return kept, tokens


def reduced_row(model, inputs: dict, T: int, r: float) -> tuple[list[int], torch.Tensor]:
    """A row alone (batch 1, its own ``pixel_values``): (kept image positions, the layer-0 input ``[1, L, D]`` with
    the kept windows' tokens at their placeholders; dropped placeholders are never attended)."""
    ids = inputs["input_ids"][0].tolist()
    img = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
    n = model.config.mm_tokens_per_image
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
    x = go.prompt_embeds(model, text_only)
    kept_pos = []
    for i in range(len(img) // n):
        kept, tokens = select(model, inputs["pixel_values"][i], T, r)
        pos = [img[i * n + t] for t in kept]
        x[0, pos] = tokens.to(x.dtype)
        kept_pos += pos
    return kept_pos, x


def logits(model, inputs: dict, T: int, r: float) -> tuple[list[int], torch.Tensor]:
    """(kept image positions, logits ``[n_alive, V]`` of the text + kept image tokens in prompt order)."""
    kept, x = reduced_row(model, inputs, T, r)
    return kept, go.logits(model, inputs, [(0, kept)], embeds=x)


def greedy(model, inputs: dict, T: int, r: float, steps: int, suppress: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens after the reduced prompt (no cache: the whole sequence each step, new tokens alive everywhere)."""
    kept, x = reduced_row(model, inputs, T, r)
    blocks = go.image_blocks(inputs)
    ids = inputs["input_ids"][0].tolist()
    img = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
    lm = model.model.language_model
    out = []
    for _ in range(steps):
        L = x.shape[1]
        alive = go.alive_sets(L, img, [(0, kept)], len(lm.layers))
        last = go.run(model, x, alive, blocks + [-1] * (L - len(blocks)))[-1].clone()
        for s in suppress:
            last[s] = float("-inf")
        tok = int(last.argmax())
        out.append(tok)
        with torch.no_grad():
            x = torch.cat([x, lm.embed_tokens(torch.tensor([[tok]]))], 1)
    return out
