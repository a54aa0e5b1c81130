"""Hugging Face ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration`` (Qwen3-VL).

Visual tokens, grids and 3-D positions are those of Qwen2-VL (``qwen2_vl.Qwen2VLAdapter``: image and
video placeholders, ``image_grid_thw`` / ``video_grid_thw`` after the 2x2 merge; Qwen3-VL's
processor puts a timestamp between video frames, which changes nothing for the layout: a video's
placeholders still fill in frame-major raster order). Interleaved M-RoPE is the model's own
``rotary_emb``: the engine gathers each layer's incoming ``(cos, sin)`` at the kept tokens, so kept
tokens keep their original positions, and decoding continues at the model's next position
(``rope_deltas``: the cache length at layer 0, which is never pruned, or the pre-LLM record's
``next_pos``).

DeepStack (arXiv 2406.04334): the vision tower's intermediate features are ADDED to the hidden
states at the visual positions after decoder layers ``0 .. n - 1`` (``n = len(deepstack_visual_indexes)``,
3 in the released models), through ``language_model._deepstack_process(hidden, visual_pos_masks,
embeds)``. Defined here: a token that has left the sequence receives nothing; a kept visual token
receives its own injected features, whatever stage removed the others; a token a pre-LLM merge fused
receives the mean of its sources' features (the same assignment as its hidden state, averaged uniformly
over the original tokens it stands for). Implemented by
- a forward pre-hook on the language model (after the pre-LLM stage's): from the reduction's source map
  (``PreLLMRecord.owner``) it builds ``visual_pos_masks`` over the reduced sequence and, per
  ``deepstack_visual_embeds[i]``, one row per visual slot (``fuse_visual``; a prune keeps rows as they are);
- an instance-level wrapper of ``_deepstack_process`` (undone by ``unpatch()``): when an LLM-site
  stage below the last injection has shortened the sequence, the mask and features are taken at
  the current tokens (``take_visual``). Stages at or above layer ``n`` need nothing.
Structural ops (``structural.plan``; == the masked oracle, tests/test_structural_qwen3_vl.py). Each decoder
layer's ops act inside the layer (Qwen3's per-head ``q_norm`` / ``k_norm`` see the sliced or zeroed projections
like any other row); the DeepStack injection after layer j < n is NOT part of layer j and happens whatever op it
carries: ``skip_layers`` scope=all -> the visual rows are their input + the features; scope=visual (and
``skip_sublayers`` scope=visual) -> the visual rows take their input back (or get nothing from the sublayer),
then the features are added; ``visual_drop`` / a token stage below the injection -> only the visual tokens still
in the sequence receive theirs (``take_visual``). MoE: ``ffn_cut`` (the only op that slices ``gate_proj`` /
``up_proj`` / ``down_proj``) is refused by name (``stages[i].op``) on a layer whose MLP is the sparse MoE block;
``skip_sublayers`` ffn removes the whole block (no routing, no expert runs), a visual-scope removal runs it
on the text rows only; every attention-side op, layer skip, ``neighbor_attention`` and ``visual_drop`` works.

Vision site (``vision_seams``, images only; a library extension, ``vision.packed``): the ViT encodes all images
as one packed sequence (attention within each image via ``cu_seqlens``, 2-D rotary), and its merger packs each run
of ``spatial_merge_size^2`` consecutive rows into one LLM token (found by running the merger itself on
index-coded rows: ``merge_groups``). VisPruner's official SigLIP rule (CLS-free: attention received in the last
block, mean over queries then heads) picks whole groups per image; the tower, the merger and the DeepStack
mergers run unchanged on every patch (kept tokens bit-identical), the dropped groups' placeholders leave through
the pre-LLM path (``positions=gaps``), and the DeepStack features follow the same kept set (the pre-hook above).
Videos are refused by name at a vision stage (``pixel_values_videos``).

MoE (Qwen3-VL-30B-A3B / 235B-A22B): routing is per token, so a pruned token routes nowhere;
``eval.flops`` counts the active experts' FLOPs per kept token (``explain`` shows them).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..compat import attn_implementation
from ..errors import IncompatiblePolicyError, UnsupportedModelError
from ..marking import mark_hook
from ..registry import ADAPTERS
from ..vision.packed import PackedTower
from .base import VisionSeams
from .qwen2_vl import Qwen2VLAdapter


def take_visual(mask: torch.Tensor, feats: list[torch.Tensor], idx: torch.Tensor, ok: torch.Tensor):
    """``mask`` ``[B, L]`` visual positions, ``feats[i]`` ``[n, D]`` one row per visual token in row-major
    order of ``mask``; keep positions ``idx`` ``[B, M]`` (``ok``: real slots) -> (``mask'`` ``[B, M]``,
    the feature rows of the kept visual tokens in row-major order of ``mask'``)."""
    ordinal = torch.cumsum(mask.reshape(-1).long(), 0).view_as(mask) - 1
    idx = idx.to(mask.device)
    kept = torch.gather(mask, 1, idx) & ok.to(mask.device)
    rows = torch.gather(ordinal, 1, idx)[kept]
    return kept, [f[rows.to(f.device)] for f in feats]


def fuse_visual(mask: torch.Tensor, feats: list[torch.Tensor], owner: torch.Tensor, ok: torch.Tensor):
    """A pre-LLM reduction's DeepStack features: ``owner`` ``[B, L]`` is the slot of the reduced sequence
    ``[B, M]`` each original token lives in (-1: gone; ``ok``: real slots). A slot holding visual sources gets
    the MEAN of its sources' rows (one source: its own row; the same assignment as the hidden states, averaged
    uniformly over original tokens) -> (``mask'`` ``[B, M]``, rows in row-major order of ``mask'``)."""
    B, L = mask.shape
    M = ok.shape[1]
    owner = owner.to(mask.device)
    src = mask & (owner >= 0)
    w = torch.zeros(B, M + 1, L, dtype=torch.float32, device=mask.device)
    w.scatter_(1, owner.masked_fill(~src, M).clamp(min=0)[:, None, :], 1.0)  # slot M collects nothing useful
    w = w[:, :M] * src[:, None, :]
    count = w.sum(-1)
    new_mask = (count > 0) & ok.to(mask.device)
    out = []
    for f in feats:
        full = f.new_zeros(B, L, f.shape[-1])
        full[mask] = f
        fused = torch.einsum("bml,bld->bmd", w.to(f.dtype), full) / count.clamp(min=1).to(f.dtype)[..., None]
        out.append(fused[new_mask])
    return new_mask, out


class Qwen3VLAdapter(Qwen2VLAdapter):
    """HF Qwen3-VL and Qwen3-VL-MoE (DeepStack injections, interleaved M-RoPE, full-attention text layers)."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")
    vision_no_cls = "the Qwen3-VL vision transformer has no CLS token"

    def check(self, model: nn.Module) -> None:
        super().check(model)
        lm = model.model.language_model
        if not callable(getattr(lm, "_deepstack_process", None)):
            raise UnsupportedModelError(
                "model.model.language_model", "expected _deepstack_process (the DeepStack injection of Qwen3-VL)")

    @staticmethod
    def _grid_from_positions(hw_pos: torch.Tensor) -> tuple[int, int] | None:
        """(h, w) of one frame from an item's height / width position ids ``[2, n]``. A Qwen3-VL video is one
        item whose frames each restart at their own offset (a timestamp sits between them): the frames are cut
        where the height id does not step by 0 or 1, and must all be the same ``h x w`` raster."""
        hw = Qwen2VLAdapter._grid_from_positions(hw_pos)
        if hw is not None:
            return hw
        ph = hw_pos[0].tolist()
        cuts = [0] + [i for i in range(1, len(ph)) if not 0 <= ph[i] - ph[i - 1] <= 1] + [len(ph)]
        sizes = {b - a for a, b in zip(cuts, cuts[1:])}
        if len(sizes) != 1:
            return None
        frames = [Qwen2VLAdapter._grid_from_positions(hw_pos[:, a:b]) for a, b in zip(cuts, cuts[1:])]
        return frames[0] if frames[0] is not None and all(f == frames[0] for f in frames) else None

    def vision_seams(self, model: nn.Module, where: str = "site") -> VisionSeams:
        """The packed ViT (``vision.packed``): VisPruner's CLS-free rule over whole merge groups, per image."""
        visual = model.model.visual
        blocks = tuple(visual.blocks)
        attn = blocks[-1].attn
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scaling")) or not hasattr(blocks[-1], "norm1"):
            raise IncompatiblePolicyError(where, f"{type(attn).__name__}: expected qkv / num_heads / scaling and the "
                                          "block's norm1 (the Qwen3-VL vision block)")
        group = merge_groups(visual.merger, int(visual.spatial_merge_size) ** 2, where)
        for m in getattr(visual, "deepstack_merger_list", ()):
            merge_groups(m, group, where)
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision", None)
        if rope is None:
            raise IncompatiblePolicyError(where, f"{type(attn).__module__}: expected apply_rotary_pos_emb_vision")

        def qk(block, hidden, kwargs):
            a = block.attn
            S = hidden.shape[0]
            q, k, _ = a.qkv(block.norm1(hidden)).reshape(S, 3, a.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = kwargs["position_embeddings"]
            return rope(q, k, cos, sin)

        cfg = model.config.vision_config
        return VisionSeams(tower=visual, layers=blocks, feature_layer=len(blocks) - 1, select_strategy="default",
                           n_patches=0, projector=visual.merger,
                           attn_implementation=attn_implementation(cfg),
                           attention_name="attn", cls_token=False, packed=PackedTower(group, qk, float(attn.scaling)),
                           group_kind=("spatial merge", "merge groups"))

    @staticmethod
    def deepstack_layers(model: nn.Module) -> int:
        """How many decoder layers are followed by an injection (after layers 0 .. n - 1)."""
        return len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def install(self, handle: Any, model: nn.Module) -> None:
        """The DeepStack seams (see the module docstring)."""
        lm = model.model.language_model

        def lm_pre(module, args, kwargs):
            st = handle.state
            pre = st.prefill.pre_llm if st is not None and st.phase == "prefill" else None
            mask, feats = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
            if pre is None or mask is None or feats is None:  # no reduction before the LLM in this forward
                return None
            mask, feats = fuse_visual(mask, list(feats), pre.owner, pre.kept_ok)
            return args, {**kwargs, "visual_pos_masks": mask, "deepstack_visual_embeds": feats}

        handle.add_hook(f"{type(lm).__name__}: forward pre-hook (DeepStack features at the pre-LLM kept tokens)",
                        lm.register_forward_pre_hook(mark_hook(lm_pre), with_kwargs=True))
        if not any(st.changes_tokens and st.layer < self.deepstack_layers(model)
                   for st in handle.policy.stages):
            return
        original = lm._deepstack_process

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            st = handle.state
            if st is not None and st.phase == "prefill" and st.cur_orig is not None:  # an LLM stage has reduced
                visual_pos_masks, (visual_embeds,) = take_visual(visual_pos_masks, [visual_embeds], st.cur_orig,
                                                                 st.cur_ok)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        handle.swap_attr(lm, "_deepstack_process", deepstack_process)
        handle.add_hook(f"{type(lm).__name__}._deepstack_process: instance wrapper (DeepStack features at the "
                        "kept tokens of LLM stages below the last injection; undone by unpatch)")


class _Captured(Exception):
    pass


def merge_groups(merger: nn.Module, group: int, where: str) -> int:
    """How many CONSECUTIVE rows of the packed sequence one LLM token of ``merger`` packs, found by running the
    merger's own forward on index-coded rows (once coded by row, once by channel, both exact in any float dtype)
    with its norm made the identity; the capture is the input of ``linear_fc1`` ``[G, group * C]``. ``IncompatiblePolicyError`` naming ``where``
    unless token t is rows ``t * group .. t * group + group - 1`` in order, each a whole channel block."""
    norm, fc1 = getattr(merger, "norm", None), getattr(merger, "linear_fc1", None)
    C = getattr(norm, "normalized_shape", (0,))[0]
    if norm is None or fc1 is None or C == 0:
        raise IncompatiblePolicyError(where, f"{type(merger).__name__}: expected norm and linear_fc1 (the Qwen3-VL "
                                      "patch merger)")
    C = C // group if C == fc1.in_features else C  # a post-shuffle norm sees the packed width
    N = 4 * group

    def identity(module, args, output):
        return args[0]

    def take(module, args):
        box["x"] = args[0].detach().clone()
        raise _Captured

    dtype, dev = fc1.weight.dtype, fc1.weight.device
    rows = torch.arange(N, dtype=torch.float32)[:, None].expand(N, C)  # two codes, exact in any float dtype
    chans = (torch.arange(C) % 256).to(torch.float32)[None].expand(N, C)
    got = []
    for x in (rows, chans):
        box = {}
        hs = [norm.register_forward_hook(identity), fc1.register_forward_pre_hook(take)]
        try:
            with torch.no_grad():
                merger(x.to(dev, dtype).contiguous())
        except _Captured:
            pass
        finally:
            for h in hs:
                h.remove()
        got.append(box.get("x"))
    want_rows = torch.arange(N, dtype=torch.float32).repeat_interleave(C).view(N // group, group * C)
    want_chans = chans.reshape(N // group, group * C)
    if any(g is None for g in got) or not (torch.equal(got[0].float().cpu(), want_rows)
                                           and torch.equal(got[1].float().cpu(), want_chans)):
        raise IncompatiblePolicyError(where, f"{type(merger).__name__} does not pack {group} consecutive rows per LLM "
                                      "token; site vision is defined for that packing only")
    return group


ADAPTERS.register("qwen3_vl", Qwen3VLAdapter())
ADAPTERS.register("qwen3_vl_moe", Qwen3VLAdapter())
