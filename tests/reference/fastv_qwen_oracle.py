"""Independent reference FastV (arXiv 2403.06764) for Qwen2-VL / Qwen2.5-VL, batch size 1.

Shares no code with ``vlm_tokenprune``: only torch, the Hugging Face model's own modules and the
model-agnostic plumbing of ``eager_runner`` (eager deep copy, causal mask, top-k).

Same FastV as ``fastv_oracle`` (last-token attention in layer K-1 with RoPE over the whole causal
row, heads averaged, top-k visual tokens, dropped before layer K), with Qwen's specifics:
  * visual tokens are the image AND video placeholders;
  * every token has a 3-D M-RoPE position (temporal, height, width) ``[3, T]``, taken from what the
    model feeds its language model for the prompt (its own ``get_rope_index``);
  * the rotary cos/sin are rebuilt HERE from those positions (``mrope_cos_sin``: frequency i of the
    rotary half rotates with axis ``section(i) % 3``), not by the model's rotary module;
  * kept tokens keep their original 3-D positions (gaps); a generated token sits at the previous
    token's position + 1 on every axis (what ``generate`` does).
Everything runs without a KV cache on an eager-attention copy, one layer call at a time.
"""
from __future__ import annotations

import torch

from .eager_runner import causal_mask, eager_copy, language_model_inputs, rotate_half, top_k_positions

__all__ = [
    "eager_copy", "prompt_inputs", "visual_positions", "mrope_cos_sin", "fastv_scores", "fastv_keep",
    "fastv_logits", "fastv_generate",
]


# ----------------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------------
def prompt_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds [1, L, D], positions [3, L])``: what the language model receives for the prompt
    (visual features already scattered into the placeholders, M-RoPE ids from ``get_rope_index``)."""
    got = language_model_inputs(model, inputs)
    return got["inputs_embeds"], got["position_ids"][-3:, 0]  # [3 or 4, 1, L]: the last three rows are (t, h, w)


def visual_positions(model, input_ids: torch.Tensor) -> list[int]:
    vis = {model.config.image_token_id, model.config.video_token_id}
    return [p for p, t in enumerate(input_ids[0].tolist()) if t in vis]


def mrope_cos_sin(model, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[1, T, head_dim]`` of Qwen's multimodal RoPE at 3-D positions ``pos`` ``[3, T]``.

    Rotary frequency i (of head_dim/2) is ``theta ** (-2i / head_dim)``; the half-dimension is cut
    into ``mrope_section`` chunks (temporal, height, width, ...) and chunk c rotates with axis c % 3.
    """
    text = model.config.text_config
    rp = text.rope_parameters
    d = model.model.language_model.layers[0].self_attn.head_dim
    half = d // 2
    inv_freq = 1.0 / (rp["rope_theta"] ** (torch.arange(0, half, dtype=torch.float) * 2 / d))
    section = list(rp["mrope_section"])
    assert sum(section) == half, (section, half)
    axis = torch.cat([torch.full((n,), c % 3, dtype=torch.long) for c, n in enumerate(section)])  # [half]
    T = pos.shape[1]
    angle = torch.empty(T, half)
    for i in range(half):
        angle[:, i] = pos[axis[i]].float() * inv_freq[i]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().to(dtype)[None], angle.sin().to(dtype)[None]


def run_layers(model, eager, hidden: torch.Tensor, pos: torch.Tensor, layer_ids) -> torch.Tensor:
    """Run decoder layers ``layer_ids`` of the eager copy on ``hidden`` [1, T, D] whose tokens sit at
    3-D positions ``pos`` [3, T], causal over the T tokens."""
    lm = eager.model.language_model
    cos, sin = mrope_cos_sin(model, pos, hidden.dtype)
    mask = causal_mask(hidden.shape[1], hidden.dtype)
    for i in layer_ids:
        out = lm.layers[i](hidden, attention_mask=mask, position_ids=None, position_embeddings=(cos, sin))
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def last_token_attention(model, eager, layer_idx: int, hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[H, T]`` post-softmax attention of the last token over all T tokens in decoder layer
    ``layer_idx`` (input ``hidden`` [1, T, D], 3-D positions ``pos``), rebuilt from its modules."""
    layer = eager.model.language_model.layers[layer_idx]
    attn = layer.self_attn
    d = attn.head_dim
    T = hidden.shape[1]
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)  # [1, H, T, d] (q/k/v carry biases in Qwen2)
    k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)  # [1, Hkv, T, d]
    cos, sin = mrope_cos_sin(model, pos, hidden.dtype)
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    n_heads, n_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    q_last = q[0, :, T - 1]
    logits = torch.einsum("hd,htd->ht", q_last.float(), k[0].float()) * (d ** -0.5)
    return torch.softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# FastV on embeddings + positions
# ----------------------------------------------------------------------------------------------
def scores_from(model, eager, embeds, pos, vis_pos: list[int], layer: int) -> dict[int, float]:
    assert layer >= 1
    with torch.no_grad():
        hidden = run_layers(model, eager, embeds, pos, range(layer - 1))
        att = last_token_attention(model, eager, layer - 1, hidden, pos).mean(dim=0)
    return {p: float(att[p]) for p in vis_pos}


def keep_from(model, eager, embeds, pos, vis_pos, layer, k) -> list[int]:
    if not 0 <= k <= len(vis_pos):
        raise ValueError(f"k={k} with {len(vis_pos)} visual tokens")
    return top_k_positions(scores_from(model, eager, embeds, pos, vis_pos, layer), k)


def logits_from(model, eager, embeds, pos, vis_pos: list[int], layer: int, keep: list[int],
                repack: bool = False) -> torch.Tensor:
    """``[1, L_kept, V]``. ``repack=True`` gives the kept tokens contiguous positions instead (a wrong
    convention for FastV, used to show the tests tell the two apart)."""
    T = embeds.shape[1]
    vis, kept_vis = set(vis_pos), set(keep)
    assert kept_vis <= vis, "keep must be visual-token positions"
    kept = [p for p in range(T) if p not in vis or p in kept_vis]
    lm = eager.model.language_model
    with torch.no_grad():
        hidden = run_layers(model, eager, embeds, pos, range(layer))[:, kept]
        kpos = pos[:, kept]
        if repack:
            kpos = torch.arange(len(kept)).expand(3, -1)
        hidden = run_layers(model, eager, hidden, kpos, range(layer, len(lm.layers)))
        return eager.lm_head(lm.norm(hidden))


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def fastv_scores(model, inputs: dict, layer: int) -> dict[int, float]:
    embeds, pos = prompt_inputs(model, inputs)
    return scores_from(model, eager_copy(model), embeds, pos, visual_positions(model, inputs["input_ids"]), layer)


def fastv_keep(model, inputs: dict, layer: int, k: int) -> list[int]:
    embeds, pos = prompt_inputs(model, inputs)
    return keep_from(model, eager_copy(model), embeds, pos, visual_positions(model, inputs["input_ids"]), layer, k)


def fastv_logits(model, inputs: dict, layer: int, keep: list[int], repack: bool = False) -> torch.Tensor:
    embeds, pos = prompt_inputs(model, inputs)
    vis = visual_positions(model, inputs["input_ids"])
    return logits_from(model, eager_copy(model), embeds, pos, vis, layer, keep, repack)


def fastv_generate(model, inputs: dict, layer: int, k: int, steps: int, rescore: bool,
                   eos_token_id: int | list[int] | None = None, suppress: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens, recomputing the whole sequence each step (no KV cache).

    ``rescore=False``: the kept visual tokens are chosen once from the prompt (KV-cached generate);
    ``rescore=True``: re-chosen every step from the current last token (cache-free generate).
    ``suppress``: token ids never generated (``generate(suppress_tokens=...)``).
    """
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    eager = eager_copy(model)
    embeds, pos = prompt_inputs(model, inputs)
    vis = visual_positions(model, inputs["input_ids"])
    embed_tokens = eager.model.language_model.embed_tokens
    keep = keep_from(model, eager, embeds, pos, vis, layer, k)
    out: list[int] = []
    for _ in range(steps):
        if rescore:
            keep = keep_from(model, eager, embeds, pos, vis, layer, k)
        logits = logits_from(model, eager, embeds, pos, vis, layer, keep)
        last = logits[0, -1].clone()
        last[list(suppress)] = float("-inf")
        tok = int(last.argmax())
        out.append(tok)
        if tok in eos:
            break
        with torch.no_grad():
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[tok]]))], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return out
