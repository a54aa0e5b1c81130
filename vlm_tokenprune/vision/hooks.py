"""Hooks of a vision-site stage, and its hand-over to the language model's input.

- tower forward pre-hook: open a ``VisionRun`` for this batch of crops (kept on the handle: in
  ``generate()`` the tower runs before the prefill forward, outside any ``ForwardState``).
- encoder-layer forward pre-hooks: up to the feature layer the criterion may shorten the layer's
  input (``before_layer``); every layer receives the run's additive attention bias, if any,
  as its ``attention_mask`` (the tower's own attention backend runs; nothing is forced to eager).
- q/k/v projection forward hooks on the layers a criterion scores from: keep their outputs.
- pixel-shuffle / pooling towers (InternVL, Gemma 3: ``VisionSeams.groups``): the feature layer's reduced output
  goes back onto the full patch grid (``groups.widen_to_grid``) so the model's own shuffle (pooling) packs it; a
  forward pre-hook on the projector (Gemma 3: on ``VisionSeams.pack_point``, after the pooling) moves the run to
  LLM-token (group) units (``groups.to_groups``) and keeps the kept groups' tokens (InternVL), or, with
  ``VisionSeams.project_kept_only`` False (Gemma 3), lets every pooled token be projected and the projector hook
  takes the kept rows (the kept tokens then equal the unpruned model's bit for bit).
- towers without CLS (SigLIP of Gemma 3, ``VisionSeams.cls_token``): criteria see a virtual zero CLS row at index
  0 of the feature layer's output (slot 0 of the run), dropped before the projector.
- projector forward hook: widen the reduced features back to the full layout (each surviving
  token at its original patch slot, empty slots zero), so HF's ``masked_scatter`` sees one
  feature per placeholder; the run becomes a ``VisionOutcome`` on the handle.
- LLaVA-NeXT: an instance-level wrapper of ``pack_image_features`` (undone by ``unpatch()``)
  packs (crop, slot) indices like the features, mapping every placeholder to its crop slot.
- ``lm_reduction``: called by the pre-LLM path (``sites.pre_llm``) with the outcome;
  returns the ``Reduction`` that drops the empty slots (a fused token keeps its destination's
  slot; its sources are the patches fused into it). The outcome of the LAST tower call serves every
  prefill until the next tower call (``generate(use_cache=False)`` re-runs the prefill on features
  computed once); its feature count must match the prompt's image tokens.
"""
from __future__ import annotations

import functools
import inspect
import time
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..marking import mark_hook
from ..lm_input import apply_reduction
from ..reduction import Reduction
from ..selection import right_packed
from .base import VisionCriterion, tower_attention
from .groups import to_groups, widen_to_grid
from ..state import StageRecord
from .state import VisionOutcome, VisionRun

if TYPE_CHECKING:
    from ..adapters.base import VisionSeams
    from ..handle import PatchHandle
    from ..state import ForwardState


def vision_stage_index(policy: Any) -> int | None:
    return next((i for i, s in enumerate(policy.stages) if s.is_vision), None)


def install(handle: "PatchHandle", vs: "VisionSeams") -> None:
    """Register the vision hooks of the policy's vision stage on the handle (after ``check``)."""
    i = vision_stage_index(handle.policy)
    stage, crit = handle.policy.stages[i], handle.criteria[i]
    handle.add_hook(f"{type(vs.tower).__name__}: forward pre-hook (open vision stage {i})",
                vs.tower.register_forward_pre_hook(mark_hook(functools.partial(_tower_pre, handle, vs, i)), with_kwargs=True))
    for j, layer in enumerate(vs.layers):
        role = f"vision stage {i}: {stage.criterion} may reduce the input" if j <= vs.feature_layer else "pass the attention bias"
        handle.add_hook(f"vision encoder layer {j}: forward pre-hook ({role})",
                    layer.register_forward_pre_hook(mark_hook(functools.partial(_layer_pre, handle, vs, j)), with_kwargs=True))
    if vs.bias_in_attention and crit.uses_bias(stage):
        for j in range(len(vs.layers)):
            handle.add_hook(f"vision encoder layer {j}: {vs.attention_name} forward pre-hook (vision stage {i}: the "
                            "attention bias, its layer taking no mask)",
                            tower_attention(vs, j).register_forward_pre_hook(
                                mark_hook(functools.partial(_attention_pre, handle)), with_kwargs=True))
    for j in crit.capture_layers(vs, stage):
        for what, name in vs.projections:
            handle.add_hook(f"vision encoder layer {j}: {vs.attention_name}.{name} forward hook (capture {what} for "
                            f"vision stage {i})",
                            getattr(tower_attention(vs, j), name).register_forward_hook(
                                mark_hook(functools.partial(_capture, handle, j, what))))
    if type(crit).after_feature_layer is not VisionCriterion.after_feature_layer or vs.groups is not None:
        fl = vs.layers[vs.feature_layer]
        what = f"{stage.criterion} reduces the feature layer's output" if vs.groups is None else (
            f"{stage.criterion} may reduce the feature layer's output; the kept groups go back onto the full grid")
        handle.add_hook(f"vision encoder layer {vs.feature_layer}: forward hook, prepended (vision stage {i}: "
                    f"{what})",
                    fl.register_forward_hook(mark_hook(functools.partial(_feature_post, handle, vs)), prepend=True))
    if vs.groups is not None:
        point = vs.projector if vs.pack_point is None else vs.pack_point
        handle.add_hook(f"{type(point).__name__}: forward pre-hook (vision stage {i}: only the kept groups' LLM "
                        "tokens (pixel-shuffled / pooled) are projected)",
                        point.register_forward_pre_hook(mark_hook(functools.partial(_projector_pre, handle, vs))))
    handle.add_hook(f"{type(vs.projector).__name__}: forward hook (widen reduced features to the full layout)",
                vs.projector.register_forward_hook(mark_hook(functools.partial(_projector_post, handle, vs))))
    if vs.pack_owner is not None:
        original = vs.pack_owner.pack_image_features
        handle.swap_attr(vs.pack_owner, "pack_image_features", functools.partial(_pack, handle, vs, original))
        handle.add_hook(f"{type(vs.pack_owner).__name__}.pack_image_features: instance wrapper (maps placeholders "
                        "to crop slots; undone by unpatch)")
    for name, field, _, why in vs.refuse_calls:
        refuse = functools.partial(_refused, i, name, field, why)
        refuse.__signature__ = inspect.signature(getattr(vs.pack_owner, name))  # generate() reads its parameters
        handle.swap_attr(vs.pack_owner, name, refuse)
        handle.add_hook(f"{type(vs.pack_owner).__name__}.{name}: instance wrapper (refused by name while vision "
                        f"stage {i} is patched in; undone by unpatch)")


# -- hooks ------------------------------------------------------------------------------------------
def _tower_pre(handle: "PatchHandle", vs: "VisionSeams", i: int, module, args: tuple, kwargs: dict):
    pixels = kwargs.get("pixel_values", args[0] if args else None)
    if pixels is None:
        return None
    st = handle.policy.stages[i]
    handle.vision_run = VisionRun.open(i, st, handle.criteria[i], pixels.shape[0], vs.n_patches, pixels.device,
                                       n_tokens=vs.n_tokens)
    handle.vision_outcome = None
    return None


def _layer_pre(handle: "PatchHandle", vs: "VisionSeams", j: int, module, args: tuple, kwargs: dict):
    run = handle.vision_run
    if run is None:
        return None
    in_kwargs = not args
    hidden = kwargs["hidden_states"] if in_kwargs else args[0]
    new = hidden
    if j <= vs.feature_layer:
        t0 = time.perf_counter()
        with torch.no_grad():
            new = run.criterion.before_layer(run, j, module, hidden, vs)
        run.seconds += time.perf_counter() - t0
    run.tokens_per_layer.append(new.shape[1])
    if new is hidden and (run.bias is None or vs.bias_in_attention):
        return None
    args, kwargs = list(args), dict(kwargs)
    if in_kwargs:
        kwargs["hidden_states"] = new
    else:
        args[0] = new
    if run.bias is not None and not vs.bias_in_attention:
        mask_in_args = len(args) > 1
        mask = args[1] if mask_in_args else kwargs.get("attention_mask")
        if mask is not None:
            raise InputError("attention_mask", "the vision tower received an attention mask; a vision-site stage that "
                             "biases attention (MCTF proportional attention) allows none")
        bias = run.bias.to(new.dtype)
        if mask_in_args:
            args[1] = bias
        else:
            kwargs["attention_mask"] = bias
    return tuple(args), kwargs


def _attention_pre(handle: "PatchHandle", module, args: tuple, kwargs: dict):
    """Towers whose layers take no mask (InternViT): the run's attention bias reaches the attention module."""
    run = handle.vision_run
    if run is None or run.bias is None:
        return None
    if kwargs.get("attention_mask") is not None or len(args) > 1:
        raise InputError("attention_mask", "the vision tower's attention received a mask; a vision-site stage that "
                         "biases attention (MCTF proportional attention) allows none")
    hidden = kwargs["hidden_states"] if not args else args[0]
    return args, {**kwargs, "attention_mask": run.bias.to(hidden.dtype)}


def _feature_post(handle: "PatchHandle", vs: "VisionSeams", module, args, output):
    """The feature layer returned: the criterion may reduce its output (``after_feature_layer``)."""
    run = handle.vision_run
    if run is None:
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    given = hidden
    if not vs.cls_token:  # SigLIP: criteria see a virtual CLS row (zeros) at index 0, removed again below
        hidden = torch.cat([hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2]), hidden], dim=1)
    t0 = time.perf_counter()
    with torch.no_grad():
        new = run.criterion.after_feature_layer(run, hidden, vs)
    run.seconds += time.perf_counter() - t0
    if new is not hidden and (new.shape[1] != run.length or not bool((run.ident[:, 0] == 0).all())):
        raise RuntimeError(f"vision criterion {run.stage.criterion!r}: after_feature_layer must return one token per "
                           "current token of the run (run.reassign) with CLS kept at index 0")
    if vs.mask_only and new is not hidden:  # OneVision: mark the dropped patches; every patch goes on to the projector
        if bool((run.size != 1).any()) or run.length == 1:
            raise RuntimeError(f"vision criterion {run.stage.criterion!r} merges tokens; a mask-only tower keeps or drops")
        T0 = run.owner.shape[1]
        ar = torch.arange(T0, device=run.owner.device).expand_as(run.owner)
        run.ident, run.owner = ar.clone(), torch.where(run.owner >= 0, ar, -1)
        run.size = torch.ones(run.owner.shape, device=run.owner.device)
        return None
    if vs.groups is not None and run.changed:  # the model's own pixel shuffle / pooling packs the full grid;
        new = widen_to_grid(run, new, vs.groups)  # _projector_pre keeps the kept groups' tokens
    if new is hidden:
        return None
    if not vs.cls_token:
        new = new[:, 1:].contiguous()
        if new.shape[1] != given.shape[1]:
            raise RuntimeError("a tower without CLS hands its projector the full patch grid")
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _capture(handle: "PatchHandle", j: int, what: str, module, args, output):
    run = handle.vision_run
    if run is not None:
        run.captured[what] = (j, output)
    return None


def _projector_pre(handle: "PatchHandle", vs: "VisionSeams", module, args):
    """Grouped towers: the LLM tokens about to be projected ``[n, G, C]`` (every token of every crop, shuffled /
    pooled by the model from the widened grid) -> the kept groups' tokens ``[n, K, C]``; the run now counts groups."""
    run = handle.vision_run
    if run is None:
        return None
    x = args[0]
    if x.dim() != 3 or x.shape[1] != vs.groups.shape[0]:
        raise RuntimeError(f"projector input {tuple(x.shape)} is not {vs.groups.shape[0]} LLM tokens per crop")
    kept = to_groups(run, vs.groups).to(x.device)  # also when nothing left: the outcome counts LLM tokens
    if not run.changed:
        return None
    if not vs.project_kept_only:  # Gemma 3: every pooled token is projected, the kept ones taken after (bit-exact)
        run.scratch["kept_groups"] = kept
        return None
    return (torch.gather(x, 1, kept[..., None].expand(-1, -1, x.shape[-1])), *args[1:])


def _projector_post(handle: "PatchHandle", vs: "VisionSeams", module, args, output):
    run, handle.vision_run = handle.vision_run, None
    if run is None:
        return None
    offset = 1 if vs.select_strategy == "default" else 0
    handle.vision_outcome = VisionOutcome(run.stage_index, run.ident, run.owner, offset, list(run.tokens_per_layer),
                                       run.seconds)
    if not run.changed:
        handle.vision_outcome.produced(output)
        return None
    n, T = run.ident.shape
    kept = run.scratch.pop("kept_groups", None)
    if kept is not None:  # the projector ran on every LLM token of the crop: take the kept groups' rows
        output = torch.gather(output, 1, kept.to(output.device)[..., None].expand(-1, -1, output.shape[-1]))
    if output.shape[:2] != (n, T - offset):
        raise RuntimeError(f"projector output {tuple(output.shape)} does not match the reduced tower ({n} crops x {T - offset})")
    width = run.owner.shape[1] - offset
    slot = (run.ident[:, offset:] - offset).to(output.device)
    full = output.new_zeros(n, width, output.shape[-1])
    full = full.scatter(1, slot[..., None].expand(-1, -1, output.shape[-1]), output)
    handle.vision_outcome.produced(full)
    return full


def check_features(handle: "PatchHandle", kwargs: dict) -> None:
    """Top-level pre-hook of a prefill with a vision stage: pixels mean the tower runs inside this forward
    (any earlier outcome is dropped); precomputed ``mm_encoder_outputs`` must be the features of this patched
    tower's LAST call (``generate()`` encodes once, then passes them), else the kept set would be another
    image's: refused (docs/bad-inputs.md row 51). Packed towers (Qwen3-VL, ``vision.packed``): videos refused."""
    if getattr(handle.vision_seams, "packed", None) is not None and (
            kwargs.get("pixel_values_videos") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("video") is not None):
        raise InputError("pixel_values_videos", "a vision-site stage on this packed vision tower (Qwen2-VL / Qwen3-VL) "
                         "is defined for images only (its rule runs per image); allowed: images (pixel_values), or a site "
                         "llm / pre_llm stage for prompts with videos")
    for name, field, key, why in getattr(handle.vision_seams, "refuse_calls", ()):  # OneVision: videos
        if kwargs.get(field) is not None or (kwargs.get("mm_encoder_outputs") or {}).get(key) is not None:
            raise InputError(field, f"{field} (or mm_encoder_outputs[{key!r}]) with a vision-site stage: {why}")
    if kwargs.get("pixel_values") is not None:
        handle.vision_outcome = None
        return
    enc = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    if enc is None:
        return
    feats = getattr(enc, "pooler_output", None)
    feats = [feats] if isinstance(feats, torch.Tensor) else list(feats or [])
    out = handle.vision_outcome
    if out is None or not feats or not all(out.made(t) for t in feats):
        raise InputError(
            "pixel_values", "mm_encoder_outputs holds image features that this patched model's vision tower did not "
            "compute in its last call (computed before patch(), by another model, or for other images), so the vision "
            "stage's kept set would not be theirs; allowed: pass pixel_values, or features from get_image_features() "
            "called on the patched model right before this forward")


def _refused(i: int, name: str, field: str, why: str, *args, **kwargs):
    raise InputError(field, f"{name}() runs the vision tower that vision stage {i} (site vision) is patched into: {why}")


def _pack(handle: "PatchHandle", vs: "VisionSeams", original, image_features, *args, **kwargs):
    """The model's own ``pack_image_features`` (LLaVA-NeXT, OneVision); on index features ``(crop, slot, u^2)``
    (``u = crop * width + slot``, float64) it maps every packed feature to its crop slot. A packed feature whose
    index is not one patch's (``u`` not an integer, or the mean of ``u^2`` above ``u^2``: a weighted mix of several
    patches, OneVision's ``anyres_max`` bilinear resize) makes its image keep ALL its tokens (``mask_only``
    towers; ``patch(strict=True)``: ``InputError``); its features then take its crops' slots in order."""
    out = original(image_features, *args, **kwargs)
    o = handle.vision_outcome
    if o is not None:  # the packed features are this tower call's too (check_features)
        o.produced(*([out[0]] if isinstance(out[0], torch.Tensor) else list(out[0])))
    if o is None or o.slots is not None:
        return out
    call = inspect.signature(original).bind(image_features, *args, **kwargs)
    ids, crops, start = [], [], 0
    for f in image_features:  # [crops of this image, slots, D]
        W = f.shape[1]
        c = torch.arange(start, start + f.shape[0], dtype=torch.float64)[:, None].expand(-1, W)
        s = torch.arange(W, dtype=torch.float64)[None, :].expand(f.shape[0], -1)
        ids.append(torch.stack([c, s, (c * W + s) ** 2], dim=-1))
        crops.append(range(start, start + f.shape[0]))
        start += f.shape[0]
    call.arguments["image_features"] = ids
    if call.arguments.get("image_newline") is not None:
        call.arguments["image_newline"] = torch.full((3,), -1.0, dtype=torch.float64)
    packed, _ = original(*call.args, **call.kwargs)
    slots = []
    for j, (p, cr) in enumerate(zip(packed, crops)):
        W = image_features[j].shape[1]
        feat = p[:, 1] >= 0
        u = p[:, 0] * W + p[:, 1]
        mixed = feat & (((p[:, :2] - p[:, :2].round()).abs().amax(1) > 1e-6) | ((p[:, 2] - u ** 2).abs() > 1e-3))
        sl = p[:, :2].round().long()
        if bool(mixed.any()):
            i = o.stage_index
            why = (f"image {j} of the batch: pack_image_features resizes its unpadded anyres grid bilinearly "
                   f"({_aspect(call)}), so its packed tokens mix neighbouring patches; kept all its tokens")
            if getattr(handle, "strict", False):
                raise InputError(f"stages[{i}]", f"vision stage {i} cannot reduce {why[:-len('; kept all its tokens')]}"
                                 "; allowed: images whose unpadded grid fits the model's anyres_max budget, or "
                                 "patch(strict=False) to keep such an image whole")
            if not vs.mask_only or o.ident.shape != o.owner.shape:
                raise RuntimeError("a resized image needs a mask-only vision stage")
            k = torch.arange(int(feat.sum()))
            sl[feat] = torch.stack([cr.start + k // W, k % W], dim=1)
            o.owner[cr.start:cr.stop] = torch.arange(o.owner.shape[1], device=o.owner.device)
            o.kept_all.update({c: why for c in cr})
        slots.append(sl)
    o.slots = torch.cat(slots).to(o.owner.device)
    return out


def _aspect(call) -> str:
    a = call.arguments.get("vision_aspect_ratio")
    return f"vision_aspect_ratio={a!r}" if a is not None else "anyres"


# -- hand-over to the language model ------------------------------------------------------------------
class SlotReduction(Reduction):
    """A reduction whose slots already hold their final feature: the tower fused each group into its
    destination's placeholder, so ``fuse`` takes the representative's row (bit for bit) while sizes
    and the source map still collect every placeholder of the group."""

    def fuse(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        return self.take(x)


def lm_prefill(handle: "PatchHandle", st: "ForwardState", kwargs: dict, stage: Any, t0: float) -> None:
    """The vision stage's part of the pre-LLM path: drop the empty slots of the language model's input
    through ``lm_input.apply_reduction`` (positions, mask, source map, rebased state); a no-op record
    when the tower kept every token (the input is untouched)."""
    hidden = kwargs.get("inputs_embeds")
    if hidden is None:
        raise InputError("inputs_embeds", "a vision stage needs the language model to receive inputs_embeds")
    chain = lm_reduction(handle, st, hidden, drop_newlines=stage.params.get("newlines") == "drop")
    t0 -= st.vision.seconds  # the stage's time includes the scoring inside the tower
    relaxed = _relaxed_rows(st, hidden.shape[1])
    if chain:
        apply_reduction(handle, st, kwargs, chain, stage=stage, positions=stage.params["positions"], t0=t0)
        st.prefill.records[-1].relaxed = relaxed
        return
    B, L = hidden.shape[:2]
    ar = torch.arange(L, device=hidden.device).expand(B, L)
    is_vis = st.layout.is_visual & st.valid
    n_vis = is_vis.sum(1)
    vis, vis_ok = right_packed(is_vis, ar)
    st.prefill.records.append(StageRecord(stage, ar, st.valid, vis, vis_ok, n_vis, n_vis, L, L,
                                          time.perf_counter() - t0, noop=True, relaxed=relaxed))


def _relaxed_rows(st: "ForwardState", L: int) -> dict:
    """``{row: why}`` of the rows holding an image that kept all its tokens (``VisionOutcome.kept_all``)."""
    out = st.vision
    if not out.kept_all:
        return {}
    crop = out.feature_slots()[:, 0].cpu()
    flat = st.layout.is_visual.flatten().nonzero().flatten().cpu()
    rows: dict = {}
    for c, why in out.kept_all.items():
        for b in sorted(set((flat[crop == c] // L).tolist())):
            rows.setdefault(b, why)
    return rows


def _copies(is_visual: torch.Tensor, n_features: int) -> int:
    """``k`` > 1 when the prompt rows are ``k`` consecutive copies of each row of the batch the tower encoded
    (``generate()``'s ``repeat_interleave`` for beams / returned sequences): ``k`` times as many image tokens as
    features, every group of ``k`` rows with the same image-token mask. Else 1."""
    n = int(is_visual.sum())
    B = is_visual.shape[0]
    if not n_features or n == n_features or n % n_features:
        return 1
    k = n // n_features
    if B % k or not bool((is_visual.view(B // k, k, -1) == is_visual[::k, None]).all()):
        return 1
    return k


def lm_reduction(handle: "PatchHandle", st: "ForwardState", hidden: torch.Tensor,
                 drop_newlines: bool = False) -> list[Reduction]:
    """The reduction of the language model's input ``hidden`` ``[B, L, D]`` that drops the tower's empty slots.

    ``[]`` when the tower kept every token. Otherwise one ``SlotReduction``: every placeholder
    whose crop slot holds a surviving token stays (a fused token sits at its destination's
    placeholder), the others are sent to the placeholder of the token they were fused into
    (their sources), or dropped (pruned, or fused into a token whose slot LLaVA-NeXT's
    unpadding removed); text tokens stay, and ``image_newline`` tokens too unless ``drop_newlines`` (the stage's
    ``newlines=drop``: FlowCut's official LLaVA-NeXT path packs the kept patches without them).
    """
    out = handle.vision_outcome  # kept: generate(use_cache=False) re-runs the prefill on the same features
    if out is None:
        raise InputError(
            "pixel_values", "the prompt has image tokens but the patched vision tower did not run for them "
            "(image features computed before patch()?); pass pixel_values to the patched model")
    st.vision = out
    layout, valid = st.layout, st.valid
    B, L = hidden.shape[:2]
    dev = hidden.device
    slots = out.feature_slots().to(dev)
    flat = layout.is_visual.flatten().nonzero().flatten()
    copies = _copies(layout.is_visual, slots.shape[0])
    if copies > 1:  # generate(num_beams / num_return_sequences > 1) repeated each row after the tower ran once
        per_row = layout.is_visual.sum(1)[::copies].tolist()
        st.vision = out = out.for_copies(per_row, copies)
        slots = out.feature_slots().to(dev)
    if flat.numel() != slots.shape[0]:
        raise InputError("input_ids", f"{flat.numel()} image tokens but the last vision-tower run gave "
                         f"{slots.shape[0]} features; run the patched model on the pixels of this prompt")
    feat = slots[:, 1] >= 0  # False: an image_newline
    if not out.changed and not (drop_newlines and not bool(feat.all())):
        return []
    ident, owner = out.ident.to(dev), out.owner.to(dev)
    n, T0 = owner.shape
    width = T0 - out.offset
    crop, slot = slots[:, 0], slots[:, 1]
    lpos = torch.full((n, width), -1, dtype=torch.long, device=dev)
    lpos[crop[feat], slot[feat]] = flat[feat]
    cur = owner[crop.clamp(min=0), (slot + out.offset).clamp(min=0)]
    rep = torch.where(cur >= 0, ident[crop.clamp(min=0), cur.clamp(min=0)] - out.offset, -1)
    rep_flat = torch.where(rep >= 0, lpos[crop.clamp(min=0), rep.clamp(min=0)], -1)
    vis_target = torch.where(feat, rep_flat, -1 if drop_newlines else flat)
    target = torch.where(valid & ~layout.is_visual, torch.arange(L, device=dev).expand(B, L), -1).flatten()
    row_start = (flat // L) * L
    target[flat] = torch.where(vis_target >= 0, vis_target - row_start, -1)
    return [SlotReduction.from_targets(target.view(B, L))]
