"""The hooks. Closures over a ``PatchHandle``; all per-forward state lives in ``handle.state`` (the calling
thread's forward: several threads may run forwards on one patched model at once).

- top-level pre-hook: find visual tokens, fix each stage's per-row budget, open a
  ``ForwardState`` (prefill), or attach to the prompt's ``PrefillRecord`` (cached decode).
- ``layer_pre_hook``, run before a decoder layer by ``sites.routed_layers.LayerCall``: at a stage's
  layer gather the hidden states; every later layer gathers its OWN incoming kwargs (mask, position
  embeddings, position ids); the layer just below a stage runs the criterion and selection on its own
  input. A gated decode step (``_decode_gate``) runs it at each stage's first layer only.
- top-level post-hook (always called): close the state, keep it for ``last_trace()``.
"""
from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError
from .masking import allowed_of, shrink_mask
from .scoring import ScoringContext
from .selection import left_packed, right_packed
from .lm_input import sources_after, to_original
from .state import ForwardState, PrefillRecord, StageRecord
from .vision.hooks import check_features

if TYPE_CHECKING:
    from .handle import PatchHandle


def cache_of(kwargs: Any) -> Any:
    """The cache under its 5.x name ``cache``, else the older ``past_key_values`` (read only when absent)."""
    cache = kwargs.get("cache")
    # ``in kwargs.keys()``: on transformers' outputs ``"past_key_values" in output`` logs a deprecation warning
    return cache if cache is not None or "past_key_values" not in kwargs.keys() else kwargs.get("past_key_values")


def guard_forward(handle: "PatchHandle", original):
    """The top module's forward, wrapped on the instance: a forward left by ANY exception, ``KeyboardInterrupt``
    and other ``BaseException`` included (torch's ``always_call`` hooks run on ``Exception`` only), releases
    this thread's state, so the model stays usable and ``unpatch()`` works."""

    @functools.wraps(original)
    def forward(*args, **kwargs):
        st = handle.state
        if st is not None:
            st.in_forward = True
        try:
            return original(*args, **kwargs)
        except BaseException:
            handle.close_state()
            raise
        finally:
            if st is not None:
                st.in_forward = False

    return forward


def top_pre_hook(handle: "PatchHandle", module, args: tuple, kwargs: dict):
    stale = handle.state
    if stale is not None:
        if stale.in_forward:
            raise InputError(
                "forward",
                "this patched model is already inside a forward in this thread (a re-entrant call); "
                "a patched model serves one forward per thread at a time",
            )
        handle.discard_state()  # left by a call interrupted in another hook, outside the model's forward
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if kwargs.get("labels") is not None:
        raise InputError(
            "labels",
            "a pruning policy returns logits for the kept tokens only, so labels no longer align; "
            "compute the loss yourself from the kept positions (handle.last_trace()) or unpatch first",
        )
    cfg = getattr(module, "config", None)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    router = kwargs.get("output_router_logits")
    if router or (router is None and getattr(text_cfg, "output_router_logits", False)):  # mixture of experts
        raise InputError(
            "output_router_logits",
            "router logits (and the load-balancing loss built from them) cover every row of the unpruned sequence; a "
            "patched model routes only the rows its policy keeps (token stages, MLPs removed by structural ops); pass "
            "output_router_logits=False (the config's default) or unpatch first",
        )
    cache = cache_of(kwargs)
    if cache is not None:
        from transformers.cache_utils import DynamicCache

        if not isinstance(cache, DynamicCache) or type(cache).__name__ != "DynamicCache":
            raise InputError(
                "cache",
                f"{type(cache).__name__} is not supported; allowed: DynamicCache "
                "(generate(..., cache_implementation='dynamic') or the default)",
            )
    embeds = kwargs.get("inputs_embeds")
    # adapters whose model splices image features into inputs_embeds itself (the original LLaVA code base)
    # locate visual tokens from that splice, not from input_ids (``Adapter.layout_from_embeds``)
    from_embeds = input_ids is None and embeds is not None and handle.adapter.layout_from_embeds
    if input_ids is None and not from_embeds:
        if embeds is not None:
            raise InputError("input_ids", "are needed to find the visual tokens; inputs_embeds alone is not supported")
        handle.open_state(ForwardState("passthrough", PrefillRecord(0)))
        return None
    B, L = (embeds if from_embeds else input_ids).shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    if past > 0:
        # a decode step or a chunk appended to a cache; a generated token that happens to equal
        # image_token_id is text (no pixels come with it), exactly as in the unpatched model
        for name in handle.adapter.pixel_inputs:
            value = kwargs.get(name)
            if value is not None and not (isinstance(value, dict) and not value):  # {}: no precomputed features
                raise InputError(
                    name,
                    "new images or videos in a chunk appended to an existing cache cannot be pruned consistently; "
                    "send the prompt with its images and videos in one prefill",
                )
        record = handle.session(cache)
        # structural ops also act while decoding (masks over the prompt's visual keys)
        live = record is not None and (record.records or (handle.structural is not None and record.is_visual is not None))
        st = ForwardState("decode" if live else "passthrough", record or PrefillRecord(past))
        st.cache = cache
        n = handle.seams.num_layers
        if live:  # what each layer's input needs, looked up once per prompt, not per layer and step
            record.decode_plan(n)
            if record.gated is None:
                record.gated = decode_gates_apply(handle, record)
            st.decode_gated = record.gated and not torch.is_grad_enabled()
        # every decoder layer sees the L new tokens: recorded here, once (no layer hook records them while decoding)
        st.tokens_per_layer = st.prefill.decode_tokens(L, n)
        handle.open_state(st)
        return None

    mask2d = kwargs.get("attention_mask")
    if mask2d is not None and mask2d.dim() != 2:
        raise InputError("attention_mask", f"must be a 2-D padding mask [batch, length], got {mask2d.dim()}-D")
    if embeds is None and not from_embeds and not _has_image_inputs(handle, kwargs):
        # image placeholder ids without pixels or features: the unpatched model embeds them as text tokens
        record = PrefillRecord(L, is_visual=torch.zeros(B, L, dtype=torch.bool, device=input_ids.device))
        if cache is not None:
            handle.remember(cache, record)
        handle.open_state(ForwardState("passthrough", record, tokens_per_layer=[L] * handle.seams.num_layers))
        return None
    if handle.vision_seams is not None:  # the features must come from this patched tower's last call
        check_features(handle, kwargs)
    layout = handle.adapter.visual_layout(handle.model, input_ids, kwargs)
    n_vis = layout.is_visual.sum(1)
    record = PrefillRecord(L, is_visual=layout.is_visual)
    if cache is not None:
        handle.remember(cache, record)
    if int(n_vis.max()) == 0:  # text-only input: nothing to prune
        handle.open_state(ForwardState("passthrough", record, tokens_per_layer=[L] * handle.seams.num_layers))
        return None
    counts, prev = n_vis.tolist(), n_vis.tolist()
    for i, stage in enumerate(handle.policy.stages):  # fail before any layer runs where we can tell already
        if stage.op == "visual_drop":
            prev = [0] * len(prev)
            continue
        if stage.op not in ("prune", "merge") or stage.is_vision:  # vision budgets count patches per crop
            continue
        k = [stage.budget.count(n, p) for n, p in zip(counts, prev)]
        if adaptive_count(handle, i):  # the budget only caps what the criterion keeps
            k = [min(kb, p) for kb, p in zip(k, prev)]
        prev, _ = fit_budget(handle, i, stage, k, prev)
    st = ForwardState("prefill", record, layout=layout, n_visual=n_vis)
    dev = layout.is_visual.device
    st.valid = mask2d.bool() if mask2d is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
    handle.open_state(st)
    return None


def adaptive_count(handle: "PatchHandle", i: int) -> bool:
    """Whether stage ``i``'s criterion decides its kept count from the input (``Criterion.adaptive_count``)."""
    crit = handle.criteria[i] if i < len(handle.criteria) else None
    return crit is not None and bool(crit.adaptive_count(handle.policy.stages[i].params))


def _has_image_inputs(handle: "PatchHandle", kwargs: dict) -> bool:
    """Whether this forward carries images or videos (pixels or precomputed encoder features)."""
    names = (*handle.adapter.pixel_inputs, "pixel_values", "mm_encoder_outputs")
    for name in names:
        value = kwargs.get(name)
        if value is None or (isinstance(value, dict) and not any(v is not None for v in value.values())):
            continue
        return True
    return False


def _check_budget(i, stage, k, available) -> None:
    for b, (kb, nb) in enumerate(zip(k, available)):
        if kb > nb:
            field = f"stages[{i}].tokens" if stage.budget.tokens is not None else f"stages[{i}].keep"
            raise InputError(field, f"keeps {kb} visual tokens but sample {b} has only {nb} at that point")


def fit_budget(handle: "PatchHandle", i: int, stage: Any, k: list, available: list, has_text: list | None = None):
    """Per-row kept counts of stage ``i`` for a fixed policy serving any valid input.

    A row whose budget is above its visual tokens (``tokens=N`` on a small image), or that has no text after
    its image for a text-guided criterion (``needs_text``), keeps all its visual tokens for this stage; the
    record says which rows and why (``last_trace().stages[i].kept_all``). ``patch(..., strict=True)``: an
    ``InputError`` naming the field instead. Returns ``(counts, {row: why})``.
    """
    strict = getattr(handle, "strict", False)
    if strict:
        _check_budget(i, stage, k, available)
    relaxed = {b: f"budget of {kb} visual tokens is above the row's {nb}; kept all"
               for b, (kb, nb) in enumerate(zip(k, available)) if kb > nb}
    if has_text is not None and getattr(handle.criteria[i], "needs_text", False):
        for b, (t, kb, nb) in enumerate(zip(has_text, k, available)):
            if 0 < nb and kb < nb and not t and b not in relaxed:  # a row kept whole anyway needs no text
                if strict:
                    raise InputError(f"stages[{i}].criterion", f"sample {b} has no instruction text after its visual "
                                     f"tokens; {stage.criterion!r} is guided by the text after the image (put the "
                                     "question after the image)")
                relaxed[b] = f"no text after the image for the text-guided criterion {stage.criterion!r}; kept all"
    return [nb if b in relaxed else kb for b, (kb, nb) in enumerate(zip(k, available))], relaxed


def top_post_hook(handle: "PatchHandle", module, args, kwargs, output):
    st = handle.state
    if st is None:
        return None  # this call was refused before it opened a state
    if st.phase == "prefill" and output is not None:
        # a cache created inside the model (plain forward with use_cache=True) continues this prompt too
        # (transformers >= 5.2x names it ``cache``; earlier 5.x ``past_key_values``)
        cache = cache_of(output) if hasattr(output, "get") else _cache_in_tuple(output)
        if cache is not None:
            handle.remember(cache, st.prefill, replace=False)
    if st.phase == "prefill" and len(st.tokens_per_layer) < handle.seams.num_layers:
        # no decoder layer has a hook (no LLM token stage, ``sites.llm.hooked_layers``): all saw the LM's input
        st.tokens_per_layer = [st.prefill.prompt_len] * handle.seams.num_layers
    handle.close_state()  # the cache reference goes; the state becomes last_trace()
    return None


def _cache_in_tuple(output: Any) -> Any:
    """The KV cache of a ``return_dict=False`` output (a plain tuple), or None."""
    from transformers.cache_utils import Cache

    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Cache)), None)
    return None


def layer_pre_hook(handle: "PatchHandle", j: int, module, args: tuple, kwargs: dict):
    st = handle.state
    if st is None or st.phase == "passthrough":
        return None
    if st.phase != "prefill":
        return _decode_layer_input(handle, st, j, args, kwargs)
    in_kwargs = not args
    hidden = kwargs["hidden_states"] if in_kwargs else args[0]
    tokens = st.tokens_per_layer
    if len(tokens) < j:  # the layers before the first hooked one (``sites.llm.hooked_layers``) saw the LM's input
        tokens.extend([hidden.shape[1]] * (j - len(tokens)))
    kwargs = dict(kwargs)
    pid_in = kwargs.get("position_ids")  # the language model's own, before any change (positions=repack reads it)
    if st.prefill.pre_llm is not None and handle.seams.mask_format == "2d":
        # flash-attention reads gapped position ids at batch 1 as packed sequences; RoPE already lives in cos/sin
        kwargs["position_ids"] = None
    if j == 0:
        st.embeds = hidden  # what text-guided criteria read at layer 0 (a reference, no copy)
    stage_i = handle.stage_at.get(j)
    gather_hidden = False
    drop = stage_i is not None and handle.policy.stages[stage_i].op == "visual_drop"
    if stage_i is not None and (st.scoring is not None or drop):
        local_idx, rec, fused = (_run_drop(handle, st, stage_i, hidden) if drop
                                 else _run_stage(handle, st, stage_i, hidden))
        if fused is not None:  # an LLM-site merge: the reduced hidden states replace the input
            hidden = fused
        elif local_idx is not None:
            # before the first prune current positions are original ones: hidden states join
            # the kwargs' gather (same indices, one launch); later stages index the current sequence
            gather_hidden = st.cur_orig is None
            if not gather_hidden:
                hidden = handle.ops.gather_tokens(local_idx, [hidden])[0]
        if local_idx is not None:
            if handle.repacks_llm:
                _carry_positions(handle, st, rec, local_idx, pid_in, hidden)
            st.cur_orig, st.cur_ok = rec.kept, rec.kept_ok
    if st.cur_orig is not None:
        hidden = _shrink_kwargs(handle, kwargs, st.cur_orig, st.cur_ok, st.prefill.prompt_len, hidden,
                                prefill=True, gather_hidden=gather_hidden)
    if st.cur_pe is not None:  # renumbered positions (positions=repack): this layer's rotary tables and ids
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = st.cur_pe
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = st.cur_pos
    st.tokens_per_layer.append(hidden.shape[1])
    if j in handle.stage_after:  # the next stage scores with this layer: keep its input
        pe = kwargs.get("position_embeddings")
        if pe is None:
            # layers that build their rotary tables inside attention (transformers 4.3x): the adapter's (cos, sin)
            pe = handle.adapter.position_embeddings(module, kwargs, hidden)
        # a family whose masks are not causal (Gemma 3): criteria read this layer's own mask rows (ScoringContext)
        own = allowed_of(kwargs.get("attention_mask"), hidden.shape[0]) if handle.adapter.scoring_reads_layer_mask \
            else None
        st.scoring = (j, module, hidden, pe, own)
        st.captured = {}
    if in_kwargs:
        kwargs["hidden_states"] = hidden
        return args, kwargs
    return (hidden, *args[1:]), kwargs


def _decode_layer_input(handle: "PatchHandle", st: ForwardState, j: int, args: tuple, kwargs: dict):
    """A cached decode step at decoder layer ``j`` (hooked: ``sites.llm.hooked_layers``): the prompt's kept set at
    this layer (``PrefillRecord.decode_plan``), the new tokens appended. Layers between two stages get the same
    incoming mask and kept set: the shrunk mask is built once per step and group, the other layers of the group
    swap in the same tensor. The hidden states are not touched while decoding. A layer whose input needs no
    change (before the first stage; no mask and no padded slot; no position change) returns at once."""
    if st.decode_gated:
        return _decode_gate(handle, st, j, args, kwargs)
    rec = st.prefill.layer_kept[j]
    no_pid = st.prefill.pre_llm is not None and handle.seams.mask_format == "2d"
    if not no_pid and (rec is None or (rec.pos_shift is None and st.prefill.layer_all_ok[j]
                                       and kwargs.get("attention_mask") is None)):
        return None  # (no mask and no padded slot: ``shrink_mask`` would give None again)
    kwargs = dict(kwargs)
    pid_in = kwargs.get("position_ids")  # the language model's own (positions=repack shifts them)
    if no_pid:
        # flash-attention reads gapped position ids at batch 1 as packed sequences; RoPE already lives in cos/sin
        kwargs["position_ids"] = None
    if rec is not None:
        hidden = kwargs["hidden_states"] if not args else args[0]
        mask_in = kwargs.get("attention_mask")
        hit = st.decode_masks.get(id(rec))
        if hit is not None and hit[0] is mask_in:
            kwargs["attention_mask"] = hit[1]
        else:
            _shrink_kwargs(handle, kwargs, rec.kept, rec.kept_ok, st.prefill.prompt_len, hidden, prefill=False,
                           cache=st.cache)
            st.decode_masks[id(rec)] = (mask_in, kwargs["attention_mask"])
        if rec.pos_shift is not None:  # after a positions=repack stage: decode continues the renumbered positions
            _shift_positions(handle, st, rec.pos_shift, kwargs, pid_in, hidden)
    return args, kwargs


def decode_gates_apply(handle: "PatchHandle", record: PrefillRecord) -> bool:
    """Whether this prompt's decode steps (after ``decode_plan``) may go through gates (``sites.routed_layers``):
    the patch allows it (``handle.decode_gates``: one mask object for every layer, no per-layer position-id rule,
    no structural op) and no stage renumbers positions (a shift per layer group: ``positions=repack``).
    ``torch.is_grad_enabled()`` is checked per step: the in-place mask would change a tensor autograd may have saved."""
    return handle.decode_gates and all(r is None or r.pos_shift is None for r in record.layer_kept)


def _decode_gate(handle: "PatchHandle", st: ForwardState, j: int, args: tuple, kwargs: dict):
    """A gated decode step at token stage ``j``'s first layer; the layers after it run without library code.

    The first gate of the step decides for all: no mask and no padded kept slot at any layer -> nothing to change
    anywhere; a 4-D mask tensor (built by the text model in this forward; a caller's 4-D mask is refused at the
    top) -> each gate sets that tensor, in place, to its group's shrunk mask, which every later layer receives
    (``ForwardState.undo`` puts the full mask back when the forward ends); anything else (a 2-D mask, which may be
    the caller's own tensor; no mask but padded kept slots) -> ``decode_gated`` goes False and every layer from
    here on gets its own input (``_decode_layer_input``)."""
    mask = kwargs.get("attention_mask")
    if st.gate_mask is None:
        if (mask is None and all(st.prefill.layer_all_ok)) or all(r is None for r in st.prefill.layer_kept):
            st.gate_mask = ()  # nothing to change at any layer this step
        elif (mask is None or handle.seams.mask_format == "2d" or type(mask) is not torch.Tensor
              or mask.dim() != 4):
            st.decode_gated = False
            return _decode_layer_input(handle, st, j, args, kwargs)
        else:
            full = mask.new_empty(0).set_(mask)  # the full mask, kept while ``mask`` holds the shrunk ones
            st.gate_mask = (mask, full)
            st.undo.append(lambda: mask.set_(full))
    if not st.gate_mask:
        return None
    mask, full = st.gate_mask
    rec = st.prefill.layer_kept[j]
    if rec is None:  # this stage kept everything: the layers up to the next stage see the full mask
        mask.set_(full)
        return None
    hidden = kwargs["hidden_states"] if not args else args[0]
    shrunk = {"attention_mask": full}
    _shrink_kwargs(handle, shrunk, rec.kept, rec.kept_ok, st.prefill.prompt_len, hidden, prefill=False,
                   cache=st.cache)
    mask.set_(shrunk["attention_mask"])
    return None


def _carry_positions(handle: "PatchHandle", st: ForwardState, rec: StageRecord, local_idx: torch.Tensor,
                     pid_in: torch.Tensor | None, hidden: torch.Tensor) -> None:
    """Position ids of the tokens an LLM stage keeps, for the layers after it (prefill; the policy has a
    ``positions=repack`` LLM stage). ``repack``: contiguous from the row's first kept token's position (left
    padding stays masked), and ``rec.pos_shift`` = the language model's next position id minus the renumbered
    next one, which decode steps subtract in the layers after the stage. ``gaps`` after a repack: the kept
    tokens keep the renumbered ids (the shift carries over). Sets ``st.cur_pos`` / ``st.cur_pe``."""
    dev = local_idx.device
    B, L = st.valid.shape
    full = (pid_in if pid_in is not None else torch.arange(L, device=dev)[None]).expand(B, L)  # the LM's own ids
    if st.cur_pos is None:
        before = full if st.cur_orig is None else torch.gather(full, 1, st.cur_orig)
    else:
        before = st.cur_pos
    kept_pos = torch.gather(before, 1, local_idx)
    ok = rec.kept_ok
    shift = next((r.pos_shift for r in reversed(st.prefill.records[:-1]) if r.pos_shift is not None), None)
    if rec.stage.params.get("positions") == "repack":
        first = torch.gather(kept_pos, 1, ok.long().argmax(1, keepdim=True))  # left-packed: first real kept token
        kept_pos = (first + torch.cumsum(ok.long(), 1) - 1).masked_fill(~ok, 0)
        last = full.masked_fill(~st.valid, torch.iinfo(full.dtype).min).amax(1)  # the prompt's last position id
        shift = last - kept_pos[:, -1]
    rec.pos_shift = shift if shift is not None else torch.zeros(B, dtype=torch.long, device=dev)
    st.cur_pos = kept_pos
    st.cur_pe = tuple(handle.seams.rotary_emb(hidden, kept_pos))


def _shift_positions(handle: "PatchHandle", st: ForwardState, shift: torch.Tensor, kwargs: dict,
                     pid_in: torch.Tensor | None, hidden: torch.Tensor) -> None:
    """Decode step, a layer after a ``positions=repack`` stage: its rotary tables (and ids) at the language model's
    position ids minus the row's ``shift``; built once per step for the layers sharing a shift."""
    hit = st.decode_pe.get(id(shift))
    if hit is None or hit[0] is not pid_in:
        if pid_in is None:
            raise InputError("position_ids", "the language model passed no position ids to its decoder layers; "
                             "positions=repack needs them to continue the renumbered positions")
        B, q = hidden.shape[:2]
        pid = pid_in.expand(B, q) - shift[:, None]
        hit = (pid_in, pid, tuple(handle.seams.rotary_emb(hidden, pid)))
        st.decode_pe[id(shift)] = hit
    if kwargs.get("position_embeddings") is not None:
        kwargs["position_embeddings"] = hit[2]
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = hit[1]


def capture_hook(handle: "PatchHandle", j: int, what: str, module, args, output):
    """Forward hook on a scoring layer's ``k_proj`` / ``v_proj``: keep the output so criteria need not recompute it."""
    st = handle.state
    if st is not None and st.phase == "prefill" and st.scoring is not None and st.scoring[0] == j:
        st.captured[what] = output
    return None


def _shrink_kwargs(handle, kwargs, kept, kept_ok, prompt_len, hidden, prefill, cache=None, gather_hidden=False):
    """Gather this layer's incoming kwargs (and, with ``gather_hidden``, ``hidden``) at ``kept``; return hidden.

    In prefill the rotary tables, position ids, a 2-D padding mask of the prompt and the
    hidden states share the indices and go through ONE ``ops.gather_tokens`` call.
    """
    fmt = handle.seams.mask_format
    mask = kwargs.get("attention_mask")
    if prefill:
        pe = kwargs.get("position_embeddings")
        pid = kwargs.get("position_ids")
        # flash-attention reads gapped position ids at batch 1 as packed sequences; RoPE already lives in cos/sin
        pid_in = None if fmt == "2d" else pid
        mask2d = mask if fmt == "2d" and mask is not None and mask.shape[-1] == prompt_len else None
        pe_in = list(pe) if pe is not None else []
        tensors = [hidden if gather_hidden else None, pid_in, mask2d, *pe_in]
        out = handle.ops.gather_tokens(
            kept, tensors, dims=[1, -1, 1, *[1] * len(pe_in)], ok=kept_ok,
            zero_invalid=[False, False, True, *[False] * len(pe_in)],
        )
        if gather_hidden:
            hidden = out[0]
        if pe is not None:
            kwargs["position_embeddings"] = tuple(out[3:])
        if pid is not None:
            kwargs["position_ids"] = out[1]
        if mask2d is not None:  # its kv columns are the kept positions; dropped slots masked (as shrink_mask does)
            kwargs["attention_mask"] = out[2]
            return hidden
    q_len = hidden.shape[1] if not prefill else prompt_len
    if mask is not None:
        kv_len = mask.shape[-1]
    elif prefill:
        kv_len = prompt_len
    else:
        kv_len = cache.get_seq_length(handle.seams.first_full_attention_layer)
    kwargs["attention_mask"] = shrink_mask(mask, fmt, kept, kept_ok, prompt_len, q_len, kv_len, prefill, hidden.dtype)
    return hidden


def _run_stage(handle: "PatchHandle", st: ForwardState, i: int, output: torch.Tensor | None = None):
    """Score stage ``i`` from the kept input of layer ``stage.layer - 1`` (and its ``output``, the input of
    layer ``stage.layer``); select.

    Returns ``(local_idx [B, M'] or None, record, fused)``: the positions of the current sequence
    to keep (None when the stage keeps everything); ``fused`` [B, M', D] is the new hidden state of a merge stage
    (``Criterion.merge`` at site llm, see ``_run_merge``), None for a prune.
    """
    t0 = time.perf_counter()
    stage = handle.policy.stages[i]
    _, layer, hidden, position_embeddings, layer_mask = st.scoring
    captured, st.scoring, st.captured = st.captured, None, {}
    layout = st.layout
    B, M = hidden.shape[:2]
    base = st.cur_orig if st.cur_orig is not None else torch.arange(M, device=hidden.device).expand(B, M)
    ok = st.cur_ok if st.cur_ok is not None else torch.ones(B, M, dtype=torch.bool, device=hidden.device)
    seq_valid = torch.gather(st.valid, 1, base) & ok
    is_vis = torch.gather(layout.is_visual, 1, base) & ok
    n_vis = is_vis.sum(1)
    k_list = [stage.budget.count(n, c) for n, c in zip(st.n_visual.tolist(), n_vis.tolist())]
    adaptive = adaptive_count(handle, i)
    if adaptive:  # the budget caps the criterion's own count: never "above the row's tokens"
        k_list = [min(kb, n) for kb, n in zip(k_list, n_vis.tolist())]
    # instruction text: real non-visual tokens after the row's first visual token
    after_first = torch.cumsum(is_vis.long(), 1) > 0
    text_idx, text_ok = right_packed(seq_valid & ~is_vis & after_first, torch.arange(M, device=hidden.device).expand(B, M))
    k_list, relaxed = fit_budget(handle, i, stage, k_list, n_vis.tolist(), text_ok.any(1).tolist())
    k = torch.tensor(k_list, device=hidden.device)
    tokens_before = M
    if bool((k == n_vis).all()):  # keeps everything: leave the sequence untouched (exactness)
        return None, _noop_record(st, stage, base, ok, is_vis, n_vis, M, t0, relaxed), None
    N = int(n_vis.max())
    vis_idx, vis_ok = right_packed(is_vis, torch.arange(M, device=hidden.device).expand(B, M), N)
    orig_pos = torch.gather(base, 1, vis_idx)
    g = lambda t: torch.gather(t, 1, orig_pos)  # noqa: E731  (layout tensors are indexed by original position)
    last_idx = (seq_valid * torch.arange(M, device=hidden.device)).argmax(1)
    ctx = ScoringContext(
        layer=layer,
        hidden=hidden,
        position_embeddings=position_embeddings,
        seq_valid=seq_valid,
        last_idx=last_idx,
        visual_idx=vis_idx,
        visual_ok=vis_ok,
        orig_pos=orig_pos,
        row=g(layout.row),
        col=g(layout.col),
        segment=g(layout.segment),
        image=g(layout.image),
        is_newline=g(layout.is_newline),
        coords_known=layout.coords_known,
        keep=k,
        text_idx=text_idx,
        text_ok=text_ok,
        keys=captured.get("k"),
        values=captured.get("v"),
        output=output,
        ops=handle.ops,
        embeds=st.embeds,
        embeds_visual=layout.is_visual & st.valid,
        embeds_valid=st.valid,
        cur_pos=base,
        layer_mask=layer_mask,
    )
    if stage.op == "merge":
        return _run_merge(handle, st, i, ctx, base, ok, seq_valid, is_vis, n_vis, output, relaxed, t0)
    params = stage.criterion_params  # without the stage keys (positions)
    with torch.no_grad():
        scores = handle.criteria[i].score(ctx, **params)
    if scores.shape != vis_idx.shape:
        raise RuntimeError(f"criterion {stage.criterion!r} returned scores of shape {tuple(scores.shape)}, expected {tuple(vis_idx.shape)}")
    sel, sel_ok = handle.criteria[i].select(ctx, scores, **params)
    sel_ok = sel_ok & torch.gather(vis_ok, 1, sel)
    kept_local = torch.gather(vis_idx, 1, sel)
    keep_mask = torch.zeros(B, M + 1, dtype=torch.bool, device=hidden.device)
    keep_mask.scatter_(1, kept_local.masked_fill(~sel_ok, M), True)
    keep_mask = keep_mask[:, :M] | (seq_valid & ~is_vis)
    local_idx, local_ok = left_packed(keep_mask)
    kept = torch.gather(base, 1, local_idx)
    kept_visual = to_original(st, torch.gather(base, 1, kept_local))  # the trace speaks original positions
    rec = StageRecord(
        stage=stage,
        kept=kept,
        kept_ok=local_ok,
        kept_visual=kept_visual,
        kept_visual_ok=sel_ok,
        merged_into=sources_after(st, kept_visual, sel_ok),
        visual_before=n_vis,
        visual_after=sel_ok.sum(1),
        tokens_before=tokens_before,
        tokens_after=local_idx.shape[1],
        seconds=time.perf_counter() - t0,
        relaxed=relaxed,
    )
    st.prefill.records.append(rec)
    track_prune(st, local_idx, local_ok)
    return local_idx, rec, None


def _noop_record(st, stage, base, ok, is_vis, n_vis, M, t0, relaxed) -> StageRecord:
    vis_orig, vis_ok = right_packed(is_vis, to_original(st, base))
    rec = StageRecord(stage, base, ok, vis_orig, vis_ok, n_vis, n_vis, M, M, time.perf_counter() - t0, noop=True,
                      merged_into=sources_after(st, vis_orig, vis_ok), relaxed=relaxed)
    st.prefill.records.append(rec)
    return rec


def _run_merge(handle: "PatchHandle", st: ForwardState, i: int, ctx: ScoringContext, base, ok, seq_valid, is_vis,
               n_vis, output, relaxed, t0):
    """An LLM-site merge stage (``Reduction`` chains over the current sequence, e.g. SparseVLM's recycling).

    The criterion's ``merge(ctx, **params)`` returns ``Reduction``s over the current sequence (the tokens entering
    layer ``stage.layer``); every real text token must survive as itself, dropped / fused tokens must be visual.
    The fused hidden states (``Reduction.fuse`` of the scoring layer's output, mean or size-weighted) replace the
    sequence; each slot takes the position, attention-mask row / column and KV-cache column of its representative
    (a token of the current sequence, kept in sequence order), exactly as a kept token of a prune. Layers below
    the stage keep the full prefix in their caches, as computed (as a prune leaves them). Sizes and the source
    map (``StageRecord.merged_into``, ``StageTrace.sources``) follow every later stage.
    """
    stage = handle.policy.stages[i]
    B, M = output.shape[:2]
    dev = output.device
    params = {k: v for k, v in stage.params.items() if k not in ("positions", "newlines")}
    with torch.no_grad():
        chain = handle.criteria[i].merge(ctx, **params)
    size = st.cur_size
    if size is None:  # tokens per slot: 1, or what a pre_llm merge left in each layer-0 slot
        pre = st.prefill.pre_llm
        size = (torch.gather(pre.size.to(output.dtype), 1, base) if pre is not None and pre.size is not None
                else torch.ones(B, M, dtype=output.dtype, device=dev))
    ar = torch.arange(M, device=dev).expand(B, M)
    rep, rok, hidden = ar, seq_valid, output
    dst_all = ar  # current token -> slot of the output (-1: gone)
    for r in chain:
        if r.dst.shape[1] != rep.shape[1]:
            raise RuntimeError(f"criterion {stage.criterion!r}: a Reduction over {r.dst.shape[1]} tokens, the sequence "
                               f"has {rep.shape[1]}")
        hidden = r.fuse(hidden, size)
        size = r.add(size)
        dst_all = torch.where(dst_all >= 0, torch.gather(r.dst, 1, dst_all.clamp(min=0)), -1)
        rep, rok = r.take(rep), r.ok
    text = seq_valid & ~is_vis
    if not bool((torch.gather(rep, 1, dst_all.clamp(min=0)) == ar)[text].all() and (dst_all >= 0)[text].all()):
        raise RuntimeError(f"criterion {stage.criterion!r} dropped or fused a text token; a merge stage reduces "
                           "visual tokens only")
    steps = rep[:, 1:] - rep[:, :-1]
    if not bool(((steps > 0) | ~rok[:, 1:] | ~rok[:, :-1]).all()):
        raise RuntimeError(f"criterion {stage.criterion!r}: merge slots must keep the sequence order")
    if rep.shape[1] == M and bool((rok == seq_valid).all()) and bool((rep == ar).all()):  # every token its own slot
        return None, _noop_record(st, stage, base, ok, is_vis, n_vis, M, t0, relaxed), None
    kept = torch.gather(base, 1, rep)
    vis_slot = torch.gather(is_vis, 1, rep) & rok
    kept_visual, kept_visual_ok = right_packed(vis_slot, to_original(st, kept))
    # the source map over layer-0 tokens: their current slot, routed through the reductions
    owner = st.llm_owner if st.llm_owner is not None else _owner_from(base, ok, st.valid.shape[1])
    owner = torch.where(owner >= 0, torch.gather(dst_all, 1, owner.clamp(min=0)), -1)
    st.llm_owner, st.cur_size = owner, size
    rec = StageRecord(
        stage=stage, kept=kept, kept_ok=rok, kept_visual=kept_visual, kept_visual_ok=kept_visual_ok,
        merged_into=None, visual_before=n_vis, visual_after=vis_slot.sum(1), tokens_before=M,
        tokens_after=rep.shape[1], seconds=time.perf_counter() - t0, relaxed=relaxed,
    )
    rec.merged_into = sources_after(st, kept_visual, kept_visual_ok, slots=kept)
    st.prefill.records.append(rec)
    return rep, rec, hidden


def _owner_from(base: torch.Tensor, ok: torch.Tensor, L0: int) -> torch.Tensor:
    """``[B, L0]``: the current slot of each layer-0 token (``base`` [B, M] its layer-0 positions), -1 when gone."""
    B, M = base.shape
    owner = torch.full((B, L0 + 1), -1, dtype=torch.long, device=base.device)
    owner.scatter_(1, base.masked_fill(~ok, L0), torch.arange(M, device=base.device).expand(B, M))
    return owner[:, :L0]


def track_prune(st: ForwardState, local_idx: torch.Tensor | None, local_ok: torch.Tensor | None) -> None:
    """After an LLM-site merge, a later prune (or drop) carries the source map and sizes along."""
    if st.llm_owner is None or local_idx is None:
        return
    B, Mp = local_idx.shape
    M = st.cur_size.shape[1]
    new_slot = torch.full((B, M + 1), -1, dtype=torch.long, device=local_idx.device)
    new_slot.scatter_(1, local_idx.masked_fill(~local_ok, M), torch.arange(Mp, device=local_idx.device).expand(B, Mp))
    owner = st.llm_owner
    st.llm_owner = torch.where(owner >= 0, torch.gather(new_slot[:, :M], 1, owner.clamp(min=0)), -1)
    st.cur_size = torch.gather(st.cur_size, 1, local_idx)


def _run_drop(handle: "PatchHandle", st: ForwardState, i: int, hidden: torch.Tensor):
    """``visual_drop`` stage ``i``: every visual token leaves the sequence (no criterion, no budget).

    Returns ``(local_idx [B, M'] or None, record)`` like ``_run_stage``; ``None`` when no row
    has a visual token left (the sequence is untouched).
    """
    t0 = time.perf_counter()
    stage = handle.policy.stages[i]
    B, M = hidden.shape[:2]
    base = st.cur_orig if st.cur_orig is not None else torch.arange(M, device=hidden.device).expand(B, M)
    ok = st.cur_ok if st.cur_ok is not None else torch.ones(B, M, dtype=torch.bool, device=hidden.device)
    seq_valid = torch.gather(st.valid, 1, base) & ok
    is_vis = torch.gather(st.layout.is_visual, 1, base) & ok
    n_vis = is_vis.sum(1)
    none = torch.zeros(B, 0, dtype=torch.long, device=hidden.device)
    if int(n_vis.max()) == 0:
        rec = StageRecord(stage, base, ok, none, none.bool(), n_vis, n_vis, M, M, time.perf_counter() - t0, noop=True)
        st.prefill.records.append(rec)
        return None, rec, None
    local_idx, local_ok = left_packed(seq_valid & ~is_vis)
    rec = StageRecord(
        stage=stage, kept=torch.gather(base, 1, local_idx), kept_ok=local_ok, kept_visual=none,
        kept_visual_ok=none.bool(), visual_before=n_vis, visual_after=torch.zeros_like(n_vis),
        tokens_before=M, tokens_after=local_idx.shape[1], seconds=time.perf_counter() - t0,
    )
    st.prefill.records.append(rec)
    track_prune(st, local_idx, local_ok)
    return local_idx, rec, None
