"""The original LLaVA code base (``llava`` package: PyPI ``llava-torch``, haotian-liu/LLaVA 1.2.x).

``LlavaLlamaForCausalLM`` splices image features into the sequence itself
(``prepare_inputs_labels_for_multimodal``: each ``IMAGE_TOKEN_INDEX`` placeholder of
``input_ids`` becomes that image's features), in ``forward`` and, before any module runs, in
``generate``. So visual positions cannot come from placeholder ids. This adapter:

- wraps ``prepare_inputs_labels_for_multimodal`` on the model INSTANCE (an instance attribute
  set by ``patch()`` and deleted by ``unpatch()``; the class is never touched). The wrapper
  calls the original and records where each image's features landed, per row (it mirrors the
  splice: text segments, features per image and crop, truncation, left or right padding, and
  checks the result against the spliced length);
- makes the inner ``LlavaLlamaModel`` (whose forward always receives the spliced
  ``inputs_embeds``, or ``input_ids`` while decoding) the engine's top module, and the language
  model for ``pre_llm`` stages (they reduce the spliced ``inputs_embeds``: for a prune with
  ``positions=repack`` exactly what shrinking the features at the projector would give);
- gives vision-site stages (FlowCut's tower stage, MCTF, VisionZip, VisPruner) the tower's HF
  ``CLIPVisionModel`` and ``mm_projector`` (``vision_seams``): the same hooks as on HF LLaVA, the
  widened features are spliced like full ones and the pre-LLM hook drops the empty slots;
- speaks transformers 4.36's decoder-layer convention: ``past_key_value`` (one DynamicCache),
  a 4-D additive mask (eager and sdpa; None for a plain causal sdpa prefill), ``position_ids``
  and no ``position_embeddings``: every attention builds its own rotary table and slices it to
  the current key length, so a forward pre-hook on each layer's own ``rotary_emb`` asks for the
  whole cached table (same values, just not cut at the pruned length, which original position
  ids index past). Criteria get ``(cos, sin)`` from the same module (``position_embeddings``).
  A cached ``generate()`` needs one cache object for the whole request: with ``use_cache`` and no
  cache, the inner model gets an empty ``DynamicCache`` (4.36 would otherwise return legacy
  tuples, rebuilt each step). Beam search (which reorders legacy tuples) is not supported. After a
  ``pre_llm`` reduction the cache's ``seen_tokens`` (what 4.36 ``generate()`` slices its next input
  with) counts the whole original prompt, as the 2-D mask does.

Supported: ``llava_llama`` with a CLIP tower, ``mm_patch_merge_type="flat"`` (LLaVA-1.5; several
crops per image allowed, each its own grid), eager or sdpa attention, transformers with the
4.36 decoder-layer convention (tested: 4.36.2, which llava-torch 1.2.2 pins; ``check()`` refuses
layers without it, naming the version). ``llava`` itself is imported only when such a model is
patched.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import IncompatiblePolicyError, InputError, UnsupportedModelError
from ..registry import ADAPTERS
from ..compat import attn_implementation
from ..marking import mark_hook
from .base import Adapter, Seams, VisionSeams, VisualLayout, check_decoder_layers

WRAPPED = "prepare_inputs_labels_for_multimodal"
ATTENTION = ("eager", "sdpa")


class _SpliceRecorder:
    """The instance-level wrapper of ``prepare_inputs_labels_for_multimodal``.

    ``pending``: ``(inputs_embeds, VisualLayout)`` of the last splice, read by every inner forward
    whose ``inputs_embeds`` is that very tensor (any other tensor never matches; 4.36 ``generate``
    with ``use_cache=False`` passes the same prompt tensor at every step).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.original = type(model).prepare_inputs_labels_for_multimodal.__get__(model)
        self.pending: tuple[torch.Tensor, VisualLayout] | None = None

    def __call__(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None):
        if labels is not None:
            raise InputError(
                "labels",
                "a pruning policy returns logits for the kept tokens only, so labels no longer align; "
                "compute the loss yourself from the kept positions (handle.last_trace()) or unpatch first",
            )
        spliced = images is not None and input_ids is not None and input_ids.shape[1] > 1 \
            and self.model.get_vision_tower() is not None
        past = 0 if past_key_values is None else _cache_length(past_key_values)
        if spliced and past > 0:
            raise InputError(
                "images",
                "new images in a chunk appended to an existing cache cannot be pruned consistently; "
                "send the prompt with its images in one prefill",
            )
        out = self.original(input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        self.pending = None
        embeds = out[4]
        if spliced and embeds is not None:
            self.pending = (embeds, _splice_layout(self.model, input_ids, attention_mask, images, embeds))
        return out


def _cache_length(cache) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[2]) if len(cache) else 0  # legacy tuples


def _splice_layout(
    model: nn.Module, input_ids: torch.Tensor, attention_mask, images, embeds: torch.Tensor
) -> VisualLayout:
    """Where ``prepare_inputs_labels_for_multimodal`` put each image's features, ``[B, L]`` tensors.

    Mirrors the splice of the flat merge: per row (padding removed by ``attention_mask``) the text
    segments between placeholders, each placeholder replaced by its image's crops x tokens per crop;
    a row without placeholders still consumes one image slot (as the original does); truncation
    to ``tokenizer_model_max_length``; left or right padding (``tokenizer_padding_side``).
    """
    from llava.constants import IMAGE_TOKEN_INDEX

    cfg = model.config
    tower = model.get_vision_tower()
    side = tower.num_patches_per_side
    cls = 1 if getattr(tower, "select_feature", "patch") == "cls_patch" else 0
    per_crop = side * side + cls
    if type(images) is list or images.ndim == 5:
        crops = [1 if x.ndim == 3 else x.shape[0] for x in images]
    else:
        crops = [1] * images.shape[0]
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = []  # per row: list of (is_visual, image_in_row, segment, row, col) per token
    cur_image = 0
    for ids in (r[m] for r, m in zip(input_ids, mask)):
        ids = ids.tolist()
        if IMAGE_TOKEN_INDEX not in ids:
            cur_image += 1
            rows.append([(False, -1, -1, -1, -1)] * len(ids))
            continue
        toks, image_in_row, segment = [], 0, 0
        for t in ids:
            if t != IMAGE_TOKEN_INDEX:
                toks.append((False, -1, -1, -1, -1))
                continue
            for _ in range(crops[cur_image]):
                for k in range(per_crop):
                    w = k - cls
                    toks.append((True, image_in_row, segment, w // side if w >= 0 else -1, w % side if w >= 0 else -1))
                segment += 1
            cur_image += 1
            image_in_row += 1
        rows.append(toks)
    limit = getattr(cfg, "tokenizer_model_max_length", None)
    if limit is not None:
        rows = [r[:limit] for r in rows]
    B, L = embeds.shape[:2]
    if max(len(r) for r in rows) != L:
        raise InputError(
            "images",
            f"the spliced sequence has {L} tokens but the prompt and images give {max(len(r) for r in rows)}; "
            "allowed: one IMAGE_TOKEN_INDEX placeholder per image, mm_patch_merge_type 'flat'",
        )
    left = getattr(cfg, "tokenizer_padding_side", "right") == "left"
    table = torch.tensor([(False, -1, -1, -1, -1)], dtype=torch.long).expand(B, L, 5).clone()
    for b, r in enumerate(rows):
        if r:
            vals = torch.tensor(r, dtype=torch.long)
            if left:
                table[b, L - len(r):] = vals
            else:
                table[b, : len(r)] = vals
    table = table.to(embeds.device)
    is_visual = table[..., 0].bool()
    return VisualLayout(
        is_visual=is_visual,
        image=table[..., 1],
        segment=table[..., 2],
        row=table[..., 3],
        col=table[..., 4],
        is_newline=torch.zeros_like(is_visual),
    )


def _full_rotary_table(module, args, kwargs):
    """Pre-hook on a 4.36 ``rotary_emb``: return its whole cached table instead of the first ``seq_len`` rows.

    The attention indexes the table with position ids; after pruning, original positions exceed the
    layer's (shorter) key length. The rows are the same values either way, so this is exact.
    """
    seq_len = kwargs.get("seq_len", args[1] if len(args) > 1 else None)
    if seq_len is None or seq_len >= module.max_seq_len_cached:
        return None
    return (args[0],), {"seq_len": module.max_seq_len_cached}


class LlavaOriginalAdapter(Adapter):
    """``LlavaLlamaForCausalLM`` of the original LLaVA code base on transformers 4.36."""

    model_types = ("llava_llama",)
    pixel_inputs = ()  # the inner model never receives pixels; the splice recorder refuses late images
    supports_pre_llm = True
    supports_structural = False  # structural ops rely on transformers 5.x attention interfaces
    layout_from_embeds = True

    # -- structure ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        cls = type(model)
        if not hasattr(cls, WRAPPED) or not hasattr(model, "get_model"):
            raise UnsupportedModelError(
                "model", f"{cls.__name__} is not the original LLaVA's LlavaLlamaForCausalLM (no {WRAPPED})")
        if WRAPPED in vars(model):
            raise UnsupportedModelError(
                f"model.{WRAPPED}", "is already overridden on this model instance (another tool wrapped it); "
                "allowed: the class's own method")
        cfg = model.config
        merge = getattr(cfg, "mm_patch_merge_type", "flat")
        if merge != "flat":
            raise UnsupportedModelError(
                "config.mm_patch_merge_type",
                f"{merge!r} (LLaVA-1.6 anyres) is not supported yet; allowed: 'flat' (LLaVA-1.5)")
        tower = model.get_vision_tower()
        if tower is None or not getattr(tower, "is_loaded", False):
            raise UnsupportedModelError(
                "model.get_vision_tower()", "is not loaded; call model.get_vision_tower().load_model() first")
        if getattr(tower, "select_feature", "patch") not in ("patch", "cls_patch"):
            raise UnsupportedModelError(
                "config.mm_vision_select_feature", f"{tower.select_feature!r}; allowed: 'patch', 'cls_patch'")
        impl = attn_implementation(cfg, "eager")
        if impl not in ATTENTION:
            raise UnsupportedModelError(
                "config._attn_implementation", f"{impl!r} is not supported; allowed: {', '.join(ATTENTION)}")
        scaling = getattr(cfg, "rope_scaling", None)
        if scaling and scaling.get("type") != "linear":
            raise UnsupportedModelError(
                "config.rope_scaling",
                f"{scaling.get('type')!r}: its rotary frequencies depend on the sequence length, which pruning "
                "changes; allowed: None or 'linear'")
        layers = model.get_model().layers
        check_decoder_layers(layers, "Llama")
        import transformers

        for i, layer in enumerate(layers):
            rot = getattr(layer.self_attn, "rotary_emb", None)
            ok = rot is not None and hasattr(rot, "max_seq_len_cached") \
                and "seq_len" in inspect.signature(rot.forward).parameters \
                and "past_key_value" in inspect.signature(layer.forward).parameters
            if not ok:
                raise UnsupportedModelError(
                    f"decoder layer {i}",
                    f"transformers {transformers.__version__} decoder layers do not use the 4.36 convention "
                    "(past_key_value, per-attention rotary_emb(x, seq_len)); allowed: transformers 4.36.x "
                    "(llava-torch 1.2.2 pins 4.36.2)")

    def seams(self, model: nn.Module) -> Seams:
        inner = model.get_model()
        impl = attn_implementation(model.config, "eager")
        return Seams(
            top=inner,
            decoder_layers=tuple(inner.layers),
            first_full_attention_layer=0,
            mask_format="float4d",  # 4.36 eager and sdpa both get additive 4-D masks (or None)
            attn_implementation=impl,
            text_config=model.config,
            language_model=inner,
        )

    def install(self, handle, model: nn.Module) -> None:
        """The splice recorder (instance attribute), a cache for the whole request, full rotary tables."""
        handle.swap_attr(model, WRAPPED, _SpliceRecorder(model))  # deleted again by unpatch()
        handle.add_hook(
            f"{type(model).__name__}.{WRAPPED}: instance-level wrapper (records where image features are spliced)")
        inner = model.get_model()

        def one_cache(module, args, kwargs):
            use_cache = kwargs.get("use_cache")
            use_cache = module.config.use_cache if use_cache is None else use_cache
            if use_cache and kwargs.get("past_key_values") is None:
                from transformers.cache_utils import DynamicCache

                return args, {**kwargs, "past_key_values": DynamicCache()}
            return None

        handle.add_hook(
            f"{type(inner).__name__}: forward pre-hook (one DynamicCache for the whole request)",
            inner.register_forward_pre_hook(mark_hook(one_cache), with_kwargs=True, prepend=True),
        )
        done: dict = {}

        def seen_prompt(module, args, kwargs, output):
            # 4.36 generate() slices its next input with the cache's ``seen_tokens`` against the 2-D mask's
            # length (the original prompt): after a pre_llm reduction the cache has seen the whole prompt
            st = handle.last_state  # the state this very forward closed (the engine's post-hook ran first)
            if st is None or done.get("state") is st:
                return None
            done["state"] = st
            cache = getattr(output, "past_key_values", None)
            pre = st.prefill.pre_llm
            if st.phase == "prefill" and pre is not None and hasattr(cache, "seen_tokens"):
                original = getattr(pre, "prompt_len", 0) or st.prefill.prompt_len
                cache.seen_tokens += original - pre.kept.shape[1]
            return None

        handle.add_hook(
            f"{type(inner).__name__}: forward hook (pre_llm: the cache has seen the whole prompt, for generate())",
            inner.register_forward_hook(mark_hook(seen_prompt), with_kwargs=True),
        )
        for j, layer in enumerate(inner.layers):
            handle.add_hook(
                f"decoder layer {j}: self_attn.rotary_emb forward pre-hook (whole rotary table: original positions)",
                layer.self_attn.rotary_emb.register_forward_pre_hook(_full_rotary_table, with_kwargs=True),
            )

    def vision_seams(self, model: nn.Module, where: str = "site") -> VisionSeams:
        """The tower's HF ``CLIPVisionModel`` (``get_vision_tower().vision_tower``) for vision-site stages.

        ``CLIPVisionTower.forward`` encodes every crop of the batch in one call and reads
        ``hidden_states[mm_vision_select_layer]`` (the output of encoder layer ``select_layer - 1``, or
        ``n + select_layer`` when negative), dropping CLS for ``mm_vision_select_feature="patch"``
        (HF's ``"default"``); ``encode_images`` then runs ``mm_projector`` once on all of them. The stage's
        hooks are the HF LLaVA ones (``vision.hooks``): the widened projector output is spliced like the
        full features, and the pre-LLM hook drops the empty slots.
        """
        wrapper = model.get_vision_tower()
        tower = getattr(wrapper, "vision_tower", None)
        vc = getattr(tower, "config", None)
        if getattr(vc, "model_type", None) != "clip_vision_model" or not hasattr(tower, "vision_model"):
            raise IncompatiblePolicyError(
                where, f"vision-site stages need the HF CLIP tower (CLIPVisionTower over CLIPVisionModel), got "
                f"{type(tower).__name__}; allowed: a CLIP vision tower")
        layer, n = wrapper.select_layer, vc.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer <= n or layer in (0, -n - 1):
            raise IncompatiblePolicyError(
                where, f"config.mm_vision_select_layer={layer!r} is not supported at site vision; allowed: one "
                f"integer layer in 1..{n} or -{n}..-1")
        feature = n + layer if layer < 0 else layer - 1  # hidden_states[i] is the output of encoder layer i - 1
        select = {"patch": "default", "cls_patch": "full"}[wrapper.select_feature]  # check() allows these two
        return VisionSeams(
            tower=tower, layers=tuple(tower.vision_model.encoder.layers), feature_layer=feature,
            select_strategy=select, n_patches=wrapper.num_patches, projector=model.get_model().mm_projector,
            attn_implementation=attn_implementation(vc, "eager"),
        )

    # -- visual tokens -----------------------------------------------------------------------
    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor | None, kwargs: dict) -> VisualLayout:
        recorder = vars(model).get(WRAPPED)
        embeds = kwargs.get("inputs_embeds")
        pending = recorder.pending if isinstance(recorder, _SpliceRecorder) else None
        if pending is not None and embeds is not None and pending[0] is embeds:
            return pending[1]
        # no splice produced these inputs: text only (generate() without images embeds input_ids itself)
        ref = embeds if embeds is not None else input_ids
        none = torch.full(ref.shape[:2], -1, dtype=torch.long, device=ref.device)
        return VisualLayout(none == 0, none, none.clone(), none.clone(), none.clone(), none == 0)

    def position_embeddings(self, layer: nn.Module, kwargs: dict, hidden: torch.Tensor):
        """``(cos, sin)`` ``[B or 1, L, d]`` at this layer's position ids, from the layer's own ``rotary_emb``."""
        pid = kwargs["position_ids"]
        rot = layer.self_attn.rotary_emb
        cos, sin = rot(hidden, seq_len=max(int(pid.max()) + 1, rot.max_seq_len_cached))
        return cos[pid], sin[pid]


ADAPTERS.register("llava_llama", LlavaOriginalAdapter())
