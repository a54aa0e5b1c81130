"""Independent reference for token pruning on Qwen3-VL / Qwen3-VL-MoE, batch size 1, no KV cache.

Written from the papers, sharing no code with ``vlm_tokenprune``: torch and the Hugging Face model's
own modules (decoder layers, ``rotary_emb``, norms, projections) on an eager deep copy, one layer call
at a time, plain Python lists for the token bookkeeping.

Semantics, as defined by the library (adapters/qwen3_vl.py) and checked here:
  * the language model's input (embeddings with the visual features in place, 3-D M-RoPE ids, the
    visual-position mask and the DeepStack features) is what the unpatched model builds;
  * DeepStack (arXiv 2406.04334): after decoder layer j < n, every visual token STILL IN THE SEQUENCE
    gets its own ``deepstack[j]`` row added; dropped tokens get nothing;
  * FastV (arXiv 2403.06764) with K = ``layer``: the head-mean post-softmax attention of the last token
    in layer K-1 (its input after the injections below it), read at the visual tokens still present;
    the top-k (ties -> lower position) stay, the other visual tokens leave before layer K;
  * a pre-LLM prune keeps a given set before layer 0; a pre-LLM merge (given assignment: representative
    position -> its original sources) puts at the representative the mean of its sources' embeddings
    (AIM's size-weighted mode) and injects the mean of its sources' DeepStack rows;
  * kept tokens keep their original 3-D positions (the cos / sin of those positions, built by the
    model's own interleaved-M-RoPE ``rotary_emb``); the causal mask is over the kept tokens;
  * generation (cache-free, the kept set chosen once from the prompt): token s after the prompt sits at
    position max(prompt positions) + 1 + s on every axis.
"""
from __future__ import annotations

import copy

import torch


class _Captured(Exception):
    pass


def lm_inputs(model, inputs: dict) -> dict:
    """The kwargs the unpatched model passes to its language model (captured, then the call is aborted)."""
    if inputs["input_ids"].shape[0] != 1 or not bool(inputs["attention_mask"].bool().all()):
        raise ValueError("the oracle handles one unpadded row")
    box = {}

    def grab(module, args, kwargs):
        box.update({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "visual_pos_masks",
                                                "deepstack_visual_embeds")})
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


def eager_copy(model):
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m.eval()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _causal(n: int, dtype) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype)
    for i in range(n):
        m[i, : i + 1] = 0.0
    return m[None, None]


def _last_row(layer, hidden, cos, sin) -> torch.Tensor:
    """``[T]`` head-mean attention of the last token in ``layer`` (input ``hidden`` [1, T, D])."""
    attn = layer.self_attn
    d = attn.head_dim
    T = hidden.shape[1]
    x = layer.input_layernorm(hidden)
    q = attn.q_norm(attn.q_proj(x).view(1, T, -1, d)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(1, T, -1, d)).transpose(1, 2)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("hd,htd->ht", q[0, :, T - 1].float(), k[0].float()) * attn.scaling
    return torch.softmax(logits, dim=-1).mean(0)


class Prompt:
    """One row's language-model input, in plain lists."""

    def __init__(self, model, inputs: dict):
        cap = lm_inputs(model, inputs)
        self.embeds = cap["inputs_embeds"][0]
        pid = cap["position_ids"]
        self.pos3 = pid[-3:, 0]  # [3, L]
        mask = cap["visual_pos_masks"][0].tolist()
        self.visual = [p for p, v in enumerate(mask) if v]
        row = {p: i for i, p in enumerate(self.visual)}
        self.deepstack = [{p: f[row[p]] for p in self.visual} for f in cap["deepstack_visual_embeds"]]

    @property
    def next_pos(self) -> int:
        return int(self.pos3.max()) + 1


def forward(eager, prompt: Prompt, *, start: list[int] | None = None, fastv: tuple[int, int] | None = None,
            extra: list[int] = (), skip_deepstack: bool = False, fixed: list[int] | None = None,
            merged: dict[int, list[int]] | None = None):
    """Run the language model; returns (logits [T', V], kept visual positions after FastV or None).

    ``start``: the positions present before layer 0 (a pre-LLM prune; default all); ``fastv``: (K, k);
    ``fixed``: with ``fastv``, the visual positions kept at layer K (no scoring); ``extra``: generated token
    ids appended after the prompt (text, positions after the prompt's); ``skip_deepstack``: no injections;
    ``merged``: representative position -> original sources of a pre-LLM merge (see the module docstring).
    """
    lm = eager.model.language_model
    L = prompt.embeds.shape[0]
    cur = list(start) if start is not None else list(range(L))
    cur += [L + s for s in range(len(extra))]
    emb = prompt.embeds
    if extra:
        with torch.no_grad():
            emb = torch.cat([emb, lm.embed_tokens(torch.tensor(extra))])
    pos3 = torch.cat([prompt.pos3, (prompt.next_pos + torch.arange(len(extra)))[None].expand(3, -1)], dim=1)
    merged = merged or {}
    hidden = torch.stack([torch.stack([emb[q] for q in merged[p]]).mean(0) if p in merged else emb[p] for p in cur])[None]
    kept_visual = None
    with torch.no_grad():
        for j, layer in enumerate(lm.layers):
            cos, sin = lm.rotary_emb(hidden, pos3[:, cur][:, None])
            if fastv is not None and j == fastv[0] - 1:
                if fixed is None:
                    row = _last_row(layer, hidden, cos, sin)
                    scores = {p: float(row[t]) for t, p in enumerate(cur) if p in prompt.visual}
                    order = sorted(scores, key=lambda p: (-scores[p], p))
                    kept_visual = sorted(order[: fastv[1]])
                else:
                    kept_visual = list(fixed)
            if fastv is not None and j == fastv[0]:
                keep = [t for t, p in enumerate(cur) if p not in prompt.visual or p in kept_visual]
                cur = [cur[t] for t in keep]
                hidden = hidden[:, keep]
                cos, sin = lm.rotary_emb(hidden, pos3[:, cur][:, None])
            out = layer(hidden, attention_mask=_causal(len(cur), hidden.dtype), position_embeddings=(cos, sin))
            hidden = (out[0] if isinstance(out, tuple) else out).clone()
            if j < len(prompt.deepstack) and not skip_deepstack:
                for t, p in enumerate(cur):
                    if p in merged:
                        hidden[0, t] = hidden[0, t] + torch.stack([prompt.deepstack[j][q] for q in merged[p]]).mean(0)
                    elif p in prompt.deepstack[j]:
                        hidden[0, t] = hidden[0, t] + prompt.deepstack[j][p]
        logits = eager.lm_head(lm.norm(hidden))[0]
    return logits, kept_visual


def fastv_scores(model, inputs: dict, layer: int, start: list[int] | None = None) -> list[float]:
    """The sorted (descending) FastV scores of the visual tokens present (for selection margins)."""
    prompt = Prompt(model, inputs)
    eager = eager_copy(model)
    lm = eager.model.language_model
    cur = list(start) if start is not None else list(range(prompt.embeds.shape[0]))
    hidden = prompt.embeds[cur][None]
    with torch.no_grad():
        for j in range(layer - 1):
            cos, sin = lm.rotary_emb(hidden, prompt.pos3[:, cur][:, None])
            out = lm.layers[j](hidden, attention_mask=_causal(len(cur), hidden.dtype), position_embeddings=(cos, sin))
            hidden = (out[0] if isinstance(out, tuple) else out).clone()
            if j < len(prompt.deepstack):
                for t, p in enumerate(cur):
                    if p in prompt.deepstack[j]:
                        hidden[0, t] = hidden[0, t] + prompt.deepstack[j][p]
        cos, sin = lm.rotary_emb(hidden, prompt.pos3[:, cur][:, None])
        row = _last_row(lm.layers[layer - 1], hidden, cos, sin)
    return sorted((float(row[t]) for t, p in enumerate(cur) if p in prompt.visual), reverse=True)


def greedy(model, inputs: dict, steps: int, *, start: list[int] | None = None, fastv: tuple[int, int] | None = None,
           eos: int | None = None) -> list[int]:
    """Greedy tokens, each step a fresh forward; FastV's kept set chosen once, from the prompt."""
    prompt = Prompt(model, inputs)
    eager = eager_copy(model)
    _, kept = forward(eager, prompt, start=start, fastv=fastv)
    out: list[int] = []
    for _ in range(steps):
        logits, _ = forward(eager, prompt, start=start, fastv=fastv, fixed=kept, extra=out)
        out.append(int(logits[-1].argmax()))
        if out[-1] == eos:
            break
    return out
