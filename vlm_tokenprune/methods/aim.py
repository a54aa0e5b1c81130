"""AIM, stage B (progressive PageRank pruning inside the LLM): "AIM: Adaptive Inference of
Multi-Modal LLMs via Token Merging and Pruning" (Zhong et al., ICCV 2025), arXiv 2412.03248.

Stage A of the paper (ToMe-style merging before the LLM) is the pre-LLM merge ``aim_merge`` (``methods.aim_merge``).

Importance (official ``get_importance``, LaVi-Lab/AIM ``modeling_qwen2.py``), per row, in the
scoring layer (a stage at layer K scores with layer K-1, whose attention the official code
uses to mask tokens from layer K on):

    logits = (RoPE(q) . RoPE(k)) * scaling, causal + padding masks      [H, L, L]
    M      = softmax(logits / tau)  over each query's allowed keys        (tau = 0.1)
    pi_0   = 1/L;  pi_{t+1} = (1 - d) * pi_t M + d / L,  5 iterations     (d = 0)
    imp_j  = sqrt(mean_h pi_5[h, j]^2)                                    (RMS over heads)

read at the visual tokens; the top-k are kept. Text tokens are always kept (the engine never
prunes text; the official code protects them with importance 1.0). ``L`` counts the row's
real current tokens: padding slots are neither queries nor keys, so a batched row scores
exactly as it does alone.

Cost: PageRank needs whole attention rows (every query x every key). They are rebuilt
BLOCKWISE from the layer's own modules (``input_layernorm``, ``q_proj``, the ``k_proj``
output captured while the layer ran, RoPE, ``scaling``, GQA): q and k once (O(L * D)), then
for each of the ``iters`` iterations, blocks of query rows -> logits -> softmax -> their
contribution to ``pi``. Compute: one extra ``q_proj`` over the L rows plus
O(iters * H * L^2 * d) for the logits (recomputed each iteration instead of stored); memory
O(H * block * L), never the full ``[H, L, L]``. The official code instead reads the eager
attention logits (eager only, O(H * L^2) memory).

Schedule (``aim_schedule``): the visual keep fraction of the tokens ENTERING layer l is
``rho_l = 1`` for ``l <= l1``, ``(l2 - l) / (l2 - l1)`` for ``l1 < l < l2``, 0 for ``l >= l2``,
as a fraction of the ORIGINAL visual count; one stage per layer ``l1+1 .. l2``. The official
Qwen2 code (``retain_rate = 1 - (l - 13) * 0.125`` from scoring layer 14, applied from the
next layer, zero from layer 22 of 28) is ``aim_schedule(14, 22, 28)``. The Vicuna-7B setting
(commented in the official LLM-Viewer script: the same formula with 13, i.e. rate 0.875 at
layer 13 down to 0 at layer 20) read as that code reads ``retain_rate`` (by scoring layer) is
``aim_schedule(13, 21, 32)``, the ``aim`` preset (the paper summary's l1 = 13, l2 = 21); the
LLM-Viewer FLOPs script itself applies each rate to its own layer, one layer earlier.

Deviations from the official code, by design:

* Tokens are really dropped (the engine shortens the sequence); the official code only masks
  them as keys, so there a masked token still exists as a query row of later layers'
  PageRank matrices and keeps updating its hidden state. Here it is gone, which is what
  saves compute. ``pi_0`` is uniform over the current (kept) tokens; a constant rescaling of
  ``pi`` does not change the ranking.
* Budgets are keep fractions in (0, 1] with at least one token per row, and the kept count is
  the library's ``max(1, floor(keep * n + 0.5))`` (the official code truncates
  ``int(n * rate)``). Dropping ALL visual tokens is a separate operation that does not exist
  yet, so the schedule ends at the smallest positive count: its last stage (layer ``l2``)
  keeps 1 visual token per row instead of 0, and every later layer sees that one token.
* The official code leaves text after the question (the assistant prefix) unprotected; here
  all text is kept.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..attention import project_heads, project_keys
from ..reference_ops import rope
from ..errors import InputError, PolicyError
from ..policy import Policy, register_preset
from ..scoring import ScoringContext
from .base import Criterion, Param, register_criterion

BLOCK_ELEMENTS = 1 << 22  # logits entries per block of query rows (16 MiB in fp32)


def pagerank_importance(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    seq_valid: torch.Tensor,
    *,
    keys: torch.Tensor | None = None,
    tau: float = 0.1,
    iters: int = 5,
    damping: float = 0.0,
    block_rows: int | None = None,
) -> torch.Tensor:
    """``[B, L]`` AIM importance of every token of the current sequence at ``layer`` (fp32).

    Args:
        layer: a Llama-style decoder layer; ``hidden`` ``[B, L, D]`` enters it.
        position_embeddings: ``(cos, sin)`` ``[B or 1, L, d]`` as the layer receives them.
        seq_valid: ``[B, L]`` real tokens (False: padding / empty slots), neither queries nor keys.
        keys: optional ``[B, L, H_kv * d]`` ``k_proj`` output captured while the layer ran.
        block_rows: query rows per block (default: ``BLOCK_ELEMENTS / (B * H * L)``).

    Causality is by index: the current sequence is in original-position order.
    Invalid positions get importance 0.
    """
    attn = layer.self_attn
    d = attn.head_dim
    n_heads = attn.q_proj.out_features // d
    n_kv = attn.k_proj.out_features // d
    B, L = hidden.shape[:2]
    x = layer.input_layernorm(hidden)
    q = project_heads(attn, "q", x, n_heads, d)  # [B, H, L, d]
    k = project_keys(attn, x, keys, None, n_kv, d)  # [B, H_kv, L, d]
    if position_embeddings is None:
        raise InputError("aim", "needs the rotary position embeddings (cos, sin) the decoder layer receives")
    cos, sin = position_embeddings
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    q = q.float().view(B, n_kv, n_heads // n_kv, L, d)
    k = k.float()[:, :, None]  # GQA by broadcasting
    valid = seq_valid.bool()
    n_real = valid.sum(1).clamp(min=1).float()  # [B]
    base = valid.float() / n_real[:, None]  # [B, L]: pi_0, also the teleport vector d / L
    pi = base[:, None].expand(B, n_heads, L).clone()
    if block_rows is None:
        block_rows = max(1, BLOCK_ELEMENTS // max(1, B * n_heads * L))
    pos = torch.arange(L, device=hidden.device)
    for _ in range(iters):
        nxt = torch.zeros_like(pi)
        for s in range(0, L, block_rows):
            e = min(L, s + block_rows)
            logits = (q[:, :, :, s:e] @ k.transpose(-1, -2)) * attn.scaling  # [B, H_kv, G, r, L]
            logits = logits.reshape(B, n_heads, e - s, L)
            allowed = valid[:, None, :] & (pos[None, None, :] <= pos[s:e, None][None]) & valid[:, s:e, None]
            logits = logits.masked_fill(~allowed[:, None], float("-inf"))
            t = tau
            if tau < 1.0:  # logits / tau could overflow to inf (NaN rows, every score 0): shift first; below 1e-30
                # (0 in fp32) the fp32 softmax is already its tau -> 0 limit (argmax)
                logits = logits - logits.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).min)
                t = max(tau, 1e-30)
            m = torch.softmax(logits / t, dim=-1).nan_to_num(0.0)  # invalid query rows: all zero
            nxt += torch.einsum("bhr,bhrl->bhl", pi[:, :, s:e], m)
        pi = (1.0 - damping) * nxt + damping * base[:, None]
    return pi.pow(2).mean(dim=1).sqrt() * valid


@register_criterion
class AIMCriterion(Criterion):
    name = "aim"
    paper = "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning (stage B)"
    arxiv = "2412.03248"
    params = {
        "tau": Param(0.1, float, "softmax temperature on the attention logits", check=lambda v: 0 < v < math.inf,
                     allowed="a finite number > 0"),
        "iters": Param(5, int, "PageRank power iterations", check=lambda v: v >= 1, allowed="an integer >= 1"),
        "damping": Param(0.0, float, "PageRank damping d (official default 0)", check=lambda v: 0.0 <= v < 1.0,
                         allowed="in [0, 1)"),
    }

    def score(self, ctx: ScoringContext, tau: float, iters: int, damping: float) -> torch.Tensor:
        imp = pagerank_importance(
            ctx.layer, ctx.hidden, ctx.position_embeddings, ctx.seq_valid,
            keys=ctx.keys, tau=tau, iters=iters, damping=damping,
        )
        return torch.gather(imp, 1, ctx.visual_idx)


def aim_stages(l1: int, l2: int, num_layers: int, **params) -> list[dict]:
    """Stage dicts of the linear schedule (see the module docstring); ``params`` go to every stage."""
    for name, v in (("l1", l1), ("l2", l2), ("num_layers", num_layers)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise PolicyError(f"aim_schedule.{name}", f"must be an integer, got {v!r}")
    if num_layers < 2:
        raise PolicyError("aim_schedule.num_layers", f"must be >= 2, got {num_layers}")
    if not 0 <= l1 < l2:
        raise PolicyError("aim_schedule.l1", f"must satisfy 0 <= l1 < l2, got l1={l1}, l2={l2}")
    if l2 > num_layers - 1:
        raise PolicyError("aim_schedule.l2", f"{l2} is beyond the model; allowed: {l1 + 1}..{num_layers - 1}")
    stages = []
    for layer in range(l1 + 1, l2 + 1):
        st = {"criterion": "aim", "layer": layer, **params}
        if layer < l2:
            st["keep"] = (l2 - layer) / (l2 - l1)
        else:
            st["tokens"] = 1  # "0 visual tokens" does not exist as an op: the smallest positive count
        stages.append(st)
    return stages


def aim_schedule(l1: int, l2: int, num_layers: int, **params) -> Policy:
    """AIM's linear schedule as a Policy: all visual tokens enter layers <= ``l1``, a fraction
    ``(l2 - l) / (l2 - l1)`` of them enters layer ``l1 < l < l2``, and 1 per row enters layers
    >= ``l2`` (instead of AIM's 0). ``params``: ``tau``, ``iters``, ``damping``."""
    stages = aim_stages(l1, l2, num_layers, **params)
    return Policy.from_dict({"stages": stages})


register_preset(
    "aim", [dict(st, depth=32) for st in aim_stages(13, 21, 32)],  # mapped to the model's depth by patch()
    "PageRank importance over attention logits (tau=0.1, 5 iterations, RMS over heads), linear schedule: "
    "all visual tokens up to layer 13, 1 per row from layer 21 (Vicuna-7B, 32 layers)",
    "2412.03248",
)
