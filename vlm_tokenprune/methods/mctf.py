"""MCTF: "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers"
(Lee, Choi and Kim, CVPR 2024), arXiv 2403.10030, in the CLIP tower of LLaVA / LLaVA-NeXT.

In each merging layer ``j`` (``layer`` .. the feature layer; DeiT default: every layer but the
first, i.e. ``layer=1``), BEFORE the layer runs, on its input tokens x (CLS protected):

1. One-step-ahead attention: the layer's own attention map on x (its ``layer_norm1``, q/k
   projections and scale, with proportional attention ``+ log size`` on the logits), in fp32;
   informativeness ``a_i`` = attention token i receives, averaged over heads and queries.
2. Tokens split alternately into A (even) and B (odd);
   ``W = W_sim^(1/tau_sim) . W_info^(1/tau_info) . W_size^(1/tau_size)`` with
   ``W_sim = (cos(x_i, x_j) + 1) / 2``, ``W_info = a~_i a~_j``, ``W_size = s~_i s~_j``, where
   ``a~ = (1/a) / max(1/a)`` and ``s~ = (1/size) / max(1/size)`` (tau = 1, 20, 40; 0 drops a term).
3. Bidirectional bipartite matching: ``r1 = r // 2`` A tokens with the best edges (each A's best B,
   first on ties; edges ranked stably, ties to the lower index) fuse into their B; then
   ``r2 = r - r1`` B tokens (as updated) fuse into their best remaining A token (same scores).
   ``bidirection=false``: r A tokens into B, order ``[unmerged A, B]``.
4. Fusion (``pooling_type = 1``): ``x = sum_i w_i x_i / sum_i w_i`` with ``w_i = a_i size_i / max size``;
   sizes add. The new order is ``[unmerged A (ascending), unmerged B (in edge rank order)]``, as the
   official code emits it (it decides the next layer's A/B split).
5. The layer then runs on the fused tokens with proportional attention (an additive ``log size``
   mask, also in every later tower layer; the tower's own attention backend runs, so a backend
   that takes only 2-D padding masks, flash-attention, is refused unless ``prop_attn=false``).

This is the official "precise" one-step-ahead mode (``one_step_ahead = 2``: the map is computed
for the informativeness, the layer recomputes attention on the fused tokens); the default mode 1
reuses the fused map instead of recomputing it, which needs a custom attention kernel.

Schedule: ``r`` tokens per layer (``r=16`` is the paper's DeiT setting), never below the budget;
or ``r=0`` (default): the budget (``keep`` / ``tokens``, patches per crop) is reached at the feature
layer with the removals spread evenly over the merging layers (front-loaded), at most half of
the tokens (CLS excluded) per layer; an unreachable budget is refused at ``patch()``. The count
per layer is the same for every crop (no mask needed). The preset ``mctf`` keeps 128 of 576.
InternVL (pixel-shuffle groups, ``vision.groups``; ``_fuse_groups``): the units are CLS and whole groups (the 4
patches one LLM token packs); a group's informativeness is the SUM of its patches', its feature their
concatenation, its size the original groups it holds; ``r`` and the budget count groups; fusion averages the
member groups patch by patch; every patch token of a group carries its size in the proportional attention.
The official DeiT guard "keep at least 10 tokens" is not applied (budgets here are explicit). Each
fused token reaches the LLM at its destination patch's placeholder and stands for its group
(``last_trace().stages[0].sources``); on LLaVA-NeXT a group whose destination lies in the unpadded
border of an anyres grid leaves with it.
"""
from __future__ import annotations

import math

import torch

from ..compat import mask_format_for
from ..errors import IncompatiblePolicyError
from ..policy import register_preset
from ..vision.base import VisionCriterion, tower_attention, tower_groups, tower_qk
from .base import Param, register_criterion


def fewest_patches(n_tokens: int, n_layers: int) -> int:
    """Patches left after fusing the most MCTF allows (half of the non-CLS tokens) in ``n_layers`` layers."""
    c = n_tokens - 1
    for _ in range(n_layers):
        c -= c // 2
    return c


def mctf_schedule(n_tokens: int, keep_patches: int, layers: list[int], r: int) -> dict[int, int]:
    """Tokens fused in each merging layer: ``r`` per layer, or (``r=0``) the budget's removals spread
    evenly (front-loaded where a later layer's half-cap needs it); at most half of the non-CLS tokens
    per layer, never below ``keep_patches + 1`` tokens."""
    T, target, out = n_tokens, keep_patches + 1, {}
    for i, j in enumerate(layers):
        need, cap, left = max(T - target, 0), (T - 1) // 2, len(layers) - i - 1
        step = r if r > 0 else math.ceil(need / (left + 1))
        if r == 0:
            while step < cap and T - step - fewest_patches(T - step, left) - 1 < need - step:
                step += 1
        out[j] = min(step, need, cap)
        T -= out[j]
    return out


def _power(w: torch.Tensor, tau: float) -> torch.Tensor:
    return w ** (1.0 / tau)


@register_criterion
class MCTF(VisionCriterion):
    name = "mctf"
    paper = "MCTF: multi-criteria (similarity, informativeness, size) token fusion with one-step-ahead attention"
    arxiv = "2403.10030"
    op = "merge"
    takes_layer = True
    default_layer = 1
    whole_groups = True  # pixel-shuffle towers (InternVL): groups fuse into groups (``_fuse_groups``)
    params = {
        "r": Param(0, int, "tokens fused per layer (0: spread to reach the budget at the feature layer)",
                   check=lambda v: v >= 0, allowed="an integer >= 0"),
        "tau_sim": Param(1.0, float, "temperature of the similarity term (0: off)", check=lambda v: v >= 0, allowed=">= 0"),
        "tau_info": Param(20.0, float, "temperature of the informativeness term (0: off)", check=lambda v: v >= 0,
                          allowed=">= 0"),
        "tau_size": Param(40.0, float, "temperature of the size term (0: off)", check=lambda v: v >= 0, allowed=">= 0"),
        "bidirection": Param(True, bool, "A->B then B->A matching (r/2 each way)"),
        "prop_attn": Param(True, bool, "proportional attention: + log size on the tower's attention logits"),
    }

    # -- patch time ------------------------------------------------------------------------------
    def check_vision(self, seams, stage, where: str) -> None:
        p = stage.params
        if p["prop_attn"] and mask_format_for(seams.attn_implementation) == "2d":
            raise IncompatiblePolicyError(
                f"{where}.prop_attn", f"proportional attention adds log(size) to the tower's attention logits, which "
                f"the {seams.attn_implementation!r} backend (2-D padding masks) cannot take; allowed: prop_attn=false, "
                "or an eager / sdpa vision tower")
        start = stage.layer
        units = seams.n_tokens if hasattr(seams, "n_tokens") else seams.n_patches  # patches, or groups (InternVL)
        keep = stage.budget.count(units)
        left = fewest_patches(units + 1, seams.feature_layer + 1 - start)
        if p["r"] == 0 and left > keep:
            field = "tokens" if stage.budget.tokens is not None else "keep"
            what = "patches" if units == seams.n_patches else "LLM tokens (pixel-shuffle groups)"
            raise IncompatiblePolicyError(
                f"{where}.{field}", f"MCTF fuses at most half of the tokens per layer: layers {start}..{seams.feature_layer} "
                f"reach {left} of {units} {what} at best; allowed: a budget of at least {left} {what} "
                "(or an earlier layer)")

    def uses_bias(self, stage) -> bool:
        return bool(stage.params["prop_attn"])

    # -- per tower call --------------------------------------------------------------------------
    def before_layer(self, run, j: int, layer, hidden: torch.Tensor, seams) -> torch.Tensor:
        p = run.params
        sched = run.scratch.get("schedule")
        groups = tower_groups(seams)
        if sched is None:
            layers = list(range(run.stage.layer, seams.feature_layer + 1))
            units = run.owner.shape[1] if groups is None else groups.shape[0] + 1  # CLS + patches / groups
            sched = run.scratch["schedule"] = mctf_schedule(units, run.keep_patches, layers, p["r"])
        r = sched.get(j, 0)
        if r == 0:
            return hidden
        if groups is not None:
            return self._fuse_groups(run, j, hidden, seams, r, groups)
        x = hidden.float()
        n, T, D = x.shape
        size = run.size.float()
        a = self._informativeness(seams, j, hidden, size if p["prop_attn"] else None)  # [n, T]
        metric = x / x.norm(dim=-1, keepdim=True)
        W = _weights(metric, a, size, p)
        to, stays = _match(W, r, p["bidirection"], T)
        # fusion: attention- and size-weighted average (pooling_type 1); sizes add
        w = a * size / size.amax(1, keepdim=True)
        Tn = T - r
        num = torch.zeros(n, Tn, D, device=x.device).scatter_add_(1, to[..., None].expand(-1, -1, D), x * w[..., None])
        den = torch.zeros(n, Tn, device=x.device).scatter_add_(1, to, w)
        new_size = torch.zeros(n, Tn, device=x.device).scatter_add_(1, to, size)
        # each new slot's identity: the token that stayed unmerged there (the destination of its group)
        ident = torch.zeros(n, Tn, dtype=torch.long, device=x.device)
        ident.scatter_(1, torch.gather(to, 1, stays), torch.gather(run.ident.to(x.device), 1, stays))
        run.reassign(to, ident, new_size)
        if p["prop_attn"]:
            run.bias = new_size.log()[:, None, None, :].expand(n, 1, Tn, Tn)
        return (num / den[..., None]).to(hidden.dtype)

    def _fuse_groups(self, run, j: int, hidden: torch.Tensor, seams, r: int, groups: torch.Tensor) -> torch.Tensor:
        """InternVL: MCTF over whole pixel-shuffle groups. The units are CLS and the current groups (a fused group
        is its destination's), in MCTF's order (the raster order of groups before the first fusion); A / B alternate
        over ``[CLS, units...]`` as over tokens. A group's informativeness is the SUM of its patches' received
        attention, its feature the concatenation of its patches' (cosine on that), its size the original groups it
        holds; ``r`` counts groups; fusion is the weighted average of the member groups patch by patch; each patch
        token of a group carries the group's size (proportional attention ``+ log size``)."""
        p = run.params
        n, T, D = hidden.shape
        G, g = groups.shape
        dev = hidden.device
        grp = groups.to(dev)
        units = run.scratch.get("units")
        if units is None:
            units = torch.arange(G, device=dev).expand(n, G)
        U = units.shape[1]
        pos_of = torch.full((n, run.owner.shape[1]), -1, dtype=torch.long, device=dev)
        pos_of.scatter_(1, run.ident.to(dev), torch.arange(T, device=dev).expand(n, T))
        tok = torch.gather(pos_of, 1, 1 + grp[units].reshape(n, U * g)).view(n, U, g)  # each unit's patch tokens
        if bool((tok < 0).any()):
            raise RuntimeError("mctf: a current group is missing patch tokens")
        size_tok = run.size.float().to(dev)
        a_tok = self._informativeness(seams, j, hidden, size_tok if p["prop_attn"] else None)  # [n, T]
        flat = tok.view(n, U * g)
        a = torch.cat([a_tok[:, :1], torch.gather(a_tok, 1, flat).view(n, U, g).sum(-1)], dim=1)  # [n, 1 + U]
        size = torch.cat([size_tok[:, :1], torch.gather(size_tok, 1, tok[..., 0])], dim=1)
        x = torch.gather(hidden.float(), 1, flat[..., None].expand(-1, -1, D)).view(n, U, g * D)
        metric = x / x.norm(dim=-1, keepdim=True)
        metric = torch.cat([torch.zeros(n, 1, g * D, device=dev), metric], dim=1)  # CLS: its row is never used
        to_u, stays_u = _match(_weights(metric, a, size, p), r, p["bidirection"], U + 1)
        Un = U + 1 - r  # CLS stays at slot 0 (A unit 0, never fused)
        w = a * size / size.amax(1, keepdim=True)
        cls = torch.nn.functional.pad(hidden[:, :1].float(), (0, (g - 1) * D))  # CLS in the first D of its row
        xs = torch.cat([cls, x], dim=1)
        num = torch.zeros(n, Un, g * D, device=dev).scatter_add_(1, to_u[..., None].expand(-1, -1, g * D),
                                                                  xs * w[..., None])
        den = torch.zeros(n, Un, device=dev).scatter_add_(1, to_u, w)
        new_size = torch.zeros(n, Un, device=dev).scatter_add_(1, to_u, size)
        stay_group = torch.gather(units, 1, (stays_u[:, 1:] - 1).clamp(min=0))  # [n, Un - 1]: the groups that stay
        new_units = torch.zeros(n, Un - 1, dtype=torch.long, device=dev)
        new_units.scatter_(1, torch.gather(to_u, 1, stays_u[:, 1:]) - 1, stay_group)
        run.scratch["units"] = new_units
        # token level: member m of unit u -> member m of the unit it ends in; CLS -> 0
        member = torch.arange(g, device=dev)
        to = torch.full((n, T), -1, dtype=torch.long, device=dev)
        to[:, 0] = 0
        to.scatter_(1, flat, (1 + (to_u[:, 1:, None] - 1) * g + member).view(n, U * g))
        ident = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=dev),
                           (1 + grp[new_units]).view(n, (Un - 1) * g)], dim=1)
        size_new = torch.cat([new_size[:, :1], new_size[:, 1:].repeat_interleave(g, dim=1)], dim=1)
        run.reassign(to, ident, size_new)
        if p["prop_attn"]:
            Tn = size_new.shape[1]
            run.bias = size_new.log()[:, None, None, :].expand(n, 1, Tn, Tn)
        out = (num / den[..., None]).view(n, Un, g, D)
        return torch.cat([out[:, 0, :1], out[:, 1:].reshape(n, (Un - 1) * g, D)], dim=1).to(hidden.dtype)

    @staticmethod
    def _informativeness(seams, j: int, hidden: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        """Attention each token receives in layer ``j`` (heads and queries averaged), fp32, from its own modules."""
        attn = tower_attention(seams, j)
        n, T, D = hidden.shape
        H = attn.num_heads
        q, k = tower_qk(seams, j, hidden)
        q = q.float().view(n, T, H, D // H).transpose(1, 2)
        k = k.float().view(n, T, H, D // H).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :]
        return torch.softmax(logits, dim=-1).mean(dim=(1, 2))




def _weights(metric: torch.Tensor, a: torch.Tensor, size: torch.Tensor, p: dict) -> torch.Tensor:
    """``W`` ``[n, A, B]`` over units alternately split (A even, B odd) from their L2-normalised features,
    informativeness and sizes ``[n, T]``; CLS (unit 0, in A) never fuses."""
    n, T = a.shape
    W = torch.ones(n, (T + 1) // 2, T // 2, dtype=torch.float32, device=a.device)
    if p["tau_sim"]:
        W = W * _power((metric[:, ::2] @ metric[:, 1::2].transpose(1, 2) + 1) / 2, p["tau_sim"])
    if p["tau_info"]:
        inv = 1 / a
        inv = inv / inv.amax(1, keepdim=True)
        W = W * _power(inv[:, ::2, None] * inv[:, None, 1::2], p["tau_info"])
    if p["tau_size"]:
        inv = 1 / size
        inv = inv / inv.amax(1, keepdim=True)
        W = W * _power(inv[:, ::2, None] * inv[:, None, 1::2], p["tau_size"])
    W[:, 0, :] = -math.inf  # CLS (token 0, in A) is never fused
    return W


def _match(W: torch.Tensor, r: int, bidirection: bool, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to [n, T], stays [n, T - r])``: new slot of every current token; the tokens left unmerged, by slot."""
    n, tA, tB = W.shape
    dev = W.device
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    node_idx = W.argmax(-1)  # [n, tA], first maximum on ties
    node_max = torch.gather(W, 2, node_idx[..., None])[..., 0]
    edge = torch.sort(node_max, dim=1, descending=True, stable=True).indices
    src, unm = edge[:, :r1], edge[:, r1:].sort(dim=1).values
    dst = torch.gather(node_idx, 1, src)
    A = lambda i: 2 * i  # noqa: E731  (token index of A token i)
    Bt = lambda j: 2 * j + 1  # noqa: E731
    to = torch.full((n, T), -1, dtype=torch.long, device=dev)
    nu = unm.shape[1]
    ar = lambda m: torch.arange(m, device=dev).expand(n, m)  # noqa: E731
    to.scatter_(1, A(unm), ar(nu))
    if bidirection:
        new = torch.gather(W, 1, unm[..., None].expand(-1, -1, tB)).transpose(1, 2)  # [n, tB, nu]
        node_idx2 = new.argmax(-1)
        node_max2 = torch.gather(new, 2, node_idx2[..., None])[..., 0]
        edge2 = torch.sort(node_max2, dim=1, descending=True, stable=True).indices
        src2, unm2 = edge2[:, :r2], edge2[:, r2:]
        to.scatter_(1, Bt(unm2), nu + ar(tB - r2))
        to.scatter_(1, Bt(src2), torch.gather(node_idx2, 1, src2))  # into the unmerged A token's slot
        stays = torch.cat([A(unm), Bt(unm2)], dim=1)
    else:
        to.scatter_(1, Bt(ar(tB)), nu + ar(tB))
        stays = torch.cat([A(unm), Bt(ar(tB))], dim=1)
    # A tokens fused into a B token go wherever that B token goes (bidirectional: maybe on into an A)
    to.scatter_(1, A(src), torch.gather(to, 1, Bt(dst)))
    return to, stays


register_preset("mctf", [{"criterion": "mctf", "site": "vision", "layer": 1, "keep": 128 / 576}],
                "MCTF in the CLIP tower: bidirectional sim x info x size fusion with one-step-ahead attention from "
                "layer 1 to the feature layer, to 128 of 576 patches (r=16: the paper's per-layer count)", "2403.10030")
