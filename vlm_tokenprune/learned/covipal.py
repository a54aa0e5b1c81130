"""CoViPAL's Plug-and-Play Pruning Module (PPM): "CoViPAL: Layer-wise Contextualized Visual Token
Pruning for Large Vision-Language Models" (Tang et al., EMNLP 2025 Findings), arXiv 2508.17243.

The paper: a lightweight module, independent of the LVLM, scores every visual token from the
visual tokens and the text tokens, ``S = p_theta(H_v, H_t)``, and the LVLM keeps
``I = TopK(S, r * n_v)`` before it processes them. The module's layout is not given in the
material we could read; this is the simplest faithful choice (written down in README too):

* inputs: ``H_v`` [B, N, D] the projected visual features as the language model receives them,
  ``H_t`` [B, T, D] the language model's input embeddings of the instruction text (the real
  non-visual tokens after the row's first visual token, :func:`instruction_text`);
* ``z = LayerNorm(H) W_in + e_type`` (``D -> d``, a learned type embedding: visual / text);
* ``n_layers`` pre-norm Transformer encoder blocks over the joint sequence ``[z_v ; z_t]``
  (bidirectional multi-head self-attention over the real tokens, then a GELU MLP of width
  ``2 d``), so each visual token is contextualised by the other visual tokens and the text;
* ``S_k = w_out . LayerNorm(h_k) + b_out`` for each visual token k (higher = keep).

No positional encoding is added: the visual features already carry the vision tower's.
Attention masks use the dtype's most negative finite value (a row with no token gives
finite garbage that the budget never selects, never NaN).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PolicyError

KIND = "covipal"


def instruction_text(seq_valid: torch.Tensor, visual_idx: torch.Tensor,
                     visual_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_idx [B, T], text_ok [B, T])``: real non-visual positions after each row's first visual token (ascending)."""
    B, L = seq_valid.shape
    is_vis = torch.zeros(B, L + 1, dtype=torch.bool, device=seq_valid.device)
    is_vis.scatter_(1, visual_idx.masked_fill(~visual_ok, L), True)
    is_vis = is_vis[:, :L]
    after_first = torch.cumsum(is_vis.long(), 1) > 0
    mask = seq_valid & ~is_vis & after_first
    counts = mask.sum(1)
    width = int(counts.max()) if B else 0
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    ok = torch.arange(width, device=seq_valid.device)[None, :] < counts[:, None]
    return order.masked_fill(~ok, 0), ok


class _Block(nn.Module):
    """Pre-norm encoder block: ``h += MHA(LN(h))``; ``h += W2 GELU(W1 LN(h))``."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        B, M, d = h.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.ln1(h)).view(B, M, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # each [B, H, M, hd]
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # [B, H, M, M]
        logits = logits.masked_fill(~ok[:, None, None, :], torch.finfo(logits.dtype).min)
        att = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, M, d)
        h = h + self.proj(att)
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class PPM(nn.Module):
    """The pruning module: ``forward(H_v, v_ok, H_t, t_ok) -> S [B, N]`` (scores of the visual tokens).

    ``H_v`` [B, N, D], ``v_ok`` [B, N]; ``H_t`` [B, T, D], ``t_ok`` [B, T] (T may be 0).
    """

    def __init__(self, in_dim: int, hidden: int = 64, layers: int = 1, heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.hparams = {"in_dim": int(in_dim), "hidden": int(hidden), "layers": int(layers), "heads": int(heads)}
        self.ln_in = nn.LayerNorm(in_dim)
        self.w_in = nn.Linear(in_dim, hidden)
        self.type_emb = nn.Parameter(torch.zeros(2, hidden))  # 0: visual, 1: text
        nn.init.normal_(self.type_emb, std=0.02)
        self.blocks = nn.ModuleList(_Block(hidden, heads) for _ in range(layers))
        self.ln_out = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, h_v: torch.Tensor, v_ok: torch.Tensor, h_t: torch.Tensor, t_ok: torch.Tensor) -> torch.Tensor:
        N = h_v.shape[1]
        x = torch.cat([h_v, h_t], dim=1).to(self.w_in.weight.dtype)
        ok = torch.cat([v_ok, t_ok], dim=1)
        types = torch.cat([torch.zeros(N, dtype=torch.long), torch.ones(h_t.shape[1], dtype=torch.long)]).to(x.device)
        h = self.w_in(self.ln_in(x)) + self.type_emb[types]
        for blk in self.blocks:
            h = blk(h, ok)
        return self.head(self.ln_out(h[:, :N])).squeeze(-1)

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], hparams: Mapping[str, Any], where: str = "weights") -> "PPM":
        """A PPM with ``hparams`` (as written by :func:`~vlm_tokenprune.learned.artifact.save_weights`) and ``tensors``;
        a file whose header is right but whose hyper-parameters or tensors are not is a ``PolicyError`` at ``where``."""
        try:
            m = cls(hparams["in_dim"], hparams["hidden"], hparams["layers"], hparams["heads"])
            m.load_state_dict(dict(tensors))
        except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise PolicyError(where, f"not a valid CoViPAL weight file ({type(e).__name__}: {e}); "
                              "write one with `vlm-tokenprune train covipal`") from None
        return m.eval()


def score_context(ppm: PPM, hidden: torch.Tensor, seq_valid: torch.Tensor, visual_idx: torch.Tensor,
                  visual_ok: torch.Tensor) -> torch.Tensor:
    """PPM scores ``[B, N]`` of the visual tokens at ``visual_idx`` of the LM input ``hidden`` [B, L, D]."""
    text_idx, text_ok = instruction_text(seq_valid, visual_idx, visual_ok)
    D = hidden.shape[-1]
    h_v = torch.gather(hidden, 1, visual_idx[..., None].expand(-1, -1, D))
    h_t = torch.gather(hidden, 1, text_idx[..., None].expand(-1, -1, D))
    return ppm(h_v, visual_ok, h_t, text_ok).float()
