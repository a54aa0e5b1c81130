"""What an adapter tells the engine about one model family.

An adapter answers three questions and holds all model-specific knowledge:
``seams(model)`` (where the decoder layers are, what they expect), ``check(model)``
(is this configuration supported), and ``visual_layout(...)`` (which tokens of a
prompt are visual, and where on which patch grid each one sits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..compat import attn_implementation, mask_format_for
from ..errors import IncompatiblePolicyError, UnsupportedModelError


@dataclass(frozen=True)
class Seams:
    """The modules and facts the engine hooks into.

    ``top``: the module whose forward starts a request (kwargs carry input_ids, cache...).
    ``decoder_layers``: the LLM decoder layers in call order.
    ``first_full_attention_layer``: index of the first full-attention layer (cache
    lengths are read there); pruning must happen strictly above it.
    ``mask_format``: how this attention backend receives masks: ``"bool4d"`` (sdpa),
    ``"float4d"`` (eager) or ``"2d"`` (flash-attention style padding masks).
    """

    top: nn.Module
    decoder_layers: tuple[nn.Module, ...]
    first_full_attention_layer: int
    mask_format: str
    attn_implementation: str
    text_config: Any
    language_model: nn.Module | None = None  # its input is where pre_llm stages act (None: not supported)
    # the language model's rotary embedding, ``rotary_emb(x, position_ids) -> (cos, sin)``: LLM stages with
    # ``positions=repack`` build the renumbered tables with it (None: repack is not defined for this model)
    rotary_emb: nn.Module | None = None

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)


@dataclass(frozen=True)
class VisionSeams:
    """The vision tower as vision-site stages see it (``vlm_tokenprune.vision``).

    ``tower``: the encoder module called once per batch of images (crops); ``layers``: its
    encoder layers in call order (each ``layer(hidden, attention_mask, ...)``, pre-norm,
    ``layer_norm1`` and ``self_attn.{q,k,v}_proj``); ``feature_layer``: index of the encoder
    layer whose OUTPUT the VLM reads (``vision_feature_layer=-2`` of 24 layers -> 22);
    ``select_strategy``: ``"default"`` (CLS dropped before the projector) or ``"full"``;
    ``n_patches``: patch tokens per crop (CLS excluded); ``projector``: the module that maps
    the selected features to the LLM width (its output is widened back to the full layout);
    ``pack_owner``: the object whose ``pack_image_features`` reorders crops (LLaVA-NeXT), else None;
    ``attn_implementation``: the tower's attention backend.
    ``attention_name``: each layer's attention module attribute (CLIP ``self_attn``, InternViT ``attention``;
    it has ``num_heads`` and ``scale``); ``projections``: ``(what, module name)`` of the submodules of that
    attention whose outputs are the q / k / v the attention uses (InternViT: after its q / k norms);
    ``groups``: ``[G, g]`` patch indices (0-based, CLS excluded) that one LLM token packs, in channel-block
    order (InternVL's pixel shuffle, ``vision.groups``); None: every patch is its own LLM token.
    ``attention_norm``: each layer's pre-attention norm (CLIP ``layer_norm1``, InternViT ``layernorm_before``);
    ``bias_in_attention``: True when the layers take no attention mask (InternViT calls its attention with the
    normed input only), so an attention bias (MCTF) is handed to each layer's attention module instead.
    ``cls_token``: False when the tower has no CLS (SigLIP of Gemma 3): its hidden states are the N patches only;
    the run's bookkeeping keeps a virtual CLS slot 0 that never enters the hidden states (``vision.hooks``).
    ``pack_point``: the module whose forward pre-hook receives the LLM tokens of every crop ``[n, G, C]`` before
    they are projected (``groups`` towers; None: the projector itself, InternVL; Gemma 3: the projector's
    ``mm_soft_emb_norm``, after its average pooling). ``project_kept_only``: True: only the kept groups' tokens
    go on from ``pack_point`` (InternVL); False: every token is projected and the kept rows are taken from the
    projector's output (Gemma 3: its RMSNorm gives other bits on a shorter input, so this keeps the kept tokens
    bit-identical to the unpruned model's; the projection is 2 * 1152 * 2560 FLOPs per pooled token).
    ``mask_only`` / ``refuse_calls``: see the fields (LLaVA-OneVision).
    """

    tower: nn.Module
    layers: tuple[nn.Module, ...]
    feature_layer: int
    select_strategy: str
    n_patches: int
    projector: nn.Module
    attn_implementation: str
    pack_owner: Any = None
    attention_name: str = "self_attn"
    projections: tuple[tuple[str, str], ...] = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"))
    groups: torch.Tensor | None = None
    attention_norm: str = "layer_norm1"
    bias_in_attention: bool = False
    cls_token: bool = True
    pack_point: nn.Module | None = None
    project_kept_only: bool = True
    group_kind: tuple[str, str] = ("pixel shuffle", "pixel-shuffle groups")  # for messages: how / what (Gemma 3: pooling)
    # a packed tower (Qwen3-VL: every image one run of a single sequence, images of any size; ``vision.packed``):
    # it installs its own hooks, criteria need ``select_units``, the budget counts LLM tokens per image (no fixed cap)
    packed: Any = None
    # LLaVA-OneVision: the stage MARKS its dropped patches (``VisionRun.owner`` -1) instead of shortening the feature
    # layer's output; every patch is projected and packed by the model, the pre-LLM path drops the marked placeholders,
    # and a crop can keep all its patches while the others of the batch are reduced (an anyres_max-resized image)
    mask_only: bool = False
    # ``(method of pack_owner, input field, mm_encoder_outputs key, why)``: inputs refused by name while the vision
    # stage is patched in: the field (or precomputed features under the key) in a forward, or a call of the method
    # (``generate()`` encodes through it) (OneVision's videos: frames are pooled after the tower, no stage maps that)
    refuse_calls: tuple[tuple[str, str, str, str], ...] = ()

    @property
    def n_tokens(self) -> int:
        """LLM tokens per crop before reduction (what a vision stage's budget counts)."""
        return self.n_patches if self.groups is None else int(self.groups.shape[0])


@dataclass
class VisualLayout:
    """Where the visual tokens of a batch sit.

    All tensors are ``[B, L]`` over the prompt as given to the LLM.
    ``is_visual``: visual token. ``image``: image index within the row (-1: not visual).
    ``segment``: index of the 2-D patch grid the token belongs to within the row (LLaVA-NeXT
    has a base grid and an anyres grid per image; Qwen2-VL counts images and videos as items in
    ``image`` and makes every video frame a grid of its own; -1: not visual).
    ``row``/``col``: position on that grid (-1 for CLS and ``image_newline`` tokens).
    ``is_newline``: LLaVA-NeXT ``image_newline`` token. ``coords_known`` is False when the
    grid could not be derived (e.g. LLaVA-NeXT without ``image_sizes``): spatial criteria
    then refuse to run.
    """

    is_visual: torch.Tensor
    image: torch.Tensor
    segment: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    is_newline: torch.Tensor
    coords_known: bool = True


class Adapter:
    """Base of every model-family adapter: what the engine and the sites read, with declared defaults.

    Required: ``model_types``, ``seams(model)`` and ``visual_layout(model, input_ids, kwargs)``;
    every other member has a default that holds for transformers 5.x HF models.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    # forward kwargs that carry new pixels (refused in a chunk appended to an existing cache)
    pixel_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # True when pre_llm stages may reduce the language model's input (Seams.language_model is set)
    supports_pre_llm: ClassVar[bool] = False
    # position conventions a pre_llm / vision stage may use on this model, and why others are not defined
    pre_llm_positions: ClassVar[tuple[str, ...]] = ("gaps", "repack")
    pre_llm_positions_why: ClassVar[str] = ""
    # position conventions an LLM-site stage may use on this model (``positions=``), and why others are not defined
    llm_positions: ClassVar[tuple[str, ...]] = ("gaps", "repack")
    llm_positions_why: ClassVar[str] = ""
    # True: one attention-mask object reaches every decoder layer, so a decode step may shrink it in place at each
    # token stage and leave the other layers alone (``sites.routed_layers``); False: every layer after a stage gets
    # its own input (families whose layers build or read masks of their own)
    decode_gates: ClassVar[bool] = True
    # False refuses structural ops other than visual_drop
    supports_structural: ClassVar[bool] = True
    # True: a layer's attention rows are not plain causal rows (Gemma 3: a sliding window of original positions, a
    # bidirectional image block), so criteria read the scoring layer's own incoming mask (``ScoringContext.layer_mask``)
    scoring_reads_layer_mask: ClassVar[bool] = False
    # non-empty: the vision tower has no CLS token (why); vision-site methods that read CLS are refused by name
    vision_no_cls: ClassVar[str] = ""
    # True: the top module may get inputs_embeds without input_ids; visual_layout(model, None, kwargs) then
    # locates the visual tokens (the model spliced its image features itself: the original LLaVA)
    layout_from_embeds: ClassVar[bool] = False

    def check(self, model: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` when this configuration cannot be patched."""

    def seams(self, model: nn.Module) -> Seams:
        raise NotImplementedError(f"{type(self).__name__} must implement seams()")

    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor | None, kwargs: dict) -> VisualLayout:
        raise NotImplementedError(f"{type(self).__name__} must implement visual_layout()")

    def vision_seams(self, model: nn.Module, where: str = "site") -> VisionSeams:
        """The vision tower for vision-site stages; ``IncompatiblePolicyError`` naming ``where`` when there is none."""
        raise IncompatiblePolicyError(
            where, f"site vision is not supported for {model.config.model_type!r} yet; allowed models: llava, "
            "llava_next, llava_llama (the original LLaVA code base), internvl (whole pixel-shuffle groups)")

    def position_embeddings(self, layer: nn.Module, kwargs: dict, hidden: torch.Tensor) -> Any:
        """``(cos, sin)`` for decoder layers that receive no ``position_embeddings`` kwarg (their attention builds
        rotary tables itself: transformers 4.3x); what criteria score with. None: the layer receives them."""
        return None

    def install(self, handle: Any, model: nn.Module) -> None:
        """Extra hooks / instance-level changes of this family, kept on the handle (``add_hook`` / ``swap_attr``)."""

    def decode_masks(self, handle: Any, masks: dict, kept: torch.Tensor, kept_ok: torch.Tensor, prompt_len: int,
                     past: int, q: int, dtype: torch.dtype) -> dict:
        """Families whose language model receives one 4-D mask per layer type (a dict, Gemma 3): those masks for
        ``q`` tokens decoded after a pre-LLM-reduced prompt (``kept`` [B, Mp] original positions of its cache slots,
        ``past`` cached tokens). Families that hand their language model a 2-D mask never get here."""
        raise NotImplementedError(f"{type(self).__name__} receives a per-layer-type mask mapping but defines no "
                                  "decode_masks()")


class HFAdapter(Adapter):
    """transformers 5.x ``...ForConditionalGeneration`` whose text model is ``model.model.language_model`` with
    full attention in every layer (the shared LLaVA / Qwen parts)."""

    supports_pre_llm = True  # the language model receives inputs_embeds and position ids
    decoder_style: ClassVar[str] = "Llama"  # named in the error when a decoder layer has another shape

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def check_text_layers(self, model: nn.Module) -> None:
        """Every decoder layer has the pre-norm q/k/v shape scoring reads; the attention backend is known."""
        check_decoder_layers(self.language_model(model).layers, self.decoder_style)
        mask_format_for(attn_implementation(model.config.text_config))

    def seams(self, model: nn.Module) -> Seams:
        return hf_seams(model, self.language_model(model))


def uses_sliding_window(text_config) -> bool:
    """True when any decoder layer of this text config attends through a sliding window."""
    layer_types = getattr(text_config, "layer_types", None) or []
    return any(t != "full_attention" for t in layer_types) or bool(
        getattr(text_config, "use_sliding_window", False) and getattr(text_config, "sliding_window", None))


def check_decoder_layers(layers, style: str) -> None:
    """Every decoder layer is pre-norm with ``input_layernorm`` and ``self_attn.{q,k,v}_proj`` (what scoring reads)."""
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        for name in ("q_proj", "k_proj", "v_proj"):
            if attn is None or not isinstance(getattr(attn, name, None), nn.Module):
                raise UnsupportedModelError(f"decoder layer {i}", f"expected self_attn.{name} ({style}-style attention)")
        if not isinstance(getattr(layer, "input_layernorm", None), nn.Module):
            raise UnsupportedModelError(f"decoder layer {i}", "expected input_layernorm (pre-norm decoder layer)")


def hf_seams(model: nn.Module, language_model: nn.Module) -> Seams:
    """Seams of an HF ``...ForConditionalGeneration`` whose text model has full attention in every layer."""
    text = model.config.text_config
    impl = attn_implementation(text)
    return Seams(
        top=model,
        decoder_layers=tuple(language_model.layers),
        first_full_attention_layer=0,
        mask_format=mask_format_for(impl),
        attn_implementation=impl,
        text_config=text,
        language_model=language_model,
        rotary_emb=getattr(language_model, "rotary_emb", None),
    )
