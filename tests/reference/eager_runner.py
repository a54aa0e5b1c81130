"""Layer-by-layer eager runner shared by the oracles: no KV cache, one decoder-layer call at a time.

Imports only torch and the Hugging Face model's own modules, never ``vlm_tokenprune`` (a test checks
that no file in ``tests/reference`` does). The model-agnostic plumbing every LLM-site oracle needs:
the prompt embeddings the language model receives, an eager deep copy, a plain causal mask, RoPE'd
layer runs at given (possibly gapped) positions, dropping tokens before a layer, and greedy decoding
that recomputes the whole sequence each step.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch


class _Captured(Exception):
    pass


def check_plain_model(model) -> None:
    """The oracle must never run foreign (e.g. pruning) hooks: refuse a model carrying forward hooks
    other than transformers' own output-capturing ones."""
    for name, mod in model.named_modules():
        for hook in [*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()]:
            origin = getattr(getattr(hook, "func", hook), "__module__", "") or ""
            if not origin.startswith("transformers."):
                raise RuntimeError(f"the oracle needs an unpatched model; module {name or '<top>'} has hook {hook!r}")


def check_single(inputs: dict) -> None:
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("the oracle handles batch size 1 only")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("the oracle handles unpadded inputs only")


def language_model_inputs(model, inputs: dict) -> dict:
    """The keyword arguments the language model receives for the prompt (image features already
    scattered into the image-token slots by the model's own code), captured before the LLM runs."""
    check_plain_model(model)
    check_single(inputs)
    box = {}

    def grab(module, args, kwargs):
        box.update({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        raise _Captured

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Captured:
        pass
    finally:
        h.remove()
    return box


def prompt_embeds(model, inputs: dict) -> torch.Tensor:
    """``[1, L, D]``: what the language model receives as ``inputs_embeds`` for the prompt."""
    return language_model_inputs(model, inputs)["inputs_embeds"]


def eager_copy(model):
    """A deep copy of ``model`` whose attention backend is eager (masks: additive float 4-D)."""
    check_plain_model(model)
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


def image_positions(model, input_ids: torch.Tensor) -> list[int]:
    return [p for p, t in enumerate(input_ids[0].tolist()) if t == model.config.image_token_id]


def top_k_positions(scores: dict[int, float], k: int) -> list[int]:
    """The k positions with the highest score (ties: lower position first), sorted ascending."""
    order = sorted(scores, key=lambda p: (-scores[p], p))
    return sorted(order[:k])


def head_projections(eager, layer_idx: int, hidden: torch.Tensor, pos: list[int], *, rope: bool = True,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head ``q, k, v`` ``[H, T, d]`` of decoder layer ``layer_idx`` on its input ``hidden`` [1, T, D], rebuilt
    from the layer's own modules (input norm, projections, q/k norms where the model has them); RoPE at
    positions ``pos`` unless ``rope=False``; k and v repeated to the H query heads (kv head g serves query
    heads g*rep .. g*rep+rep-1). ``dtype``: cast before RoPE (e.g. float64)."""
    lm = eager.model.language_model
    layer = lm.layers[layer_idx]
    attn = layer.self_attn
    d = attn.head_dim
    T = hidden.shape[1]
    with torch.no_grad():
        x = layer.input_layernorm(hidden)
        q, k, v = (proj(x).view(1, T, -1, d).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q.transpose(1, 2)).transpose(1, 2)
            k = attn.k_norm(k.transpose(1, 2)).transpose(1, 2)
        q, k, v = q[0], k[0], v[0]
        if dtype is not None:
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if rope:
            cos, sin = lm.rotary_emb(hidden, torch.tensor([pos], dtype=torch.long))  # [1, T, d]
            cos, sin = cos[0].to(q.dtype), sin[0].to(q.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
    rep = q.shape[0] // k.shape[0]
    return q, k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)


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


def lm_logits(eager, hidden: torch.Tensor) -> torch.Tensor:
    """The language model's final norm and head on ``hidden``."""
    return eager.lm_head(eager.model.language_model.norm(hidden))


def logits_dropping(eager, embeds: torch.Tensor, img_pos: list[int], keep: list[int], before_layer: int) -> torch.Tensor:
    """``[1, L_kept, V]``: every token runs layers ``< before_layer``; then the image tokens outside ``keep``
    are dropped and the rest (all text, ``keep``) runs on with their original positions (gaps)."""
    T = embeds.shape[1]
    img, kept_img = set(img_pos), set(keep)
    assert kept_img <= img, "keep must be image-token positions"
    kept = [p for p in range(T) if p not in img or p in kept_img]
    with torch.no_grad():
        hidden = run_layers(eager, embeds, list(range(T)), range(before_layer))
        hidden = run_layers(eager, hidden[:, kept], kept, range(before_layer, len(eager.model.language_model.layers)))
        return lm_logits(eager, hidden)


def greedy(eager, embeds: torch.Tensor, steps: int, eos_token_id, logits_of: Callable[[torch.Tensor, int], torch.Tensor]) -> list[int]:
    """Greedy tokens without a KV cache: step s appends the argmax of ``logits_of(embeds, s)[0, -1]``
    (``embeds``: the prompt and the tokens so far) and stops after ``steps`` tokens or right after EOS."""
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    embed_tokens = eager.model.language_model.embed_tokens
    out: list[int] = []
    for step in range(steps):
        tok = int(logits_of(embeds, step)[0, -1].argmax())
        out.append(tok)
        if tok in eos:
            break
        with torch.no_grad():
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[tok]]))], dim=1)
    return out
