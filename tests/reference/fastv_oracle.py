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

import copy

import torch


class _Captured(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------------
def _check_plain_model(model) -> None:
    """The oracle must never run foreign (e.g. pruning) hooks: refuse a model carrying forward hooks
    other than transformers' own output-capturing ones."""
    for name, mod in model.named_modules():
        for hook in [*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()]:
            origin = getattr(getattr(hook, "func", hook), "__module__", "") or ""
            if not origin.startswith("transformers."):
                raise RuntimeError(f"the oracle needs an unpatched model; module {name or '<top>'} has hook {hook!r}")


def _check_single(inputs: dict) -> None:
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("the oracle handles batch size 1 only")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("the oracle handles unpadded inputs only")


def prompt_embeds(model, inputs: dict) -> torch.Tensor:
    """``[1, L, D]``: what the language model receives as ``inputs_embeds`` (image features already
    scattered into the image-token slots by the model's own code), captured before the LLM runs."""
    _check_plain_model(model)
    _check_single(inputs)
    box = {}

    def grab(module, args, kwargs):
        box["e"] = kwargs["inputs_embeds"].detach().clone()
        raise _Captured

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Captured:
        pass
    finally:
        h.remove()
    return box["e"]


def eager_copy(model):
    """A deep copy of ``model`` whose attention backend is eager (masks: additive float 4-D)."""
    _check_plain_model(model)
    before = model.config.text_config._attn_implementation
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    assert m.config.text_config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == before, "the original model must stay as it was"
    return m.eval()


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, n, n]``: 0 where query i may see key j (j <= i), dtype-min elsewhere."""
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype)
    for i in range(n):
        m[i, : i + 1] = 0.0
    return m[None, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def run_layers(eager, hidden: torch.Tensor, pos: list[int], layer_ids) -> torch.Tensor:
    """Run decoder layers ``layer_ids`` of the eager copy on ``hidden`` [1, T, D] whose tokens sit at
    original positions ``pos`` (len T), causal over the T tokens."""
    lm = eager.model.language_model
    position_ids = torch.tensor([pos], dtype=torch.long)
    cos, sin = lm.rotary_emb(hidden, position_ids)
    mask = causal_mask(hidden.shape[1], hidden.dtype)
    for i in layer_ids:
        out = lm.layers[i](hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def last_token_attention(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """``[H, T]`` post-softmax attention of the last token over all T tokens in decoder layer
    ``layer_idx`` whose input is ``hidden`` [1, T, D], rebuilt from the layer's modules."""
    lm = eager.model.language_model
    layer = lm.layers[layer_idx]
    attn = layer.self_attn
    d = attn.head_dim
    T = hidden.shape[1]
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, T, -1, d).transpose(1, 2)  # [1, H, T, d]
    k = attn.k_proj(x).view(1, T, -1, d).transpose(1, 2)  # [1, Hkv, T, d]
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q.transpose(1, 2)).transpose(1, 2)
        k = attn.k_norm(k.transpose(1, 2)).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden, torch.tensor([pos], dtype=torch.long))  # [1, T, d]
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    n_heads, n_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # kv head g serves query heads g*rep .. g*rep+rep-1
    q_last = q[0, :, T - 1]  # [H, d]; the last token sees every earlier token: the causal row is the whole row
    logits = torch.einsum("hd,htd->ht", q_last.float(), k[0].float()) * attn.scaling
    return torch.softmax(logits, dim=-1)


def top_k_positions(scores: dict[int, float], k: int) -> list[int]:
    """The k positions with the highest score (ties: lower position first), sorted ascending."""
    order = sorted(scores, key=lambda p: (-scores[p], p))
    return sorted(order[:k])


def image_positions(model, input_ids: torch.Tensor) -> list[int]:
    return [p for p, t in enumerate(input_ids[0].tolist()) if t == model.config.image_token_id]


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
    T = embeds.shape[1]
    img, kept_img = set(img_pos), set(keep)
    assert kept_img <= img, "keep must be image-token positions"
    kept = [p for p in range(T) if p not in img or p in kept_img]
    lm = eager.model.language_model
    with torch.no_grad():
        hidden = run_layers(eager, embeds, list(range(T)), range(layer))
        hidden = hidden[:, kept]
        hidden = run_layers(eager, hidden, kept, range(layer, len(lm.layers)))
        return eager.lm_head(lm.norm(hidden))


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
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    eager = eager_copy(model)
    embeds = prompt_embeds(model, inputs)
    img_pos = image_positions(model, inputs["input_ids"])
    embed_tokens = eager.model.language_model.embed_tokens
    keep = keep_from_embeds(eager, embeds, img_pos, layer, k)
    out: list[int] = []
    for _ in range(steps):
        if rescore:
            keep = keep_from_embeds(eager, embeds, img_pos, layer, k)
        logits = logits_from_embeds(eager, embeds, img_pos, layer, keep)
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if tok in eos:
            break
        with torch.no_grad():
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[tok]]))], dim=1)
    return out
