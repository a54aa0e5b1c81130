"""The attention backends every method is tested under: eager, sdpa and a CPU flash-attention stand-in."""
from __future__ import annotations

import torch

FLASH = "vtp_fa_standin"  # the name must not contain "flash" (transformers would try to import flash-attn)
BACKENDS = ("eager", "sdpa", FLASH)


def flash_standin(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """CPU stand-in for flash-attention: receives the 2-D padding mask [B, kv] (or None) like flash-attn.

    Causal masking is bottom-right aligned (query i sees keys <= kv_len - q_len + i) when the
    module is causal, as flash-attn does; fully masked query rows output zeros.
    """
    B, H, Q, d = query.shape
    K = key.shape[2]
    rep = H // key.shape[1]
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    allowed = torch.ones(B, 1, Q, K, dtype=torch.bool)
    if attention_mask is not None:
        assert attention_mask.dim() == 2, "the flash stand-in must receive 2-D padding masks"
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    if getattr(module, "is_causal", False):
        qpos = torch.arange(K - Q, K)[:, None]
        allowed = allowed & (torch.arange(K)[None, :] <= qpos)[None, None]
    scale = scaling if scaling is not None else d ** -0.5
    logits = (query.float() @ key.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = (probs @ value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def register_flash_standin() -> None:
    """Register the stand-in with transformers under ``FLASH`` (attention and 2-D mask format)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(FLASH, flash_standin)
    AttentionMaskInterface.register(FLASH, flash_attention_mask)
