"""FlowCut's vision-encoder stage on Qwen2-VL's packed ViT, as the authors' Qwen2-VL code does it (arXiv 2505.19536,
``FlowCut_Qwen``): a CLS-free rule that drops single patches inside the tower.

Qwen2-VL encodes every image of a batch as one packed sequence (``cu_seqlens``: one segment per image, 2-D rotary
tables per patch), and its merger packs each run of 4 CONSECUTIVE rows into one LLM token. ``T`` (the stage's
budget, in LLM tokens per image) makes an image's target ``4 T`` patches. After every block ``idx`` of ``L``,
while an image holds more than its target, from that block's own q / k / v (the ``attn.qkv`` output, rotary on
q and k; scores in fp32):

    g_h  = mean_i q_h,i                                   the image's mean query, per head
    a_j  = mean_h softmax_j'(g_h . k_h,j' / sqrt(d))[j]    over the image's current patches
    S_j  = a_j * || mean_h v_h,j ||_1 ;   S_cum = 0.5 S_cum + 0.5 S   (S after the first block)

After a block with even ``rpl = L - idx - 1`` the image keeps ``max(N - P, 4 T)`` patches, the top ``S_cum`` in
their order (ties to the lower index), ``P = round((N - 4 T) / sqrt(rpl) * (1 - r^2))`` with ``r`` the entropy of
``a`` over ``log N`` (``log(a + 1e-7)``, as the official code) and ``P = N`` after the last block (``rpl = 0``):
exactly ``4 T``. The later blocks run on the kept patches only (their ``cu_seqlens`` and rotary rows follow), and
the model's own merger packs each run of 4 consecutive KEPT patches, whatever windows they came from, as the
official code does. The image's ``T`` tokens then take the places and M-RoPE positions of its FIRST ``T``
placeholders (the official code inserts the merged tokens at the image's first placeholder positions), the other
placeholders are dropped before the language model (``positions=gaps``; ``hooks.lm_prefill``). The official code
takes one image (batch size 1); here every image of the batch is its own segment with its own count. An image of
at most ``4 T`` patches is left whole.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..marking import mark_hook
from .packed import PackedOutcome

if TYPE_CHECKING:
    from ..adapters.base import VisionSeams
    from ..handle import PatchHandle


@dataclass
class FlowRun:
    """One tower call. Per image: its patch count, target, kept patch indices (ascending, within the image) and
    cumulative scores; the tower's full rotary tables and the current block's ``qkv`` output."""

    stage_index: int
    group: int
    sizes: list[int]
    targets: list[int]
    kept: list[torch.Tensor]
    cum: list
    n_blocks: int
    full_pe: tuple | None = None  # the tower's (cos, sin) of every patch, as its first block receives them
    cu: torch.Tensor | None = None  # the tower's cu_seqlens, then the kept patches' (set at each pruning)
    pe: tuple | None = None  # the kept patches' (cos, sin) (set at each pruning)
    max_len: int = 0
    pruned: bool = False
    qkv: torch.Tensor | None = None
    tokens_per_layer: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def kept_changed(self) -> None:
        """After a pruning: the kept patches' rotary rows and segment bounds, for every later block."""
        starts = [0]
        for n in self.sizes[:-1]:
            starts.append(starts[-1] + n)
        rows = torch.cat([k.to(self.full_pe[0].device) + s for k, s in zip(self.kept, starts)])
        self.pe = tuple(t[rows] for t in self.full_pe)
        lengths = torch.tensor([len(k) for k in self.kept], dtype=self.cu.dtype, device=self.cu.device)
        self.cu = torch.cat([self.cu.new_zeros(1), lengths.cumsum(0).to(self.cu.dtype)])
        self.max_len = int(lengths.max())
        self.pruned = True


def install(handle: "PatchHandle", vs: "VisionSeams", i: int) -> None:
    """The tower, block and ``qkv`` hooks of vision stage ``i`` (FlowCut on a packed tower)."""
    tower, blocks = vs.tower, vs.layers
    handle.add_hook(f"{type(tower).__name__}: forward pre-hook (open vision stage {i}: FlowCut's targets per image)",
                    tower.register_forward_pre_hook(mark_hook(functools.partial(_tower_pre, handle, i, vs)),
                                                    with_kwargs=True))
    for idx, blk in enumerate(blocks):
        handle.add_hook(f"vision block {idx}: forward pre-hook (vision stage {i}: the kept patches' cu_seqlens and "
                        "rotary rows)",
                        blk.register_forward_pre_hook(mark_hook(functools.partial(_block_pre, handle)),
                                                      with_kwargs=True))
        handle.add_hook(f"vision block {idx}: attn.qkv forward hook (vision stage {i}: its q / k / v)",
                        blk.attn.qkv.register_forward_hook(mark_hook(functools.partial(_qkv_post, handle))))
        handle.add_hook(f"vision block {idx}: forward hook (vision stage {i}: FlowCut scores, prunes after blocks "
                        "with an even number of blocks left)",
                        blk.register_forward_hook(mark_hook(functools.partial(_block_post, handle, vs, idx))))
    handle.add_hook(f"{type(tower).__name__}: forward hook (vision stage {i}: each image's merged tokens in its first "
                    "placeholders' slots)",
                    tower.register_forward_hook(mark_hook(functools.partial(_tower_post, handle))))


def _tower_pre(handle: "PatchHandle", i: int, vs: "VisionSeams", module, args: tuple, kwargs: dict):
    grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
    stage = handle.policy.stages[i]
    g = vs.packed.group
    sizes = [int(t * h * w) for t, h, w in grid.tolist()]
    targets = [g * min(n // g, stage.budget.count(n // g)) for n in sizes]
    dev = args[0].device if args else grid.device
    handle.vision_run = FlowRun(i, g, sizes, targets, [torch.arange(n, device=dev) for n in sizes],
                                [None] * len(sizes), len(vs.layers))
    handle.vision_outcome = None
    return None


def _block_pre(handle: "PatchHandle", module, args: tuple, kwargs: dict):
    run = handle.vision_run
    if not isinstance(run, FlowRun):
        return None
    if run.full_pe is None:
        run.full_pe = run.pe = kwargs.get("position_embeddings")
        run.cu = kwargs["cu_seqlens"]
    if not run.pruned:
        return None
    kwargs = dict(kwargs, cu_seqlens=run.cu, position_embeddings=run.pe)
    if kwargs.get("max_seqlen") is not None:
        m = kwargs["max_seqlen"]
        kwargs["max_seqlen"] = torch.as_tensor(run.max_len, device=m.device) if isinstance(m, torch.Tensor) else run.max_len
    return args, kwargs


def _qkv_post(handle: "PatchHandle", module, args, output):
    run = handle.vision_run
    if isinstance(run, FlowRun):
        run.qkv = output.detach()
    return None


def adaptive_drop(a: torch.Tensor, rpl: int, target: int) -> int:
    """``P``: patches to drop after a block with ``rpl`` pruning blocks left (the official Qwen rule)."""
    N = a.shape[-1]
    ratio = -(a * torch.log(a + 1e-7)).sum() / math.log(N)
    return int(torch.round((N - target) / math.sqrt(rpl) * (1 - ratio ** 2)))


def _block_post(handle: "PatchHandle", vs: "VisionSeams", idx: int, module, args, output):
    run = handle.vision_run
    if not isinstance(run, FlowRun):
        return None
    t0 = time.perf_counter()
    attn = module.attn
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision")
    H = attn.num_heads
    rpl = run.n_blocks - idx - 1
    keep_rows, start, pruned = [], 0, False
    with torch.no_grad():
        for j, kept in enumerate(run.kept):
            n = len(kept)
            rows = torch.arange(start, start + n, device=output.device)
            start += n
            if n <= run.targets[j]:
                keep_rows.append(rows)
                continue
            qkv = run.qkv[rows.to(run.qkv.device)].float().view(n, 3, H, -1)
            cos, sin = (t[rows.to(t.device)].float() for t in run.pe)
            q, k = rope(qkv[:, 0], qkv[:, 1], cos, sin)
            v = qkv[:, 2]
            a = torch.softmax(torch.einsum("hd,nhd->hn", q.float().mean(0), k.float()) * attn.scaling, dim=-1).mean(0)
            score = a * v.mean(1).abs().sum(-1)
            run.cum[j] = score if run.cum[j] is None else 0.5 * run.cum[j] + 0.5 * score
            if rpl % 2:
                keep_rows.append(rows)
                continue
            count = max(n - (adaptive_drop(a, rpl, run.targets[j]) if rpl else n), run.targets[j])
            top = torch.sort(run.cum[j], descending=True, stable=True).indices[:count].sort().values
            run.cum[j] = run.cum[j][top]
            run.kept[j] = kept[top.to(kept.device)]
            keep_rows.append(rows[top.to(rows.device)])
            pruned = pruned or count < n
    if pruned:
        run.kept_changed()
    run.tokens_per_layer.append(sum(len(k) for k in run.kept))
    run.seconds += time.perf_counter() - t0
    return output[torch.cat(keep_rows)] if pruned else None


def _tower_post(handle: "PatchHandle", module, args, output):
    run, handle.vision_run = handle.vision_run, None
    if not isinstance(run, FlowRun):
        return None
    g = run.group
    G = [n // g for n in run.sizes]
    K = [len(k) // g for k in run.kept]
    pooled = output.pooler_output
    if pooled.shape[0] != sum(K):
        raise RuntimeError(f"flowcut_vit: the merger gave {pooled.shape[0]} tokens for {sum(K)} kept groups")
    wide = pooled.new_zeros(sum(G), pooled.shape[-1])
    src = dst = 0
    for n_all, n_kept in zip(G, K):
        wide[dst:dst + n_kept] = pooled[src:src + n_kept]
        src, dst = src + n_kept, dst + n_all
    output.pooler_output = wide
    n, W, Kmax = len(G), max(G, default=0), max(K, default=0)
    owner = torch.full((n, 1 + W), -1, dtype=torch.long)
    ident = torch.zeros(n, 1 + Kmax, dtype=torch.long)
    owner[:, 0] = 0
    for c, kc in enumerate(K):
        owner[c, 1:1 + kc] = torch.arange(1, 1 + kc)
        ident[c, 1:1 + kc] = torch.arange(1, 1 + kc)
    slots = torch.cat([torch.stack([torch.full((Gc,), c), torch.arange(Gc)], dim=1) for c, Gc in enumerate(G)]) \
        if n else torch.zeros(0, 2, dtype=torch.long)
    out = PackedOutcome(run.stage_index, ident, owner, 1, run.tokens_per_layer, run.seconds, slots=slots,
                        dropped=any(k < a for k, a in zip(K, G)))
    out.produced(wide)
    handle.vision_outcome = out
    return output
