"""Installing a ``StructuralPlan``: forward pre-hooks on the decoder layers and INSTANCE-level
wrappers, every one recorded on the handle and undone exactly by ``unpatch()``.

Instance-level changes (never the class): a layer's / MLP's / ``q_proj``'s / ``o_proj``'s
``forward`` instance attribute (deleted again on unpatch), sliced copies of ``q/k/v/o_proj`` put
in place of the originals (the originals, untouched, are put back), the attention module's
``num_key_value_groups`` and the text config's ``_attn_implementation_internal`` (old values
restored). For ``skip_visual`` / ``neighbor`` / ``heads_visual`` layers a NEW attention name is
registered with transformers (query-subset attention, and for YOPO heads a split into kept heads
and text-only pruned heads, delegating to the model's own backend) and unregistered on unpatch;
no existing registry entry is changed. ``heads_visual`` layers also wrap ``q/o_proj`` (and
``k/v_proj`` of fully pruned KV groups) so visual rows skip the pruned heads' columns; the
weight slices they use are cached copies, not parameters (``slicing.Rows``); the query-subset attention
backend lives in ``attention.py``, the weight slicing in ``slicing.py``.

Per forward, the structural pre-hook of layer j (registered after the engine's, so it sees the
kwargs already shrunk by token stages) stores the layer's visual rows ``[B, M]`` in
``state.structural``; the wrappers of that layer read them, and a forward hook forgets them when
the layer returns (a criterion calling the projections later gets the plain ones). While decoding (new tokens are
text) only the masks change (visual KEYS of the prompt, from ``PrefillRecord.is_visual``).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import ATTN_IMPLEMENTATION_ATTR, attention_bases, attn_implementation, register_attention
from ..errors import InputError
from ..marking import mark_hook
from .attention import decode_key_visual, subset_attention
from .plan import StructuralPlan, capture_layers, text_only_kv_heads
from .slicing import Rows, sliced_attention

if TYPE_CHECKING:
    from ..handle import PatchHandle


def _heads_split(handle: "PatchHandle") -> bool:
    """True when ``install_attention`` put the YOPO head split in place (eager / sdpa / 2-D-mask backends)."""
    return handle.structural_heads


# -- per-forward visual rows ---------------------------------------------------------------------
def _visual_rows(handle: "PatchHandle", j: int) -> torch.Tensor | None:
    info = handle.state.structural if handle.state is not None else None
    if not info or info.get("layer") != j:
        return None
    return info.get("vis")


def _current(st, name: str) -> torch.Tensor:
    """A layout tensor [B, L] gathered at the current prefill sequence [B, M]."""
    t = getattr(st.layout, name)
    return t if st.cur_orig is None else torch.gather(t, 1, st.cur_orig)


# -- installation --------------------------------------------------------------------------------
def install_modules(handle: "PatchHandle", plan: StructuralPlan) -> None:
    """Swap in the sliced attention projections (before the engine hooks k/v_proj for criteria)."""
    layers = handle.seams.decoder_layers
    for j, pruned in sorted(plan.heads_all.items()):
        attn = layers[j].self_attn
        q, k, v, o, groups = sliced_attention(attn, set(pruned))
        for name, sliced in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o)):
            lin = getattr(attn, name)  # the model's own module stays: state_dict, save_pretrained, .to() see it
            handle.swap_attr(lin, "forward", sliced)
            handle.swap_attr(lin, sliced.size_attr, sliced.width)
        handle.swap_attr(attn, "num_key_value_groups", groups)
        handle.add_hook(f"decoder layer {j}: self_attn.q/k/v/o_proj compute only the rows / columns of the "
                        f"{q.width // attn.head_dim} kept heads of their own weights (pruned {list(pruned)}; modules and "
                        "state_dict unchanged, forwards restored on unpatch)")


def install_attention(handle: "PatchHandle", plan: StructuralPlan) -> bool:
    """Query-subset attention for ``skip_visual`` and ``neighbor`` layers (4-D mask backends only).

    Registers a NEW attention name (and the original backend's mask function under it) and
    points only this model's text config at it; both are undone on unpatch. The function calls
    the original backend: text queries in one call; visual queries (neighbour layers) in chunks
    of one patch-grid row with only the keys the chunk may attend (text keys and the w rows
    above); ``skip_visual`` layers compute no visual query at all. ``heads_visual`` layers (YOPO)
    split the heads: kept heads as above (or one call over all queries), pruned heads one call of
    text queries over text keys; visual queries get zeros there. Other layers and decode steps
    (per-head masks) go straight to the original backend.
    """
    two_d = handle.seams.mask_format == "2d"
    if not (plan.heads_visual or (not two_d and (plan.skip_visual or plan.neighbor or plan.attn_visual))):
        return False
    text = handle.seams.text_config
    orig = attn_implementation(text)
    name = f"vtp_structural_{id(handle):x}"
    bases = attention_bases(handle.seams)
    if bases is None:  # no backend function to delegate to: keep the mask path (plan.resolve refused heads_visual)
        return False
    fmt = handle.seams.mask_format
    handle.on_unpatch(register_attention(name, functools.partial(subset_attention, handle, plan, bases, fmt), orig))
    handle.swap_attr(text, ATTN_IMPLEMENTATION_ATTR, name)
    handle.structural_heads = bool(plan.heads_visual)  # read by the q/k/v/o_proj wrappers and the pre-hooks
    where = set(plan.heads_visual) if two_d else \
        set(plan.skip_visual) | set(plan.neighbor) | set(plan.heads_visual) | set(plan.attn_visual)
    handle.add_hook(f"attention backend {name!r} registered for this model's text config (wraps {orig!r}: query-subset "
                f"attention on layers {sorted(where)}; unregistered on unpatch)")
    return not two_d  # query subsets for skip_visual / neighbour layers need 4-D masks


def install_hooks(handle: "PatchHandle", plan: StructuralPlan) -> None:
    layers = handle.seams.decoder_layers
    watched = set(plan.skip_visual) | set(plan.heads_visual) | set(plan.ffn) | set(plan.neighbor) \
        | set(plan.attn_visual) | set(plan.ffn_visual)
    for j, layer in enumerate(layers):
        if j in plan.skip_all:
            handle.swap_attr(layer, "forward", _skip_all_forward)
            handle.add_hook(f"decoder layer {j}: forward replaced (instance) by a pass-through (skip_layers scope=all)")
            continue
        if j in watched:
            handle.add_hook(
                f"decoder layer {j}: forward pre-hook (structural: visual rows"
                + (", per-head mask while decoding" if j in plan.heads_visual else "")
                + (", neighbour mask" if j in plan.neighbor else "") + ")",
                layer.register_forward_pre_hook(mark_hook(functools.partial(_layer_pre_hook, handle, plan, j)), with_kwargs=True),
            )
            handle.add_hook(f"decoder layer {j}: forward hook, always called (structural: forget the visual rows, so calls of "
                        "its projections outside its forward, e.g. by criteria, are not sliced)",
                        layer.register_forward_hook(mark_hook(functools.partial(_layer_post_hook, handle, j)), always_call=True))
        if j in plan.heads_visual:
            _install_head_slices(handle, plan, j, layer.self_attn)
        if plan.no_visual_attention(j):
            qp = layer.self_attn.q_proj
            handle.swap_attr(qp, "forward", functools.partial(_text_rows_forward, handle, j, qp, qp.forward))
            handle.add_hook(f"decoder layer {j}: self_attn.q_proj forward wrapped (instance; text rows only, visual queries zero)")
        if plan.no_visual_attention(j) or j in plan.heads_visual:
            o = layer.self_attn.o_proj
            rows = None
            if j in plan.heads_visual:
                d = layer.self_attn.head_dim
                rows = Rows(o, torch.tensor([h * d + i for h in range(plan.num_heads) if h not in plan.heads_visual[j]
                                              for i in range(d)], dtype=torch.long), cols=True)
            handle.swap_attr(o, "forward", functools.partial(_o_proj_forward, handle, plan, j, o, o.forward, rows))
            handle.add_hook(f"decoder layer {j}: self_attn.o_proj forward wrapped (instance; "
                        + ("text rows only" if plan.no_visual_attention(j) else "visual rows: the kept heads' columns only with the "
                           "query-subset attention, else pruned heads zeroed") + ")")
        if _no_visual_mlp(plan, j) or j in plan.ffn:
            mlp = layer.mlp
            handle.swap_attr(mlp, "forward", functools.partial(_mlp_forward, handle, plan, j, mlp, mlp.forward))
            handle.add_hook(f"decoder layer {j}: mlp forward wrapped (instance; "
                        + ("text rows only" if _no_visual_mlp(plan, j) else f"visual rows use {plan.ffn[j]} channels") + ")")
        if j in plan.skip_visual:
            handle.swap_attr(layer, "forward", functools.partial(_skip_visual_forward, handle, j, layer.forward))
            handle.add_hook(f"decoder layer {j}: forward wrapped (instance; visual rows pass through, skip_layers scope=visual)")
        # FinerCut sublayers last: they replace whatever the ops above wrapped on this layer
        if j in getattr(plan, "skip_attn", ()):
            handle.swap_attr(layer.self_attn, "forward", _removed_attention)
            handle.add_hook(f"decoder layer {j}: self_attn forward replaced (instance) by zeros (skip_sublayers attn)")
        if j in getattr(plan, "skip_ffn", ()):
            handle.swap_attr(layer.mlp, "forward", _removed_mlp)
            handle.add_hook(f"decoder layer {j}: mlp forward replaced (instance) by zeros (skip_sublayers ffn)")


def _install_head_slices(handle: "PatchHandle", plan: StructuralPlan, j: int, attn: nn.Module) -> None:
    """YOPO head pruning with real savings (active while the query-subset attention is installed):
    visual rows run q_proj for the kept heads only and o_proj on the kept heads' columns only; KV
    groups whose query heads are all pruned run k/v_proj on the text rows only (their visual keys
    and values, zeros in the KV cache, are never read: masked per head while decoding). Not in
    layers whose keys a token stage's criterion captures (they stay the plain projections)."""
    d = attn.head_dim
    pruned = set(plan.heads_visual[j])
    H = attn.q_proj.out_features // d
    Hkv = attn.k_proj.out_features // d
    cols = lambda heads: torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)  # noqa: E731
    kept = [h for h in range(H) if h not in pruned]
    if not plan.no_visual_attention(j):  # skip_visual / attn_visual layers compute no visual query at all
        qp = attn.q_proj
        handle.swap_attr(qp, "forward", functools.partial(_kept_cols_forward, handle, j, qp, qp.forward, Rows(qp, cols(kept))))
        handle.add_hook(f"decoder layer {j}: self_attn.q_proj forward wrapped (instance; visual rows: the {len(kept)} kept "
                    "heads only)")
    gone = text_only_kv_heads(pruned, H, Hkv)
    if gone and j not in capture_layers(handle.policy):
        keep_kv = cols([k for k in range(Hkv) if k not in gone])
        for name in ("k_proj", "v_proj"):
            lin = getattr(attn, name)
            handle.swap_attr(lin, "forward", functools.partial(_kept_cols_forward, handle, j, lin, lin.forward, Rows(lin, keep_kv)))
            handle.add_hook(f"decoder layer {j}: self_attn.{name} forward wrapped (instance; visual rows skip KV heads {list(gone)}, "
                        "whose query heads are all pruned)")


def _kept_cols_forward(handle, j: int, lin: nn.Linear, orig, rows: Rows, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, M, D]``: text rows through the whole projection; visual rows only the output
    columns ``rows.idx`` (the others are zero: pruned heads' queries / unread keys and values)."""
    vis = _visual_rows(handle, j)
    if not _heads_split(handle) or vis is None or vis.shape != x.shape[:2] or not bool(vis.any()) or lin.weight.is_meta:
        return orig(x)  # (meta: weights offloaded by accelerate, loaded only inside orig; the columns dropped here are never read)
    out = x.new_empty(*x.shape[:-1], lin.out_features)
    text = ~vis
    if bool(text.any()):
        out[text] = orig(x[text])
    w, b = rows.get()
    xv = x[vis]
    part = xv.new_zeros(xv.shape[0], lin.out_features)
    part.index_copy_(1, rows.idx.to(x.device), F.linear(xv, w, b))  # whole rows below: no per-element scatter
    out[vis] = part
    return out


def _layer_post_hook(handle, j: int, module, args, out) -> None:
    st = handle.state
    if st is not None and st.structural.get("layer") == j:
        st.structural.pop("layer", None)
    return None


# -- the wrappers --------------------------------------------------------------------------------
def _skip_all_forward(*args, **kwargs):
    """A skipped decoder layer: its input is its output; its KV cache is never written."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _removed_attention(*args, **kwargs):
    """A removed attention sublayer (FinerCut): adds nothing to the residual stream; no projection,
    no attention, no KV cache write."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return torch.zeros_like(hidden), None


def _removed_mlp(x: torch.Tensor) -> torch.Tensor:
    """A removed MLP sublayer (FinerCut): adds nothing to the residual stream."""
    return torch.zeros_like(x)


def _no_visual_mlp(plan: StructuralPlan, j: int) -> bool:
    """Visual rows get nothing from layer j's MLP (skip_layers / skip_sublayers scope=visual)."""
    return j in plan.skip_visual or j in plan.ffn_visual


def _skip_visual_forward(handle, j, orig, *args, **kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    vis = _visual_rows(handle, j)
    out = orig(*args, **kwargs)
    if vis is None or not bool(vis.any()):
        return out
    return torch.where(vis[..., None], hidden, out)


def _text_rows_forward(handle, j: int, lin: nn.Linear, orig, x: torch.Tensor) -> torch.Tensor:
    """A projection computed on the text rows only; visual rows get zeros (their results are discarded)."""
    vis = _visual_rows(handle, j)
    if vis is None or vis.shape != x.shape[:2] or not bool(vis.any()):
        return orig(x)
    text = ~vis
    out = x.new_zeros(*x.shape[:-1], lin.out_features)
    out[text] = orig(x[text])
    return out


def _o_proj_forward(handle, plan: StructuralPlan, j: int, o_proj: nn.Linear, orig, rows: "Rows | None",
                   x: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, M, H * d]`` attention output before o_proj."""
    vis = _visual_rows(handle, j)
    if vis is None or vis.shape != x.shape[:2] or not bool(vis.any()):
        return orig(x)
    if plan.no_visual_attention(j):  # visual rows are discarded (layer wrapper) or get nothing: text rows only
        return _text_rows_forward(handle, j, o_proj, orig, x)
    pruned = plan.heads_visual[j]
    d = x.shape[-1] // plan.num_heads
    if _heads_split(handle) and o_proj.weight.is_meta:  # offloaded (accelerate): the pruned heads' inputs are zero already
        return orig(x)
    if _heads_split(handle):  # visual rows: the kept heads' input columns only (the pruned ones are zero)
        out = x.new_empty(*x.shape[:-1], o_proj.out_features)
        text = ~vis
        if bool(text.any()):
            out[text] = orig(x[text])
        w, b = rows.get()
        out[vis] = F.linear(x[vis].index_select(1, rows.idx.to(x.device)), w, b)
        return out
    head_off = torch.zeros(plan.num_heads, dtype=torch.bool, device=x.device)
    head_off[list(pruned)] = True
    cols = head_off.repeat_interleave(d)  # [H * d]
    return orig(x.masked_fill(vis[..., None] & cols, 0.0))


def _mlp_forward(handle, plan: StructuralPlan, j: int, mlp: nn.Module, orig, x: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, M, D]``. Text rows: the full MLP; visual rows: nothing (skip_visual) or the cut MLP."""
    vis = _visual_rows(handle, j)
    if vis is None or vis.shape != x.shape[:2] or not bool(vis.any()):
        return orig(x)
    out = torch.empty_like(x) if not _no_visual_mlp(plan, j) else x.new_zeros(x.shape)
    text = ~vis
    if bool(text.any()):
        out[text] = orig(x[text][None])[0]  # [1, n, D]: a mixture-of-experts block (Qwen3-VL-MoE) takes [B, L, D] only
    if _no_visual_mlp(plan, j):
        return out
    m = plan.ffn[j]
    xv = x[vis]  # [n_visual, D]
    g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    gb = g.bias[:m] if g.bias is not None else None
    ub = u.bias[:m] if u.bias is not None else None
    h = mlp.act_fn(F.linear(xv, g.weight[:m], gb)) * F.linear(xv, u.weight[:m], ub)
    out[vis] = F.linear(h, dn.weight[:, :m], dn.bias)
    return out


# -- masks -----------------------------------------------------------------------------------------
def _layer_pre_hook(handle, plan: StructuralPlan, j: int, module, args: tuple, kwargs: dict):
    st = handle.state
    if st is None:
        return None
    memo = st.structural.get("memo", [])  # masks built by earlier layers of this forward, reused when identical
    st.structural = {"memo": memo, "memo_chunks": st.structural.get("memo_chunks", [])}
    if st.phase == "passthrough":
        return None
    hidden = kwargs["hidden_states"] if not args else args[0]
    B, Q = hidden.shape[:2]
    if st.phase == "prefill":
        ok = st.cur_ok if st.cur_ok is not None else torch.ones(B, Q, dtype=torch.bool, device=hidden.device)
        vis = _current(st, "is_visual") & ok
        st.structural.update(layer=j, vis=vis)
        if j in plan.neighbor:
            if not st.layout.coords_known:
                raise InputError("image_sizes", "the patch grid of these visual tokens is unknown (LLaVA-NeXT needs image_sizes "
                                 "or encoder outputs); neighbor_attention cannot place its window")
            st.structural["chunk"] = _current(st, "segment") * (1 << 20) + _current(st, "row")
        key_vis = vis
    else:
        if st.prefill.is_visual is None:
            return None
        key_vis = None  # computed below once the key length is known
        vis = None
    # per-head masks: while decoding; in prefill only without the query-subset attention (which splits the heads)
    heads_mask = j in plan.heads_visual and handle.seams.mask_format != "2d" \
        and (st.phase != "prefill" or not _heads_split(handle))
    if not heads_mask and (j not in plan.neighbor or st.phase != "prefill"):
        return None
    if st.phase != "prefill" and not bool(st.prefill.is_visual.any()):
        return None
    kwargs = dict(kwargs)
    mask = kwargs.get("attention_mask")
    fmt = handle.seams.mask_format
    # layers between two token stages get the same incoming mask and sequence: build each mask once
    what = (st.phase, plan.neighbor.get(j) if st.phase == "prefill" else None, plan.heads_visual.get(j) if heads_mask else None)
    cur_set = st.cur_orig if st.phase == "prefill" else st.prefill.kept_at(j)  # the sequence / cached keys of layer j
    for m_in, cur, w, out in memo:
        if m_in is mask and cur is cur_set and w == what:
            kwargs["attention_mask"] = out
            return args, kwargs
    if mask is not None:
        kv = mask.shape[-1]
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        allowed = allowed.expand(B, *allowed.shape[1:])
    else:
        if st.phase == "prefill":
            kv = Q
        else:
            kv = st.cache.get_seq_length(j) + Q
        q_pos = torch.arange(kv - Q, kv, device=hidden.device)
        allowed = (torch.arange(kv, device=hidden.device)[None, :] <= q_pos[:, None])[None, None].expand(B, 1, Q, kv)
    if key_vis is None:  # decode: the cached keys are the prompt's kept tokens, then text
        key_vis = decode_key_visual(st, j, B, kv)
    if j in plan.neighbor and st.phase == "prefill":
        w = plan.neighbor[j] // 2
        row, col, seg = _current(st, "row"), _current(st, "col"), _current(st, "segment")
        grid = vis & (row >= 0)  # CLS / image_newline tokens are not on the grid: unrestricted
        far = ((row[:, :, None] - row[:, None, :]).abs() > w) | ((col[:, :, None] - col[:, None, :]).abs() > w) \
            | (seg[:, :, None] != seg[:, None, :])
        cut = grid[:, :, None] & grid[:, None, :] & far  # [B, Q, K]
        allowed = allowed & ~cut[:, None]
    if heads_mask:
        H = plan.num_heads
        head_off = torch.zeros(H, dtype=torch.bool, device=hidden.device)
        head_off[list(plan.heads_visual[j])] = True
        allowed = allowed.expand(B, H, Q, kv) & ~(head_off[None, :, None, None] & key_vis[:, None, None, :])
        if vis is not None:  # a visual query of a pruned head keeps its own key (its output is zeroed anyway): no empty row
            diag = torch.eye(Q, kv, dtype=torch.bool, device=hidden.device)
            allowed = allowed | (head_off[None, :, None, None] & vis[:, None, :, None] & diag)
    if fmt == "float4d":
        dtype = mask.dtype if mask is not None else hidden.dtype
        new = torch.zeros(allowed.shape, dtype=dtype, device=hidden.device).masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        new = allowed.contiguous()
    memo.append((mask, cur_set, what, new))  # holding the tensors keeps their identities unique
    kwargs["attention_mask"] = new
    return args, kwargs
