"""Independent masked eager reference of the structural operations (YOPO arXiv 2410.06169,
EfficientVLA arXiv 2506.10100 layer skipping), written from the issue text, sharing no code
with ``vlm_tokenprune``.

Like the official YOPO code it SIMULATES everything with full-length masks: nothing is
removed, every layer runs every row, and the effect of each operation is written as a mask or
a zeroing on the full [B, H, T, T] eager attention of a plain Llama layer (weights read from the
Hugging Face modules, RMSNorm modules reused):

* skip all: the layer's output is its input;
* skip visual: the layer runs on every row; visual rows then take their input back;
* prune heads (all): the pruned heads' outputs are zeroed for every query before o_proj;
* prune heads (visual): in pruned heads no query attends visual keys, and visual queries'
  outputs of those heads are zeroed;
* FFN cut: for visual rows, intermediate channels >= m' of the SwiGLU are zeroed;
* neighbour attention: a visual query attends a visual key only if both are on the same patch
  grid within |drow|, |dcol| <= w // 2;
* removed tokens (visual_drop, token pruning): from their layer on they are masked as keys
  (their own rows are never read);
* removed sublayers (FinerCut, arXiv 2405.18218): ``skip_attn`` / ``skip_ffn``: the layer's attention /
  MLP adds nothing to any row; ``attn_visual`` / ``ffn_visual``: every row runs the sublayer (text rows
  attend the visual rows' keys / values of this layer), its output is not added to the visual rows.

Qwen3 text layers (Qwen3-VL): per-head RMSNorm ``q_norm`` / ``k_norm`` (the HF modules) on the queries and
keys before RoPE; a mixture-of-experts MLP (no ``gate_proj``) is the model's own module, called on the
full-length rows (routing is per token, so rows never mix there). DeepStack (Qwen3-VL, arXiv 2406.04334):
the features the unpatched model would inject are captured with layer 0's input (``capture_rope``) and
ADDED to the visual rows after decoder layer j < (number of features) whatever op layer j carries: after a
layer skipped for all tokens the visual rows are their input + the features; after a layer skipped (or
whose sublayers are removed) for visual tokens they take their input back, then get the features; a
removed token gets them too, but its row is never read again.

Inputs of layer 0 (embeddings with image features, RoPE tables) are captured from the unpatched
model; decoding is a cache-free greedy loop that recomputes the whole sequence every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _Stop(Exception):
    pass


def capture(model, inputs: dict) -> dict:
    """What the unpatched model feeds its first decoder layer: hidden states, RoPE tables, positions."""
    lm = model.model.language_model
    box = {}

    def grab(module, args, kwargs):
        box["h"] = (kwargs.get("hidden_states") if not args else args[0]).detach().clone()
        box["pos"] = kwargs["position_ids"].detach().clone()
        raise _Stop

    h = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    B, T = inputs["input_ids"].shape
    pos = box["pos"].expand(B, T).clone()
    return {"h": box["h"], "pos": pos}


def capture_rope(model, inputs: dict) -> dict:
    """Layer-0 input of the unpatched model and the ``(cos, sin)`` ``[B, T, d]`` it receives (any RoPE:
    Qwen2-VL's M-RoPE arrives already merged per token), so no position rule is re-derived here. Qwen3-VL:
    also ``"deepstack"``, the DeepStack features the language model receives, each scattered to full length
    ``[B, T, D]`` (zero at non-visual rows), with ``"deepstack_mask"`` ``[B, T]`` (where they are added)."""
    lm = model.model.language_model
    box = {}

    def grab_lm(module, args, kwargs):
        if kwargs.get("deepstack_visual_embeds") is not None:
            box["ds"] = ([f.detach().clone() for f in kwargs["deepstack_visual_embeds"]],
                         kwargs["visual_pos_masks"].detach().clone())

    def grab(module, args, kwargs):
        box["h"] = (kwargs.get("hidden_states") if not args else args[0]).detach().clone()
        box["rope"] = tuple(t.detach().clone() for t in kwargs["position_embeddings"])
        raise _Stop

    h_lm = lm.register_forward_pre_hook(grab_lm, with_kwargs=True)
    h = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
        h_lm.remove()
    B = inputs["input_ids"].shape[0]
    cos, sin = box["rope"]
    out = {"h": box["h"], "rope": (cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:]))}
    if "ds" in box:
        feats, mask = box["ds"]
        full = []
        for f in feats:
            x = box["h"].new_zeros(box["h"].shape)
            x[mask] = f.to(x.dtype)  # row-major order of the mask, as the model's own injection reads them
            full.append(x)
        out["deepstack"], out["deepstack_mask"] = full, mask
    return out


def greedy_recapture(model, inputs: dict, steps: int, visual, grid=None, ops=None, removed=None, banned=()) -> torch.Tensor:
    """``[B, steps]`` greedy tokens without a cache: every step feeds prompt + generated tokens to the
    unpatched model up to layer 0 (fresh embeddings and RoPE tables), then runs the masked reference.
    ``banned``: token ids never chosen (image / vision placeholders would be new images to the model)."""
    cur = dict(inputs)
    B = cur["input_ids"].shape[0]
    vis, g, rem = visual, grid, dict(removed or {})
    out = []
    for _ in range(steps):
        cap = capture_rope(model, cur)
        with torch.no_grad():
            logits = forward(model, cap["h"], None, cur["attention_mask"].bool(), vis, g, ops, rem, rope=cap["rope"],
                             deepstack=deepstack_of(cap))
        last = logits[:, -1].clone()
        last[:, list(banned)] = float("-inf")
        tok = last.argmax(-1)
        out.append(tok)
        one = torch.ones(B, 1, dtype=cur["attention_mask"].dtype)
        cur["input_ids"] = torch.cat([cur["input_ids"], tok[:, None]], 1)
        cur["attention_mask"] = torch.cat([cur["attention_mask"], one], 1)
        if "mm_token_type_ids" in cur:
            mm = cur["mm_token_type_ids"]
            cur["mm_token_type_ids"] = torch.cat([mm, torch.zeros(B, 1, dtype=mm.dtype)], 1)
        no = torch.zeros(B, 1, dtype=torch.bool)
        vis = torch.cat([vis, no], 1)
        rem = {k: torch.cat([v, no], 1) for k, v in rem.items()}
        if g is not None:
            g = tuple(torch.cat([x, torch.full((B, 1), -1)], 1) for x in g)
    return torch.stack(out, 1)


def deepstack_of(cap: dict):
    """``(mask [B, T], [features [B, T, D], ...])`` of a ``capture_rope`` result, None without DeepStack."""
    return (cap["deepstack_mask"], cap["deepstack"]) if "deepstack" in cap else None


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


def _layer(layer, h, cos, sin, allowed, visual, op_heads_all, op_heads_vis, ffn_m, skip_visual, sub=frozenset()):
    """One decoder layer; ``sub``: removed sublayers ``{"attn", "ffn", "attn_visual", "ffn_visual"}``."""
    attn = layer.self_attn
    d = attn.head_dim
    B, T, D = h.shape
    x = layer.input_layernorm(h)
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(B, T, -1, d)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(B, T, -1, d)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head's d channels, before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, T, -1, d).transpose(1, 2)
    H, Hkv = q.shape[1], k.shape[1]
    c, s = cos[:, None], sin[:, None]
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    k = k[:, [hh * Hkv // H for hh in range(H)]]
    v = v[:, [hh * Hkv // H for hh in range(H)]]
    logits = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5  # [B, H, T, T]
    allowed = allowed.expand(B, H, T, T).clone()
    for hh in op_heads_vis:
        allowed[:, hh] &= ~visual[:, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    out = (probs @ v.double()).to(h.dtype)  # [B, H, T, d]
    for hh in op_heads_all:
        out[:, hh] = 0
    for hh in op_heads_vis:
        out[:, hh] = out[:, hh].masked_fill(visual[:, :, None], 0.0)
    out = out.transpose(1, 2).reshape(B, T, H * d)
    a = F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
    if "attn_visual" in sub:
        a = a.masked_fill(visual[:, :, None], 0.0)
    h2 = h if "attn" in sub else h + a
    mlp = layer.mlp
    y = layer.post_attention_layernorm(h2)
    if getattr(mlp, "gate_proj", None) is None:  # mixture of experts: the model's own block, per-token routing
        f = mlp(y)
        f = f[0] if isinstance(f, tuple) else f
    else:
        mid = F.silu(F.linear(y, mlp.gate_proj.weight, mlp.gate_proj.bias)) * F.linear(y, mlp.up_proj.weight, mlp.up_proj.bias)
        if ffn_m is not None:
            cut = torch.zeros(mid.shape[-1], dtype=torch.bool)
            cut[ffn_m:] = True
            mid = mid.masked_fill(visual[:, :, None] & cut, 0.0)
        f = F.linear(mid, mlp.down_proj.weight, mlp.down_proj.bias)
    if "ffn_visual" in sub:
        f = f.masked_fill(visual[:, :, None], 0.0)
    h3 = h2 if "ffn" in sub else h2 + f
    if skip_visual:
        h3 = torch.where(visual[:, :, None], h, h3)
    return h3


def forward(model, h0, pos, valid, visual, grid=None, ops=None, removed=None, rope=None, deepstack=None) -> torch.Tensor:
    """Logits ``[B, T, V]`` of the masked reference.

    Args:
        h0: ``[B, T, D]`` layer-0 input; ``pos`` ``[B, T]`` position ids; ``valid`` ``[B, T]`` real tokens;
        visual: ``[B, T]`` visual tokens; grid: ``(row, col, segment)`` each ``[B, T]`` (neighbour op);
        ops: ``{"skip_all": set, "skip_visual": set, "heads_all": {l: heads}, "heads_visual": {l: heads},
        "ffn": {l: m'}, "neighbor": {l: w}, "skip_attn": set, "skip_ffn": set, "attn_visual": set,
        "ffn_visual": set}``; removed: ``{layer: [B, T] bool}`` tokens gone from that layer on;
        rope: ``(cos, sin)`` ``[B, T, d]`` as layer 0 receives them (``capture_rope``), else built from ``pos``;
        deepstack: ``(mask [B, T], [features [B, T, D], ...])`` (``deepstack_of``): added at the mask's rows
        after layers 0 .. len - 1, whatever those layers' ops.
    """
    ops = ops or {}
    lm = model.model.language_model
    B, T = valid.shape
    cos, sin = rope if rope is not None else lm.rotary_emb(h0, pos)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    h = h0
    gone = torch.zeros(B, T, dtype=torch.bool)
    eye = torch.eye(T, dtype=torch.bool)
    for j, layer in enumerate(lm.layers):
        if removed and j in removed:
            gone = gone | removed[j]
        if j not in ops.get("skip_all", ()):
            h = _run(layer, j, h, cos, sin, valid, visual, gone, grid, ops, causal, eye)
        if deepstack is not None and j < len(deepstack[1]):
            h = torch.where(deepstack[0][:, :, None], h + deepstack[1][j], h)
    return model.lm_head(lm.norm(h))


def _run(layer, j, h, cos, sin, valid, visual, gone, grid, ops, causal, eye):
    """Decoder layer j under its ops (masks built at full length)."""
    keys = valid & ~gone
    allowed = causal[None] & keys[:, None, :]
    if j in ops.get("neighbor", {}):
        w = ops["neighbor"][j] // 2
        row, col, seg = grid
        g = visual & (row >= 0)
        far = ((row[:, :, None] - row[:, None, :]).abs() > w) | ((col[:, :, None] - col[:, None, :]).abs() > w) \
            | (seg[:, :, None] != seg[:, None, :])
        allowed = allowed & ~(g[:, :, None] & g[:, None, :] & far)
    allowed = (allowed | eye[None])[:, None]  # [B, 1, T, T]; every row keeps itself (padding rows)
    allowed = allowed & (causal[None, None])
    sub = {name for name, key in (("attn", "skip_attn"), ("ffn", "skip_ffn"), ("attn_visual", "attn_visual"),
                                  ("ffn_visual", "ffn_visual")) if j in ops.get(key, ())}
    return _layer(layer, h, cos, sin, allowed, visual & ~gone, ops.get("heads_all", {}).get(j, ()),
                  ops.get("heads_visual", {}).get(j, ()), ops.get("ffn", {}).get(j), j in ops.get("skip_visual", ()),
                  frozenset(sub))


def greedy(model, inputs, steps, visual, grid=None, ops=None, removed=None) -> torch.Tensor:
    """``[B, steps]`` greedy tokens, recomputing the whole sequence every step (no cache)."""
    cap = capture(model, inputs)
    h, pos = cap["h"], cap["pos"]
    valid = inputs["attention_mask"].bool()
    emb = model.get_input_embeddings()
    B = h.shape[0]
    out = []
    vis = visual
    rem = dict(removed or {})
    g = grid
    for t in range(steps):
        with torch.no_grad():
            logits = forward(model, h, pos, valid, vis, g, ops, rem)
        tok = logits[:, -1].argmax(-1)
        out.append(tok)
        h = torch.cat([h, emb(tok)[:, None]], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)
        vis = torch.cat([vis, torch.zeros(B, 1, dtype=torch.bool)], 1)
        rem = {k: torch.cat([v, torch.zeros(B, 1, dtype=torch.bool)], 1) for k, v in rem.items()}
        if g is not None:
            g = tuple(torch.cat([x, torch.full((B, 1), -1)], 1) for x in g)
    return torch.stack(out, 1)
