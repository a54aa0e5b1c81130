"""Hugging Face ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

Visual tokens are the ``image_token_id`` and ``video_token_id`` placeholders of ``input_ids``.
Their grid coordinates come from ``image_grid_thw`` / ``video_grid_thw`` (one ``[t, h, w]``
row per image / video over the whole batch, in prompt order, in vision-patch units): after
the ``spatial_merge_size`` x ``spatial_merge_size`` merge each item is a ``t x h' x w'`` block
of LLM tokens in raster order (t slowest, then row, then column), exactly the order the
model's ``get_rope_index`` assigns M-RoPE positions in and ``masked_scatter`` fills features
in. Images and videos are matched to placeholders by count, so several of each per prompt,
different sizes (dynamic resolution) and batches work. ``generate()`` (transformers 5.x) encodes
the pixels before prefill and passes ``mm_encoder_outputs`` and ``[4, B, L]`` position ids
instead of pixels and grids: then the per-item token counts come from the encoder outputs and
each frame's ``h x w`` from the item's own height / width position ids (``start + row``,
``start + col``), which give the same layout.

Layout (``VisualLayout``): ``image`` is the index of the visual item (image or video) within
the row, in prompt order; every frame of an item is its own ``segment`` (an image has one,
a video has t), with ``row``/``col`` on the merged grid.

Positions: the engine gathers each layer's own incoming ``(cos, sin)`` (built by the model
from the 3-D M-RoPE ids ``[3, B, L]``) and ``position_ids`` (the text positions, when the
model passes them) at the kept tokens, so every kept token keeps its original 3-D position.
Layer 0 is never pruned, so the cache length the model reads (and ``rope_deltas``) make decode
continue at the original next position.

Pre-LLM stages (``supports_pre_llm``): the engine gathers ``inputs_embeds`` and the 3-D M-RoPE ids
at the kept tokens (a merged token takes its destination's position), so kept tokens keep their
original positions (``positions=gaps``, the only convention defined here); decoding continues on
every axis after the prompt's largest position, the unpatched model's next position
(``rope_deltas``), whatever the cache length.

Vision site: Qwen2-VL's packed ViT runs FlowCut's official Qwen stage (``vision.packed_flowcut``) and VisPruner
(``vision.packed``); Qwen2.5-VL's VisPruner only (its windowed blocks reorder the patches: ``window_index`` maps
the units back to placeholder order).
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from ..compat import attn_implementation, vision_window_index
from ..errors import IncompatiblePolicyError, InputError, UnsupportedModelError
from ..registry import ADAPTERS
from ..vision.packed import PackedTower
from .base import HFAdapter, VisionSeams, VisualLayout


class Qwen2VLAdapter(HFAdapter):
    """HF Qwen2-VL and Qwen2.5-VL (full-attention text layers, M-RoPE)."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    # inputs that carry new pixels or precomputed visual features: refused in a chunk appended to a cache
    pixel_inputs = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")
    # pre_llm stages reduce inputs_embeds and the M-RoPE ids [3, B, L]: each kept token keeps its 3-D position
    decoder_style = "Qwen2-VL"
    pre_llm_positions = ("gaps",)
    pre_llm_positions_why = (
        "M-RoPE positions are 3-D (temporal, height, width): an image spans max(h, w) positions, not one per token, "
        "so there is no contiguous renumbering; write positions=gaps"
    )
    llm_positions = ("gaps",)
    llm_positions_why = pre_llm_positions_why

    # -- vision site -------------------------------------------------------------------------
    vision_no_cls = "the Qwen2-VL vision transformer has no CLS token"

    def vision_seams(self, model: nn.Module, where: str = "site"):
        """The packed ViT. Qwen2-VL: FlowCut's official Qwen stage (``vision.packed_flowcut``: single patches pruned
        inside the tower, the merger packs 4 consecutive kept patches) and VisPruner's CLS-free rule over whole merge
        groups (``vision.packed``, as on Qwen3-VL; a library extension). Qwen2.5-VL: VisPruner only, its units put
        back in placeholder order (the tower's rows follow its windows: ``window_index``); its last block must be a
        full-attention block. FlowCut's in-tower pruning is not mapped on the windowed blocks."""
        visual = model.model.visual
        blocks = tuple(visual.blocks)
        windowed = model.config.model_type != "qwen2_vl"  # Qwen2.5-VL: rows in window order, windowed blocks
        if windowed and len(blocks) - 1 not in set(getattr(visual, "fullatt_block_indexes", ()) or ()):
            raise IncompatiblePolicyError(
                where, f"site vision on {model.config.model_type!r} reads the last vision block's attention within each "
                "image, but this tower's last block attends within windows (fullatt_block_indexes "
                f"{list(getattr(visual, 'fullatt_block_indexes', ()) or ())}); allowed: a config whose last block is a "
                "full-attention block (the released Qwen2.5-VL checkpoints), or site llm / pre_llm stages")
        group = int(visual.spatial_merge_size) ** 2
        for b, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scaling")):
                raise IncompatiblePolicyError(where, f"vision block {b}: expected attn.qkv / num_heads / scaling (the "
                                              "Qwen2-VL vision block)")
        if getattr(sys.modules[type(blocks[-1].attn).__module__], "apply_rotary_pos_emb_vision", None) is None:
            raise IncompatiblePolicyError(where, f"{type(blocks[-1].attn).__module__}: expected apply_rotary_pos_emb_vision")
        merger = visual.merger
        ln, mlp = getattr(merger, "ln_q", None), getattr(merger, "mlp", None)
        first = mlp[0] if isinstance(mlp, nn.Sequential) and len(mlp) else None
        width = int(ln.weight.shape[-1]) if isinstance(getattr(ln, "weight", None), torch.Tensor) else 0
        if not isinstance(first, nn.Linear) or first.in_features != group * width:
            raise IncompatiblePolicyError(where, f"{type(merger).__name__}: expected ln_q and an mlp whose first Linear "
                                          f"reads {group} consecutive rows (the Qwen2-VL patch merger)")

        rope = sys.modules[type(blocks[-1].attn).__module__].apply_rotary_pos_emb_vision

        def qk(block, hidden, kwargs):  # the last block's own q / k on its input, rotary applied (VisPruner)
            a = block.attn
            S = hidden.shape[0]
            q, k, _ = a.qkv(block.norm1(hidden)).reshape(S, 3, a.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = kwargs["position_embeddings"]
            return rope(q, k, cos, sin)

        return VisionSeams(tower=visual, layers=blocks, feature_layer=len(blocks) - 1, select_strategy="default",
                           n_patches=0, projector=merger, attn_implementation=attn_implementation(model.config.vision_config),
                           attention_name="attn", cls_token=False,
                           packed=PackedTower(group, qk, float(blocks[-1].attn.scaling),
                                              in_tower=() if windowed else ("flowcut_vit",),
                                              unit_order=functools.partial(vision_window_index, visual) if windowed
                                              else None),
                           group_kind=("spatial merge", "merge groups"))

    # -- structure ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        cfg = model.config
        text = cfg.text_config
        layer_types = list(getattr(text, "layer_types", None) or [])
        sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
        if sliding or getattr(text, "use_sliding_window", False):
            raise UnsupportedModelError(
                "config.text_config.use_sliding_window",
                f"{cfg.model_type}: sliding-window layers {sliding} are not supported (their window and their "
                "sliding cache count cached tokens, which pruning changes, and flash-attention applies the window "
                "over kept slots); allowed: use_sliding_window=False (as in the released Qwen2-VL / Qwen2.5-VL checkpoints)",
            )
        self.check_text_layers(model)

    # -- visual tokens -----------------------------------------------------------------------
    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> VisualLayout:
        cfg = model.config
        device = input_ids.device
        kinds = (("image", cfg.image_token_id), ("video", cfg.video_token_id))
        ids = input_ids.cpu()
        B, L = ids.shape
        is_visual = torch.zeros_like(ids, dtype=torch.bool)
        for _, tok in kinds:
            is_visual |= ids == tok
        item = torch.full((B, L), -1, dtype=torch.long)
        segment, row, col = item.clone(), item.clone(), item.clone()
        coords_known = True
        if bool(is_visual.any()):
            pos3 = self._positions(kwargs, B, L)
            items: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in range(B)]  # per row: (first, frames, positions)
            for kind, tok in kinds:
                mask = ids == tok
                n_tokens = int(mask.sum())
                if n_tokens == 0:
                    continue
                shapes = self._item_shapes(cfg, kind, kwargs, n_tokens)
                if shapes is None:
                    coords_known = False
                    continue
                # features fill the placeholders in batch order, row by row, left to right (masked_scatter)
                j = 0
                for b in range(B):
                    pos = torch.nonzero(mask[b]).flatten()
                    i = 0
                    while i < len(pos):
                        n, hw = shapes[j]
                        if i + n > len(pos):
                            raise InputError(
                                "input_ids",
                                f"{kind} {j} needs {n} placeholder tokens but row {b} holds only {len(pos) - i} more; "
                                f"every {kind} must lie within one row",
                            )
                        p = pos[i:i + n]
                        if hw is None and pos3 is not None:
                            hw = self._grid_from_positions(pos3[1:, b, p])
                        if hw is None:
                            coords_known = False
                            hw = (1, n)
                        h, w = hw
                        r = torch.arange(n)
                        row[b, p] = (r % (h * w)) // w
                        col[b, p] = r % w
                        segment[b, p] = r // (h * w)  # frame within the item; offset per row below
                        items[b].append((int(p[0]), n // (h * w), p))
                        i += n
                        j += 1
            # number items and segments per row in prompt order (images and videos together)
            for b in range(B):
                seg_base = 0
                for n_item, (_, frames, p) in enumerate(sorted(items[b], key=lambda x: x[0])):
                    item[b, p] = n_item
                    segment[b, p] += seg_base
                    seg_base += frames
            if not coords_known:  # some grid is unknown: only the token order is
                item = torch.where(is_visual, torch.zeros_like(item), item)
                segment = torch.where(is_visual, torch.zeros_like(segment), segment)
                row = torch.full_like(row, -1)
                col = torch.full_like(col, -1)
        return VisualLayout(
            is_visual.to(device), item.to(device), segment.to(device), row.to(device), col.to(device),
            torch.zeros_like(is_visual, device=device), coords_known,
        )

    @staticmethod
    def _item_shapes(cfg, kind: str, kwargs: dict, n_tokens: int) -> list[tuple[int, tuple[int, int] | None]] | None:
        """Per image / video of the batch, in order: (LLM tokens, (h, w) of one frame or None when unknown).

        From ``{kind}_grid_thw`` when given (plain forwards); else from the token counts of precomputed
        ``mm_encoder_outputs[kind]`` (what ``generate()`` passes instead of pixels and grids: it pops them),
        with the grid read from the 3-D positions later. None: not even the counts are known.
        """
        merge = cfg.vision_config.spatial_merge_size
        grid = kwargs.get(f"{kind}_grid_thw")
        if grid is not None:
            grid = torch.as_tensor(grid).cpu().long().reshape(-1, 3)
            if bool((grid[:, 1:] % merge != 0).any()):
                raise InputError(f"{kind}_grid_thw", f"h and w must be multiples of spatial_merge_size={merge}")
            shapes = [(t * (h // merge) * (w // merge), (h // merge, w // merge)) for t, h, w in grid.tolist()]
            source = f"{kind}_grid_thw gives {{}} (t*h*w/{merge * merge} per {kind})"
        else:
            enc = (kwargs.get("mm_encoder_outputs") or {}).get(kind)
            feats = getattr(enc, "pooler_output", None)
            if not isinstance(feats, (tuple, list)):
                return None
            shapes = [(int(f.shape[0]), None) for f in feats]
            source = f"mm_encoder_outputs[{kind!r}] holds {{}} features"
        total = sum(n for n, _ in shapes)
        if total != n_tokens:
            raise InputError(
                "input_ids",
                f"{n_tokens} {kind} placeholder tokens but {source.format(total)}; "
                "the prompt must hold exactly one placeholder per feature",
            )
        return shapes

    @staticmethod
    def _positions(kwargs: dict, B: int, L: int) -> torch.Tensor | None:
        """The M-RoPE ids ``[3, B, L]`` (temporal, height, width) the caller passed, if any (generate passes
        ``[4, B, L]``: text positions first)."""
        pos = kwargs.get("position_ids")
        if pos is None or pos.dim() != 3 or pos.shape[0] not in (3, 4) or pos.shape[-1] != L:
            return None
        return pos[-3:].expand(3, B, L).cpu()

    @staticmethod
    def _grid_from_positions(hw_pos: torch.Tensor) -> tuple[int, int] | None:
        """(h, w) of one frame from an item's height / width position ids ``[2, n]`` (``get_rope_index`` gives
        them as ``start + row`` / ``start + col`` in raster order); None when they are not such a grid."""
        ph, pw = hw_pos[0] - hw_pos[0].min(), hw_pos[1] - hw_pos[1].min()
        h, w = int(ph.max()) + 1, int(pw.max()) + 1
        n = hw_pos.shape[1]
        if n % (h * w):
            return None
        r = torch.arange(n)
        if not (torch.equal(ph, (r % (h * w)) // w) and torch.equal(pw, r % w)):
            return None
        return h, w


ADAPTERS.register("qwen2_vl", Qwen2VLAdapter())
ADAPTERS.register("qwen2_5_vl", Qwen2VLAdapter())
