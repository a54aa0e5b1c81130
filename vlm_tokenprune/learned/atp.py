"""ATP-LLaVA's Adaptive Token Pruning (ATP) module: "ATP-LLaVA: Adaptive Token Pruning for Large
Vision Language Models" (Ye et al., CVPR 2025), arXiv 2412.00447.

An ATP module sits between two decoder layers (before layer K, reading layer K-1). For each
instance it scores every visual token from two views and learns two thresholds:

* redundancy score (paper: self-modal + cross-modal importance, averaged). In layer K-1,
  heads averaged, RoPE on, softmax over the whole causal row (the model's own attention):
  ``S_self[j]`` = mean over the visual query tokens of the attention visual token j receives,
  ``S_cross[j]`` = mean over the instruction-text query tokens (the real non-visual tokens after
  the row's first visual token) of the attention j receives. Each is min-max normalised to
  [0, 1] over the row's visual tokens (a constant row gives 0), so that one sigmoid threshold
  in (0, 1) can reach every token whatever the sequence length; ``S_red = (S_self + S_cross) / 2``;
* spatial score (Spatial Augmented Pruning, SAP): the patch grid is sampled uniformly at
  several rates, every ``s``-th row and column for each stride ``s`` in ``strides``
  (default 2, 3, 4, 6; anchored at each grid's first present row / column); a token's score is
  ``1 - lambda * R_s`` with ``R_s = 1 / s`` the sparsest sampling rate (largest stride) whose grid
  contains it, ``lambda = 1``; tokens on no grid, ``image_newline`` and CLS tokens score 0.
  Thresholding the spatial score therefore keeps one uniform grid whose density the module
  chooses per instance (``theta_s`` in (0.833, 1): none; (0.75, 0.833]: stride 6; ...);
* thresholds: a small head turns pooled statistics of the instance into
  ``(theta_r, theta_s) = sigmoid(W2 GELU(W1 f + b1) + b2)``. ``f`` = [mean and (population) std of
  ``S_self`` and ``S_cross`` over the visual tokens, the mean of the layer-normalised (no affine)
  hidden states entering layer K-1 over the visual tokens, the same over the instruction tokens];
* masks: ``margin = tau * max(S_red - theta_r, S_sp - theta_s)``. Training: the soft mask
  ``M = sigmoid(margin) = max(sigmoid(tau (S_red - theta_r)), sigmoid(tau (S_sp - theta_s)))``;
  inference: the hard mask ``margin > 0`` (``S_red > theta_r`` OR ``S_sp > theta_s``); kept tokens
  keep their original positions. A row whose hard mask is empty keeps its highest-margin token.

Choices where the material we could read is silent (also in README): the min-max normalisation,
the exact pooled features, the head's width (``head_hidden``, 32), ``tau`` (60: sharp enough that
the soft mask trains close to the hard one; the hard mask does not depend on it), the strides and
``lambda = 1`` (rate per axis), and the one-token floor.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PolicyError
from ..selection import stride_grid  # the same per-grid anchoring as FEATHER's uniform grid

KIND = "atp"
N_SCORE_STATS = 4  # mean / std of S_self and S_cross
LN_EPS = 1e-5


def minmax(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``x`` [B, N] rescaled to [0, 1] over each row's ``ok`` entries (constant row -> 0; invalid -> 0)."""
    big = torch.finfo(x.dtype).max
    lo = x.masked_fill(~ok, big).amin(1, keepdim=True)
    hi = x.masked_fill(~ok, -big).amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    return out.masked_fill(~ok, 0.0)


def spatial_scores(row: torch.Tensor, col: torch.Tensor, segment: torch.Tensor, is_newline: torch.Tensor,
                   ok: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """SAP score ``[B, N]``: ``1 - 1/s`` for the largest stride ``s`` whose uniform grid holds the token, else 0."""
    view = SimpleNamespace(visual_ok=ok, row=row, col=col, segment=segment, is_newline=is_newline)
    out = torch.zeros(ok.shape, dtype=torch.float32, device=ok.device)
    for s in sorted(strides):
        out = torch.where(stride_grid(view, s), torch.full_like(out, 1.0 - 1.0 / s), out)
    return out


def pooled(hidden: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Mean over ``ok`` positions ``idx`` [B, T] of the layer-normalised (no affine) ``hidden`` [B, L, D] -> [B, D]."""
    D = hidden.shape[-1]
    h = torch.gather(hidden, 1, idx[..., None].expand(-1, -1, D)).float()
    h = F.layer_norm(h, (D,), eps=LN_EPS) * ok[..., None]
    return h.sum(1) / ok.sum(1, keepdim=True).clamp(min=1)


def _mean_std(x: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = ok.sum(1).clamp(min=1)
    mean = (x * ok).sum(1) / n
    var = (((x - mean[:, None]) ** 2) * ok).sum(1) / n
    return mean, var.sqrt()


@dataclass
class ATPOutput:
    """Everything one ATP module computes for a batch (``[B, N]`` unless noted)."""

    s_self: torch.Tensor  # normalised self-modal importance
    s_cross: torch.Tensor  # normalised cross-modal importance
    s_red: torch.Tensor  # (s_self + s_cross) / 2
    s_sp: torch.Tensor  # SAP spatial score
    theta_r: torch.Tensor  # [B]
    theta_s: torch.Tensor  # [B]
    margin: torch.Tensor  # tau * max(s_red - theta_r, s_sp - theta_s); 0 at invalid tokens
    soft: torch.Tensor  # sigmoid(margin) (training mask); 0 at invalid tokens
    hard: torch.Tensor  # bool: margin > 0, at least one valid token per row that has one


class ATPModule(nn.Module):
    """One ATP module: ``forward(raw_self, raw_cross, s_sp, pooled_vis, pooled_txt, ok) -> ATPOutput``.

    ``raw_self`` / ``raw_cross`` [B, N]: head-averaged attention the visual tokens receive from the
    visual / instruction queries; ``s_sp`` [B, N] the SAP score; ``pooled_*`` [B, D]; ``ok`` [B, N].
    """

    def __init__(self, hidden_size: int, head_hidden: int = 32, tau: float = 60.0,
                 strides: tuple[int, ...] = (2, 3, 4, 6), layer: int = 1):
        super().__init__()
        self.hidden_size, self.head_hidden, self.tau = int(hidden_size), int(head_hidden), float(tau)
        self.strides, self.layer = tuple(int(s) for s in strides), int(layer)
        self.fc1 = nn.Linear(N_SCORE_STATS + 2 * self.hidden_size, self.head_hidden)
        self.fc2 = nn.Linear(self.head_hidden, 2)

    def hparams(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "head_hidden": self.head_hidden, "tau": self.tau,
                "strides": list(self.strides), "layer": self.layer}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], hparams: Mapping[str, Any], where: str = "weights") -> "ATPModule":
        try:
            mod = cls(hparams["hidden_size"], hparams["head_hidden"], hparams["tau"], tuple(hparams["strides"]),
                      hparams["layer"])
            mod.load_state_dict(dict(tensors))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise PolicyError(where, f"not a valid ATP weight file ({type(e).__name__}: {e})") from None
        return mod.eval()

    def thresholds(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats`` [B, 4 + 2D] -> ``(theta_r [B], theta_s [B])`` in (0, 1)."""
        t = torch.sigmoid(self.fc2(F.gelu(self.fc1(feats))))
        return t[:, 0], t[:, 1]

    def forward(self, raw_self: torch.Tensor, raw_cross: torch.Tensor, s_sp: torch.Tensor,
                pooled_vis: torch.Tensor, pooled_txt: torch.Tensor, ok: torch.Tensor) -> ATPOutput:
        s_self, s_cross = minmax(raw_self.float(), ok), minmax(raw_cross.float(), ok)
        s_red = (s_self + s_cross) / 2
        m_s, sd_s = _mean_std(s_self, ok)
        m_c, sd_c = _mean_std(s_cross, ok)
        feats = torch.cat([torch.stack([m_s, m_c, sd_s, sd_c], 1), pooled_vis.float(), pooled_txt.float()], 1)
        theta_r, theta_s = self.thresholds(feats)
        margin = self.tau * torch.maximum(s_red - theta_r[:, None], s_sp.float() - theta_s[:, None])
        margin = margin.masked_fill(~ok, 0.0)
        hard = (margin > 0) & ok
        empty = ~hard.any(1) & ok.any(1)
        if bool(empty.any()):  # the one-token floor: the best token of a row with none above threshold
            best = margin.masked_fill(~ok, float("-inf")).argmax(1)
            hard = hard | (F.one_hot(best, ok.shape[1]).bool() & empty[:, None])
        soft = torch.sigmoid(margin).masked_fill(~ok, 0.0)
        return ATPOutput(s_self, s_cross, s_red, s_sp, theta_r, theta_s, margin, soft, hard)


def atp_from_context(module: ATPModule, ctx: Any) -> ATPOutput:
    """Run ``module`` on a ``ScoringContext`` (the scoring layer ``K-1``'s input, visual and text positions)."""
    ok = ctx.visual_ok
    raw_self = ctx.attention_scores(ctx.visual_idx, query_ok=ok, rope=True, softmax_over="row", reduce="mean")
    if ctx.text_idx is not None and ctx.text_idx.shape[1] > 0:
        raw_cross = ctx.attention_scores("text", rope=True, softmax_over="row", reduce="mean")
        txt = pooled(ctx.hidden, ctx.text_idx, ctx.text_ok)
    else:
        raw_cross = torch.zeros_like(raw_self)
        txt = torch.zeros(ok.shape[0], ctx.hidden.shape[-1], device=ok.device)
    s_sp = spatial_scores(ctx.row, ctx.col, ctx.segment, ctx.is_newline, ok, module.strides)
    return module(raw_self, raw_cross, s_sp, pooled(ctx.hidden, ctx.visual_idx, ok), txt, ok)
