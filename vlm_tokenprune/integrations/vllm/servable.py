"""Which policies vLLM can serve, and the per-image reduction its model subclasses run.

vLLM fixes each image's placeholder count before scheduling (the multimodal processor's
``get_num_image_tokens`` / ``_get_prompt_updates``) and allocates KV blocks for it;
``embed_multimodal`` sees the image inputs only, never the prompt, and its output must hold exactly
one feature per placeholder. So a stage is servable when it acts after the projector (``site=pre_llm``),
reads the image alone and keeps a count that follows from the image's token layout
(``Criterion.image_only_fixed_count``). Everything else is refused by name, before the engine starts:
in-LLM stages (attention metadata and slot mappings are built once per step for the full prompt),
structural ops, text-guided / learned-with-text criteria, data-dependent counts, and vision-site
stages that act between encoder layers (their hooks need transformers' CLIP layers; vLLM runs its own tower).
A vision-site stage acting on the feature layer alone (VisionZip, VisPruner) is served on LLaVA-1.5
(``vision_site``: the model subclass hooks vLLM's CLIP for each tower call).

``check_servable(policy, family)`` -> ``ServePlan``; ``plan.kept_count(layout)`` sizes an image's
placeholders; ``plan.reduce(features, layout)`` runs the library's own criterion code on one image's
projected features, so the kept set equals ``patch()``'s for a one-image prompt. This module imports
no vLLM (the model subclasses in ``models_llava`` do).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MethodType, SimpleNamespace
from typing import Any, Mapping

import torch

from ...adapters.base import VisualLayout
from ...errors import IncompatiblePolicyError
from ...ops import Ops
from ...policy import Policy
from ...reduction import Reduction
from ...registry import CRITERIA
from ...scoring import ScoringContext
from .vision_site import VISION_FAMILIES, WHY_NOT_NEXT, feature_layer_only, vision_kept_count


def _vision_served() -> list[str]:
    return sorted(n for n, c in CRITERIA.items() if feature_layer_only(c))


# model_type -> the position convention vLLM's model uses for the language model's input:
# LLaVA / LLaVA-NeXT number every token of the (reduced) prompt by its index (= ``positions=repack``);
# Qwen2-VL / 2.5-VL keep M-RoPE (t, h, w) positions per token (= ``positions=gaps``).
SERVED_POSITIONS = {"llava": "repack", "llava_next": "repack", "qwen2_vl": "gaps", "qwen2_5_vl": "gaps"}
SERVED_FAMILIES = tuple(SERVED_POSITIONS)

WHY_IN_LLM = ("vLLM builds the attention metadata, slot mapping and KV blocks once per step for the whole prompt, so "
              "tokens cannot leave between decoder layers; allowed: one site=pre_llm stage")
WHY_STRUCTURAL = ("structural ops change the decoder layers' computation; vLLM's own decoder layers carry no hooks; "
                  "allowed: one site=pre_llm stage")
WHY_VISION = ("it reduces tokens between the vision tower's encoder layers (before_layer: hooks inside transformers' CLIP "
              "layers, attention biases); vLLM runs its own vision tower (vllm.model_executor.models.clip), where only "
              "the feature layer's output and q/k are taken; allowed: one site=pre_llm stage, or a vision stage acting "
              "on the feature layer alone (" + ", ".join(_vision_served()) + ") on llava")


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's visual tokens sit on their patch grids (``[n]`` each, the image's own order).

    ``segment``: grid index within the image (LLaVA-NeXT: 0 = base grid, 1 = anyres grid; Qwen: 0);
    ``row`` / ``col``: grid coordinates (-1 for CLS / ``image_newline``); ``is_newline``: LLaVA-NeXT's
    ``image_newline`` tokens. Same meaning as ``adapters.base.VisualLayout`` for a one-image row.
    """

    segment: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    is_newline: torch.Tensor
    coords_known: bool = True

    @property
    def n(self) -> int:
        return int(self.segment.numel())

    @classmethod
    def from_visual_layout(cls, layout: VisualLayout) -> "ImageLayout":
        """The visual tokens of row 0 of an adapter's ``VisualLayout`` (a prompt made of one image's tokens)."""
        v = layout.is_visual[0]
        return cls(layout.segment[0, v], layout.row[0, v], layout.col[0, v], layout.is_newline[0, v],
                   layout.coords_known)

    def signature(self) -> tuple:
        return (self.coords_known, tuple(self.segment.tolist()), tuple(self.row.tolist()), tuple(self.col.tolist()),
                tuple(self.is_newline.tolist()))


@dataclass(frozen=True)
class Reduced:
    """One image after the policy: ``features`` ``[k, d]`` (kept or merged, in order) and ``kept`` ``[k]``: the
    index (into the unreduced features) of each output slot's representative token."""

    features: torch.Tensor
    kept: torch.Tensor


@dataclass(frozen=True)
class ServePlan:
    """A policy vLLM can serve on ``family``: at most one ``site=pre_llm`` stage (None: the model runs unchanged)."""

    policy: Policy
    family: str
    stage_index: int | None = None

    @property
    def active(self) -> bool:
        return self.stage_index is not None

    @property
    def stage(self):
        return None if self.stage_index is None else self.policy.stages[self.stage_index]

    @property
    def criterion(self):
        return None if self.stage is None else CRITERIA.get(self.stage.criterion)

    def describe(self) -> str:
        if not self.active:
            return f"{self.policy} (keeps every visual token: the model runs unchanged)"
        if self.vision:
            return f"{self.stage.describe()} on {self.family} (per image, at the vision tower's feature layer)"
        return f"{self.stage.describe()} on {self.family} (per image, after the projector)"

    @property
    def vision(self) -> bool:
        """The stage runs at the vision tower's feature layer (``vision_site``), not after the projector."""
        return self.active and self.stage.is_vision

    def kept_count(self, layout: ImageLayout) -> int:
        """How many placeholders one image gets: a function of its unreduced layout alone (never its content)."""
        if not self.active:
            return layout.n
        if self.vision:  # LLaVA-1.5: the layout holds CLS (row -1) only with select strategy "full"
            return vision_kept_count(self, layout.n, "full" if bool((layout.row < 0).any()) else "default")
        return _kept_count(self, layout.signature())

    def reduce(self, features: torch.Tensor, layout: ImageLayout) -> Reduced:
        """One image's projected features ``[n, d]`` -> the policy's kept / merged features (``patch()``'s result
        for a one-image prompt under ``positions=repack`` / ``gaps``, the library's own criterion code)."""
        n = features.shape[0]
        if n != layout.n:
            raise ValueError(f"features: {n} rows but the image's layout has {layout.n} tokens")
        if not self.active:
            return Reduced(features, torch.arange(n, device=features.device))
        if self.vision:
            raise RuntimeError("a vision-site plan reduces inside the tower (vision_site.reduce_feature_layer)")
        stage = self.stage
        keep_n = min(stage.budget.count(n, n), n)  # a tokens=N budget above the image keeps all (patch(): kept_all)
        if keep_n >= n:
            return Reduced(features, torch.arange(n, device=features.device))
        dev = features.device
        hidden = features[None]
        ar = torch.arange(n, device=dev)[None]
        ok = torch.ones(1, n, dtype=torch.bool, device=dev)
        t = lambda x: x.to(dev)[None]  # noqa: E731
        ctx = ScoringContext(
            layer=None, hidden=hidden, position_embeddings=None, seq_valid=ok, last_idx=torch.full((1,), n - 1, device=dev),
            visual_idx=ar, visual_ok=ok, orig_pos=ar, row=t(layout.row), col=t(layout.col), segment=t(layout.segment),
            image=torch.zeros(1, n, dtype=torch.long, device=dev), is_newline=t(layout.is_newline),
            coords_known=layout.coords_known, keep=torch.tensor([keep_n], device=dev), ops=Ops("torch"),
        )
        crit = self.criterion
        params = {k: v for k, v in stage.params.items() if k != "positions"}
        with torch.no_grad():
            if stage.op == "merge":
                chain = crit.merge(ctx, **params)
            else:
                scores = crit.score(ctx, **params)
                sel, sel_ok = crit.select(ctx, scores, **params)
                keep = torch.zeros(1, n + 1, dtype=torch.bool, device=dev)
                keep.scatter_(1, sel.masked_fill(~sel_ok, n), True)
                chain = [Reduction.prune(keep[:, :n])]
            x, size, rep = hidden, torch.ones(1, n, dtype=hidden.dtype, device=dev), ar
            for r in chain:  # as lm_input.apply_reduction: fuse hidden states, carry sizes and representatives
                x = r.fuse(x, size)
                size = r.add(size)
                rep = r.take(rep)
        return Reduced(x[0], rep[0])


@functools.lru_cache(maxsize=256)
def _kept_count(plan: ServePlan, signature: tuple) -> int:
    coords_known, seg, row, col, nl = signature
    layout = ImageLayout(torch.tensor(seg), torch.tensor(row), torch.tensor(col), torch.tensor(nl, dtype=torch.bool),
                         coords_known)
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(layout.n, 8, generator=g)  # content does not change the count (image_only_fixed_count)
    return int(plan.reduce(probe, layout).kept.numel())


def check_servable(policy: "str | Mapping | Policy", family: str | None) -> ServePlan:
    """Parse ``policy`` for model type ``family`` and return its ``ServePlan``, or raise
    ``IncompatiblePolicyError`` naming the stage and why vLLM cannot serve it (before any engine exists).
    ``family=None`` (the model is not known yet: ``plugin.register``): every check but the positions convention."""
    if family is not None and family not in SERVED_FAMILIES:
        raise IncompatiblePolicyError(
            "model_type", f"{family!r} is not served by the vLLM plugin; allowed: {', '.join(SERVED_FAMILIES)}")
    pol = Policy.parse(policy, family=family)
    found = None
    for i, st in enumerate(pol.stages):
        where = f"stages[{i}]"
        if st.structural:
            raise IncompatiblePolicyError(f"{where}.op", f"{st.op!r} cannot be served by vLLM: {WHY_STRUCTURAL}")
        if st.is_llm:
            raise IncompatiblePolicyError(
                f"{where}.layer", f"{st.criterion!r} at layer {st.layer} is an in-LLM stage: {WHY_IN_LLM}")
        crit = CRITERIA.get(st.criterion, f"{where}.criterion")
        if st.is_vision:
            if not feature_layer_only(crit):
                raise IncompatiblePolicyError(f"{where}.site", f"{st.criterion!r} at site=vision cannot be served by "
                                              f"vLLM: {WHY_VISION}")
            if family is not None and family not in VISION_FAMILIES:
                raise IncompatiblePolicyError(f"{where}.site", f"{st.criterion!r} at site=vision is not served on "
                                              f"{family}: {WHY_NOT_NEXT}")
        if not getattr(crit, "image_only_fixed_count", False):
            raise IncompatiblePolicyError(
                f"{where}.criterion",
                f"{st.criterion!r} is not image-only with a fixed count (Criterion.image_only_fixed_count is False: it "
                "reads the prompt text, e.g. a text-guided or learned-with-text selector, or its kept count depends on "
                "the data); vLLM sizes each image's placeholders before the language model runs and embed_multimodal "
                "never sees the prompt; allowed: " + ", ".join(servable_criteria()))
        want = SERVED_POSITIONS.get(family)
        if want is not None and st.params.get("positions") != want:
            raise IncompatiblePolicyError(
                f"{where}.positions",
                f"{st.params.get('positions')!r} is not what vLLM's {family} gives the kept tokens; allowed: {want} "
                + ("(vLLM numbers the prompt's tokens by their index)" if want == "repack"
                   else "(each kept token keeps its M-RoPE (t, h, w) position)"))
        if found is not None:
            raise IncompatiblePolicyError(f"{where}.site", "at most one site=pre_llm stage")
        found = i
    if found is not None and pol.keeps_everything:
        found = None
    return ServePlan(pol, family or "any", found)


def servable_criteria() -> list[str]:
    """Registered criteria vLLM can serve at ``site=pre_llm`` (image-only, fixed count)."""
    return sorted(n for n, c in CRITERIA.items() if getattr(c, "image_only_fixed_count", False)
                  and "pre_llm" in getattr(c, "sites", ()))


# -- layouts of the families served here ----------------------------------------------------------------------
def llava_layout(hf_config: Any, n: int) -> ImageLayout:
    """One LLaVA-1.5 image of ``n`` tokens (the ``side x side`` grid, CLS first with ``full``), as ``patch()`` sees it."""
    from ...adapters.llava_hf import LlavaHFAdapter

    ids = torch.full((1, n), hf_config.image_token_id)
    return ImageLayout.from_visual_layout(LlavaHFAdapter().visual_layout(SimpleNamespace(config=hf_config), ids, {}))


def llava_next_layout(hf_config: Any, image_size: tuple[int, int], n: int | None = None) -> ImageLayout:
    """One LLaVA-NeXT image of original ``(height, width)``: base grid, unpadded anyres grid and ``image_newline``
    tokens in the packed order, from transformers' own ``pack_image_features`` (what ``patch()`` uses)."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    from ...adapters.llava_hf import LlavaHFAdapter

    shim = SimpleNamespace(config=hf_config)
    shim.model = SimpleNamespace(pack_image_features=MethodType(LlavaNextModel.pack_image_features, shim))
    sizes = torch.tensor([list(image_size)])
    if n is None:
        n = _llava_next_count(hf_config, image_size)
    ids = torch.full((1, n), hf_config.image_token_id)
    kwargs = {"image_sizes": sizes, "pixel_values": torch.empty(0)}
    return ImageLayout.from_visual_layout(LlavaHFAdapter().visual_layout(shim, ids, kwargs))


def _llava_next_count(hf_config: Any, image_size: tuple[int, int]) -> int:
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    vc = hf_config.vision_config
    side = vc.image_size // vc.patch_size
    n_patches = image_size_to_num_patches(list(image_size), hf_config.image_grid_pinpoints, vc.image_size)
    shim = SimpleNamespace(config=hf_config)
    feats = [torch.zeros(n_patches, side * side, 1)]
    packed, _ = LlavaNextModel.pack_image_features(shim, feats, torch.tensor([list(image_size)]), "default",
                                                   image_newline=torch.zeros(1))
    return int(packed[0].shape[0])
