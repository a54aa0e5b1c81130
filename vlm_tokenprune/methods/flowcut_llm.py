"""FlowCut, LLM stage: "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models" (NeurIPS 2025), arXiv 2505.19536.

FlowCut prunes mostly inside the vision encoder; for LLaVA-NeXT (and Qwen2-VL) it prunes a
second time inside the LLM, at "decoder layer 1". This criterion is that LLM stage
(official code ``TungChintao/FlowCut``, ``flowcut/modeling_llama_flowcut.py``; the vision
encoder stages are not part of it). With the last prompt token as query (the official
``last_instruct_pos - 1`` is the last token of the prompt) and the visual tokens as keys:

    rel_j  = mean_h softmax_j( q_last^h . k_j^h / sqrt(d) )      post-RoPE q, k
    sem_j  = mean_h softmax_j( v_last^h . v_j^h / sqrt(d) )      values (no RoPE)
    dens_j = || mean_h v_j^h ||_1
    score_j = ( rel_j / sum rel + sem_j / sum sem ) * dens_j          keep the top budget

both softmaxes over the row's (current) visual tokens only; q/k/v are the scoring layer's
own projections of its layer-normed input (``ctx.values`` is its captured ``v_proj`` output).

Layer mapping: the official code computes the scores inside decoder layer 1 (0-based,
``prune_layer = 1``) from that layer's q/k/v and drops the visual tokens from layer 1's
OUTPUT, so layer 1 runs on every token and layers >= 2 on the kept ones. In this library's
convention (a stage at layer K drops before layer K and scores with layer K-1's modules on
layer K-1's input) that is **layer 2**: the preset ``flowcut_llm`` is ``layer=2``.

GQA: the official code's SDPA path repeats keys and values to the H query heads
(``repeat_kv``) before both softmaxes and the head mean. Every key/value head is repeated
the same number of times, so the head means over the H expanded heads equal the means over
the H_kv value heads; this criterion computes ``sem`` and ``dens`` over the H_kv heads
(no repeat) and ``rel`` over the H query heads.

Positions: ``positions=gaps`` (the default here, and the official Qwen2-VL path: kept tokens keep their
original position ids) or ``positions=repack`` (the official LLaVA-NeXT path: the layers after the stage see the
kept tokens numbered contiguously, and decoding there continues at the kept length; the ``flowcut_next`` presets
use it). Other differences from the official code: scores are computed in fp32; left-padded batches are supported
(the official path raises on left padding).

Budget default: the paper's largest LLaVA-NeXT setting keeps 640 of 2880 visual tokens
(22.22 %); as the vision-encoder stages are not applied, the preset keeps that fraction of
the visual tokens entering the LLM (``keep=0.2222``). Use ``tokens=`` for a fixed target.
"""
from __future__ import annotations

import torch

from ..reference_ops import gather_rows
from ..policy import register_preset
from ..scoring import ScoringContext
from .base import Criterion, register_criterion


def _values(ctx: ScoringContext, idx: torch.Tensor) -> torch.Tensor:
    """``[B, R, H_kv*d]`` the scoring layer's values at positions ``idx`` [B, R]."""
    if ctx.values is not None:
        return gather_rows(ctx.values, idx)
    layer = ctx.layer  # not captured (e.g. v_proj not called as a module): project just these rows
    return layer.self_attn.v_proj(layer.input_layernorm(gather_rows(ctx.hidden, idx)))


@register_criterion
class FlowCutLLMCriterion(Criterion):
    name = "flowcut_llm"
    paper = "FlowCut: Rethinking Redundancy via Information Flow for Efficient VLMs (LLM stage)"
    arxiv = "2505.19536"

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        ok = ctx.visual_ok
        attn = ctx.layer.self_attn
        d = attn.head_dim
        rel = ctx.attention("last", rope=True, softmax_over="keys").mean(dim=1)[:, 0]  # [B, N]

        B, N = ctx.visual_idx.shape
        v_vis = _values(ctx, ctx.visual_idx).float()
        v_last = _values(ctx, ctx.last_idx[:, None]).float()
        n_kv = v_vis.shape[-1] // d
        v_vis = v_vis.view(B, N, n_kv, d)
        v_last = v_last.view(B, 1, n_kv, d)
        logits = torch.einsum("bqhd,bnhd->bhn", v_last, v_vis) * d**-0.5  # [B, H_kv, N]
        logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
        sem = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1)  # [B, N]

        dens = v_vis.mean(dim=2).abs().sum(dim=-1)  # [B, N]: L1 norm of the head-averaged value
        rel = rel * ok
        sem = sem * ok
        tiny = torch.finfo(torch.float32).tiny
        score = (rel / rel.sum(-1, keepdim=True).clamp_min(tiny) + sem / sem.sum(-1, keepdim=True).clamp_min(tiny)) * dens
        return score * ok


register_preset(
    "flowcut_llm",
    [{"criterion": "flowcut_llm", "layer": 2, "keep": 0.2222}],
    "FlowCut's LLM stage: (last-token attention + value similarity) x value L1 norm, scored in decoder "
    "layer 1, dropped before layer 2; keep 22.22% (640 of 2880)",
    "2505.19536",
)
