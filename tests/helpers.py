"""Small helpers shared by the method test files (oracle comparisons)."""
from __future__ import annotations

import torch

import vlm_tokenprune as vtp

from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID


def n_image_tokens(inputs, b: int = 0) -> int:
    return int((inputs["input_ids"][b] == IMAGE_TOKEN_ID).sum())


def new_tokens(ids: torch.Tensor, prompt_len: int, eos, pad) -> list[int]:
    out = []
    for t in ids[prompt_len:].tolist():
        out.append(t)
        if t == eos:
            break
    assert all(t == pad for t in ids[prompt_len + len(out):].tolist())
    return out


def cache_kwargs(out) -> dict:
    """The keyword that passes the KV cache ``out`` returned to the next forward: ``cache=`` on transformers
    >= 5.2x (which renamed it), ``past_key_values=`` on earlier 5.x (setup.py's window starts at 5.17)."""
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}


def patched_prefill(model, inputs, policy: str):
    with vtp.patch(model, policy) as h, torch.no_grad():
        out = model(**inputs)
        trace = h.last_trace()
    return out.logits, trace
