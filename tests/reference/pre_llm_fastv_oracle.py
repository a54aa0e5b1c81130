"""Independent reference for a pre-LLM reduction followed by FastV in the LLM (e.g. AIM stage A + a
FastV-style stage B, arXiv 2412.03248 / 2403.06764), one row at a time, no KV cache.

Composes the two oracles, sharing no code with ``vlm_tokenprune``:
  * ``pre_llm_oracle.reduce_row`` reduces the row's real tokens (merge or prune) -> embeddings
    ``x [n', D]`` and each token's original position (its representative's);
  * the reduced row is the language model's prompt, at positions = those original positions
    (``gaps``) or 0..n'-1 (``repack``);
  * FastV (``fastv_oracle`` plumbing: eager copy, RoPE, full-row softmax) on that prompt: layers
    < K run on all n' tokens, layer K-1's last-token attention (heads averaged) scores the visual
    tokens left, the top k (ties: earlier slot) and every text token continue into layers >= K at
    their prompt positions. ``k = max(1, floor(keep * n_visual_original + 0.5))``: keep is a
    fraction of the row's ORIGINAL visual tokens (``of="current"``: of the tokens left).
Generation: greedy, every step recomputes everything; ``rescore=False`` keeps the prompt's FastV
choice (cached generate), ``rescore=True`` re-scores with the newest last token (``use_cache=False``).
"""
from __future__ import annotations

import math

import torch

from . import fastv_oracle as fv
from . import pre_llm_oracle as pre


def budget(keep: float, n_original: int, n_current: int, of: str = "original") -> int:
    n = n_original if of == "original" else n_current
    return max(1, math.floor(keep * n + 0.5))


def prompt_positions(pos: list[int], positions: str) -> list[int]:
    return list(pos) if positions == "gaps" else list(range(len(pos)))


def fastv_slots(eager, x: torch.Tensor, p: list[int], visual: list[bool], layer: int, k: int) -> list[int]:
    """Slots (indices into the reduced row) of the k visual tokens FastV keeps, ascending."""
    with torch.no_grad():
        h = fv.run_layers(eager, x[None], p, range(layer - 1))
        att = fv.last_token_attention(eager, layer - 1, h, p).mean(0)
    scores = {i: float(att[i]) for i in range(len(p)) if visual[i]}
    return sorted(sorted(scores, key=lambda i: (-scores[i], i))[:k])


def logits(eager, x: torch.Tensor, p: list[int], visual: list[bool], layer: int, kept_vis: list[int]) -> torch.Tensor:
    """``[n_kept, V]``: all n' tokens up to layer K, then text + ``kept_vis`` slots."""
    lm = eager.model.language_model
    keep = [i for i in range(len(p)) if not visual[i] or i in kept_vis]
    with torch.no_grad():
        h = fv.run_layers(eager, x[None], p, range(layer))[:, keep]
        h = fv.run_layers(eager, h, [p[i] for i in keep], range(layer, len(lm.layers)))
        return eager.lm_head(lm.norm(h))[0]


def row(model, inputs: dict, b: int, *, keep1: float, layer: int, keep2: float, positions: str,
        merge: dict | None = None, kept: list[int] | None = None, of: str = "original"):
    """Row ``b``: (kept original positions of the FastV stage, their sources, logits of the kept tokens).

    ``merge`` / ``kept``: as ``pre_llm_oracle.reduce_row``; positions are indices into the row's
    real (unpadded) tokens.
    """
    eager = fv.eager_copy(model)
    x, pos, sources = pre.reduce_row(model, inputs, b, keep1, merge=merge, kept=kept)
    n_vis = int((inputs["input_ids"][b] == model.config.image_token_id).sum())  # the row's original count
    visual = [q in sources for q in pos]
    k = budget(keep2, n_vis, sum(visual), of)
    p = prompt_positions(pos, positions)
    slots = fastv_slots(eager, x, p, visual, layer, k)
    out = logits(eager, x, p, visual, layer, slots)
    return [pos[i] for i in slots], [sources[pos[i]] for i in slots], out


def greedy(model, inputs: dict, b: int, *, keep1: float, layer: int, keep2: float, positions: str, steps: int,
           rescore: bool, merge: dict | None = None, kept: list[int] | None = None) -> list[int]:
    """Greedy tokens after row ``b``; the next position is the original length (gaps) or the reduced one (repack)."""
    eager = fv.eager_copy(model)
    x, pos, sources = pre.reduce_row(model, inputs, b, keep1, merge=merge, kept=kept)
    n_vis = int((inputs["input_ids"][b] == model.config.image_token_id).sum())  # the row's original count
    visual = [q in sources for q in pos]
    k = budget(keep2, n_vis, sum(visual))
    p = prompt_positions(pos, positions)
    nxt = int(inputs["attention_mask"][b].sum()) if positions == "gaps" else len(pos)
    slots = fastv_slots(eager, x, p, visual, layer, k)
    out = []
    for _ in range(steps):
        if rescore:
            slots = fastv_slots(eager, x, p, visual, layer, k)
        tok = int(logits(eager, x, p, visual, layer, slots)[-1].argmax())
        out.append(tok)
        with torch.no_grad():
            e = model.get_input_embeddings()(torch.tensor([tok]))
        x = torch.cat([x, e])
        p.append(nxt)
        visual.append(False)
        nxt += 1
    return out
