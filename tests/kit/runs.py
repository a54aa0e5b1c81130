"""Patched runs: one prefill with its trace, and greedy generation read back per row."""
from __future__ import annotations

import torch

import vlm_tokenprune as vtp

from .batches import new_tokens


def patched_prefill(model, inputs: dict, policy):
    """``(logits, trace)`` of one forward of ``model`` patched with ``policy`` (unpatched afterwards)."""
    with vtp.patch(model, policy) as h, torch.no_grad():
        out = model(**inputs)
        trace = h.last_trace()
    return out.logits, trace


def generate_rows(model, inputs: dict, policy, steps: int = 8, use_cache: bool = True, **kw) -> list[list[int]]:
    """Greedy tokens of each row (up to and including the first EOS) from ``model`` patched with ``policy``."""
    L = inputs["input_ids"].shape[1]
    eos, pad = model.generation_config.eos_token_id, model.config.text_config.pad_token_id
    if not use_cache:
        kw["use_cache"] = False
    with vtp.patch(model, policy), torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=steps, do_sample=False, **kw)
    return [new_tokens(g[b], L, eos, pad) for b in range(g.shape[0])]
