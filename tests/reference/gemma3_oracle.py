"""Independent reference for token pruning on Gemma 3 (arXiv 2503.19786), batch size 1, sharing no code with
``vlm_tokenprune`` (only torch and the Hugging Face model's own modules).

The definition it applies, on the UNPRUNED sequence with the pruned tokens masked out:
  * ``alive[j]``: the original positions present at decoder layer j (all of them below the first stage; text +
    the kept image tokens from a stage's layer on; a pre-LLM stage is a stage at layer 0);
  * a query at original position ``q`` attends to key ``k`` in layer j iff ``k`` is alive at j and
    (``k <= q`` or ``q`` and ``k`` are image tokens of the same image block, when ``token_type_ids`` is given)
    and, in a sliding layer, ``k > q - sliding_window`` (a window of ORIGINAL positions: a pruned token leaves
    a hole, it pulls nothing older into the window);
  * rotary positions are the original positions; eager attention written out below (q/k RMS norms, GQA,
    ``query_pre_attn_scalar`` scaling), the layer's own norms and MLP.
``layer_probs`` writes out one layer's attention probabilities with the same rule (for criteria that read several
query rows at once, e.g. EfficientVLA's instruction tokens: each row its own window). Generation recomputes the whole sequence each step (no cache); new tokens are alive in every layer. Scores for
FastV (arXiv 2403.06764): head-mean post-softmax attention of the last token over its row at layer K-1, the
layer's own row: causal, and in a sliding layer only the keys inside its window of original positions.
"""
from __future__ import annotations

import torch


def prompt_embeds(model, inputs: dict) -> torch.Tensor:
    """``[1, L, D]``: the text model's (scaled) embeddings with the image features written at the placeholders."""
    ids = inputs["input_ids"]
    cfg = model.config
    with torch.no_grad():
        x = model.model.language_model.embed_tokens(ids.masked_fill(ids == cfg.image_token_id, 0)).clone()
        if inputs.get("pixel_values") is not None:
            feats = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
            x[ids == cfg.image_token_id] = feats.reshape(-1, x.shape[-1]).to(x.dtype)
    return x


def image_blocks(inputs: dict) -> list[int]:
    """Per position: the index of its run of consecutive image tokens (from ``token_type_ids``), -1 for text or
    when no ``token_type_ids`` is given (the model then has no bidirectional block)."""
    tt = inputs.get("token_type_ids")
    L = inputs["input_ids"].shape[1]
    if tt is None:
        return [-1] * L
    out, block, prev = [], -1, False
    for t in tt[0].tolist():
        if t == 1 and not prev:
            block += 1
        out.append(block if t == 1 else -1)
        prev = t == 1
    return out


def allowed(layer_type: str, window: int, q: int, k: int, alive: set, blocks: list) -> bool:
    if k not in alive:
        return False
    ok = k <= q or (blocks[q] >= 0 and blocks[q] == blocks[k])
    if layer_type == "sliding_attention":
        ok = ok and k > q - window
    return ok


def _rot(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def layer_forward(model, j: int, x: torch.Tensor, alive: set, blocks: list, ops: dict | None = None,
                  grid: list | None = None) -> torch.Tensor:
    """Decoder layer ``j`` on ``x`` ``[T, D]`` (every original position), masked as defined above, with the structural
    ``ops`` of this layer applied per their definitions (``STRUCTURAL`` below; ``grid``: per position ``(image, row,
    col)`` of an image token, None for text)."""
    ops = ops or {}
    if j in ops.get("skip_all", ()):
        return x  # the layer does not run
    lm = model.model.language_model
    cfg = model.config.text_config
    layer = lm.layers[j]
    att = layer.self_attn
    lt = cfg.layer_types[j]
    T = x.shape[0]
    vis = [g is not None for g in grid] if grid is not None else [False] * T
    d, H, Hkv = att.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    heads_all = set(ops.get("heads_all", {}).get(j, ()))
    heads_vis = set(ops.get("heads_visual", {}).get(j, ()))
    w = ops.get("neighbor", {}).get(j)
    h = layer.input_layernorm(x)
    q = att.q_norm(att.q_proj(h).view(T, H, d))
    k = att.k_norm(att.k_proj(h).view(T, Hkv, d))
    v = att.v_proj(h).view(T, Hkv, d)
    cos, sin = lm.rotary_emb(x[None], torch.arange(T)[None], lt)
    cos, sin = cos[0][:, None], sin[0][:, None]  # [T, 1, d]
    q, k = _rot(q, cos, sin), _rot(k, cos, sin)
    rep = H // Hkv
    out = torch.zeros(T, H, d, dtype=x.dtype)
    for qi in range(T):
        base = [ki for ki in range(T) if allowed(lt, cfg.sliding_window, qi, ki, alive, blocks)]
        if w is not None and vis[qi]:  # visual -> visual only within the w x w window of the same image
            base = [ki for ki in base if not vis[ki] or (grid[ki][0] == grid[qi][0]
                    and abs(grid[ki][1] - grid[qi][1]) <= w // 2 and abs(grid[ki][2] - grid[qi][2]) <= w // 2)]
        for hh in range(H):
            if hh in heads_all or (hh in heads_vis and vis[qi]):
                continue  # a pruned head gives this query nothing
            keys = [ki for ki in base if not vis[ki]] if hh in heads_vis else base
            if not keys:
                continue
            logits = torch.stack([(q[qi, hh] * k[ki, hh // rep]).sum() for ki in keys]) * att.scaling
            p = torch.softmax(logits.float(), 0).to(x.dtype)
            out[qi, hh] = (p[:, None] * v[keys, hh // rep]).sum(0)
    a = layer.post_attention_layernorm(att.o_proj(out.reshape(T, H * d)))
    for qi in range(T):
        if j in ops.get("skip_attn", ()) or (j in ops.get("attn_visual", ()) and vis[qi]):
            a[qi] = 0  # the attention sublayer adds nothing to this row's residual stream
    y = x + a
    hf = layer.pre_feedforward_layernorm(y)
    m = layer.mlp(hf)
    mlp = layer.mlp
    for qi in range(T):
        if vis[qi] and j in ops.get("ffn", {}):  # visual rows: the first m_visual channels of the MLP
            c = ops["ffn"][j]
            g = mlp.act_fn(hf[qi] @ mlp.gate_proj.weight[:c].T) * (hf[qi] @ mlp.up_proj.weight[:c].T)
            m[qi] = g @ mlp.down_proj.weight[:, :c].T
    f = layer.post_feedforward_layernorm(m)
    for qi in range(T):
        if j in ops.get("skip_ffn", ()) or (j in ops.get("ffn_visual", ()) and vis[qi]):
            f[qi] = 0  # the MLP sublayer adds nothing to this row
    out_x = y + f
    if j in ops.get("skip_visual", ()):
        out_x = torch.where(torch.tensor(vis)[:, None], x, out_x)  # visual rows pass the layer unchanged
    return out_x


STRUCTURAL = """Structural ops, per layer j (``ops``), as the library's ``structural.spec`` defines them:
skip_all (the layer does not run), skip_visual (image rows leave it unchanged; text rows run it, attending the image
keys / values computed here), heads_all {j: heads} (those heads give every query nothing), heads_visual {j: heads}
(in those heads no query attends an image key and image queries get nothing), ffn {j: m} (image rows use the first m
MLP channels), neighbor {j: w} (an image query attends the image keys of its own image within a w x w window of the
patch grid only; text keys as before), skip_attn / skip_ffn (the sublayer adds nothing: sandwich norms included, the
residual passes it unchanged), attn_visual / ffn_visual (the same for image rows only)."""


def image_grid(model, inputs: dict) -> list:
    """Per position ``(image, row, col)`` of an image token (the k-th run of ``mm_tokens_per_image`` placeholders is
    image k, a ``sqrt(n) x sqrt(n)`` raster), None for text."""
    n = int(model.config.mm_tokens_per_image)
    side = int(round(n ** 0.5))
    out, i = [], 0
    for t in inputs["input_ids"][0].tolist():
        if t == model.config.image_token_id:
            out.append((i // n, (i % n) // side, (i % n) % side))
            i += 1
        else:
            out.append(None)
    return out


def layer_probs(model, j: int, x: torch.Tensor, alive: set, blocks: list) -> torch.Tensor:
    """``[H, T, T]`` fp32 attention probabilities of decoder layer ``j`` on ``x`` ``[T, D]`` (rows: queries), each row
    over exactly the keys ``allowed`` gives it (0 elsewhere): the scoring layer's own rows, written out."""
    lm = model.model.language_model
    cfg = model.config.text_config
    layer = lm.layers[j]
    att = layer.self_attn
    lt = cfg.layer_types[j]
    T = x.shape[0]
    d, H, Hkv = att.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    with torch.no_grad():
        h = layer.input_layernorm(x)
        q = att.q_norm(att.q_proj(h).view(T, H, d))
        k = att.k_norm(att.k_proj(h).view(T, Hkv, d))
        cos, sin = lm.rotary_emb(x[None], torch.arange(T)[None], lt)
        cos, sin = cos[0][:, None], sin[0][:, None]
        q, k = _rot(q, cos, sin), _rot(k, cos, sin)
        rep = H // Hkv
        probs = torch.zeros(H, T, T)
        for qi in range(T):
            keys = [ki for ki in range(T) if allowed(lt, cfg.sliding_window, qi, ki, alive, blocks)]
            if not keys:
                continue
            for hh in range(H):
                logits = torch.stack([(q[qi, hh] * k[ki, hh // rep]).sum() for ki in keys]) * att.scaling
                probs[hh, qi, keys] = torch.softmax(logits.float(), 0)
    return probs


def efficientvla_keep(model, inputs: dict, layer: int, k: int, stages: list[tuple[int, list[int]]] = ()) -> list[int]:
    """EfficientVLA's kept image positions (arXiv 2506.10100; the selection of ``efficientvla_oracle``) at a stage at
    ``layer`` after ``stages`` (earlier stages' kept sets): relevance = the head-mean attention of the instruction
    tokens (alive text after the first alive image token) in layer ``layer - 1``'s OWN rows (``layer_probs``: in a
    sliding layer each query row its own window of original positions), diversity on the hidden states entering it."""
    from .efficientvla_oracle import select_from_attention

    x = prompt_embeds(model, inputs)
    blocks = image_blocks(inputs)
    T = x.shape[1]
    ids = inputs["input_ids"][0].tolist()
    img = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
    alive = alive_sets(T, img, list(stages), len(model.model.language_model.layers))
    j = layer - 1
    with torch.no_grad():
        h = x[0]
        for i in range(j):
            h = layer_forward(model, i, h, alive[i], blocks)
    A = layer_probs(model, j, h, alive[j], blocks)
    cand = [p for p in img if p in alive[j]]
    text = [p for p in sorted(alive[j]) if p not in set(img) and p > cand[0]]
    return select_from_attention(A.double(), h, cand, text, k)["keep"]


def run(model, x: torch.Tensor, alive: list[set], blocks: list, ops: dict | None = None,
        grid: list | None = None) -> torch.Tensor:
    """``[T, V]`` logits of every position after all layers (only alive ones are meaningful)."""
    lm = model.model.language_model
    with torch.no_grad():
        h = x[0]
        for j in range(len(lm.layers)):
            h = layer_forward(model, j, h, alive[j], blocks, ops, grid)
        return model.lm_head(lm.norm(h))


def hidden_before(model, x: torch.Tensor, layer: int, blocks: list) -> torch.Tensor:
    """``[T, D]`` input of decoder layer ``layer`` with nothing pruned."""
    T = x.shape[1]
    with torch.no_grad():
        h = x[0]
        for j in range(layer):
            h = layer_forward(model, j, h, set(range(T)), blocks)
    return h


def fastv_scores(model, inputs: dict, layer: int) -> dict[int, float]:
    """Image position -> head-mean attention of the last token in layer ``layer - 1`` (its row in that layer: a
    sliding layer sees only the keys inside its window)."""
    x = prompt_embeds(model, inputs)
    blocks = image_blocks(inputs)
    T = x.shape[1]
    j = layer - 1
    cfg = model.config.text_config
    lm = model.model.language_model
    att = lm.layers[j].self_attn
    with torch.no_grad():
        h = lm.layers[j].input_layernorm(hidden_before(model, x, j, blocks))
        d, H, Hkv = att.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = att.q_norm(att.q_proj(h).view(T, H, d))
        k = att.k_norm(att.k_proj(h).view(T, Hkv, d))
        cos, sin = lm.rotary_emb(x, torch.arange(T)[None], cfg.layer_types[j])
        cos, sin = cos[0][:, None], sin[0][:, None]
        q, k = _rot(q, cos, sin), _rot(k, cos, sin)
        rep = H // Hkv
        keys = [p for p in range(T) if cfg.layer_types[j] != "sliding_attention" or p > T - 1 - cfg.sliding_window]
        probs = torch.zeros(H, T)
        for hh in range(H):
            probs[hh, keys] = torch.softmax((k[keys, hh // rep] @ q[-1, hh]).float() * att.scaling, 0)
        mean = probs.mean(0)
    ids = inputs["input_ids"][0].tolist()
    return {p: float(mean[p]) for p, t in enumerate(ids) if t == model.config.image_token_id}


def top_k(scores: dict[int, float], k: int) -> list[int]:
    """The ``k`` highest-scoring positions (ties -> lower position), ascending."""
    return sorted(sorted(scores, key=lambda p: (-scores[p], p))[:k])


def alive_sets(T: int, image_pos: list[int], stages: list[tuple[int, list[int]]], n_layers: int) -> list[set]:
    """Per layer, the alive original positions for ``stages`` = [(layer, kept image positions), ...]."""
    alive, cur = [], set(range(T))
    stage_at = dict(stages)
    for j in range(n_layers):
        if j in stage_at:
            cur = (cur - set(image_pos)) | (set(stage_at[j]) & cur)
        alive.append(set(cur))
    return alive


def logits(model, inputs: dict, stages: list[tuple[int, list[int]]], embeds: torch.Tensor | None = None,
           ops: dict | None = None) -> torch.Tensor:
    """``[n_alive_at_last_layer, V]`` logits of the tokens present after the last stage, in prompt order
    (``embeds``: the layer-0 input, default the prompt's own embeddings; a merge writes fused rows into it;
    ``ops``: structural ops, ``layer_forward``)."""
    x = prompt_embeds(model, inputs) if embeds is None else embeds
    T = x.shape[1]
    ids = inputs["input_ids"][0].tolist()
    img = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
    n = len(model.model.language_model.layers)
    alive = alive_sets(T, img, stages, n)
    out = run(model, x, alive, image_blocks(inputs), ops, image_grid(model, inputs) if ops else None)
    return out[sorted(alive[-1])]


def generate(model, inputs: dict, stages: list[tuple[int, list[int]]], steps: int, eos_token_id=None,
             suppress: tuple[int, ...] = (), ops: dict | None = None) -> list[int]:
    """Greedy tokens after the prompt, the kept sets fixed at prefill (what a cached generate computes; generated
    tokens are text for the structural ``ops``)."""
    x = prompt_embeds(model, inputs)
    blocks = image_blocks(inputs)
    grid = image_grid(model, inputs) if ops else None
    ids = inputs["input_ids"][0].tolist()
    img = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
    n = len(model.model.language_model.layers)
    lm = model.model.language_model
    out = []
    for _ in range(steps):
        T = x.shape[1]
        alive = alive_sets(T, img, stages, n)
        extra = T - len(blocks)
        last = run(model, x, alive, blocks + [-1] * extra, ops, None if grid is None else grid + [None] * extra)[-1].clone()
        for s in suppress:
            last[s] = float("-inf")
        tok = int(last.argmax())
        out.append(tok)
        if eos_token_id is not None and tok == eos_token_id:
            break
        with torch.no_grad():
            x = torch.cat([x, lm.embed_tokens(torch.tensor([[tok]]))], 1)
    return out
