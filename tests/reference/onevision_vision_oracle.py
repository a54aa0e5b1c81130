"""Independent reference for VisPruner's official SigLIP variant (arXiv 2412.01818, ``siglip_encoder.py``) at
LLaVA-OneVision's vision site (arXiv 2408.03326), sharing no code with ``vlm_tokenprune`` (torch, the Hugging Face
model's own modules and packing helpers, and the other reference files).

One row alone (batch 1, one image, all its placeholders in that row):
  * the image's crops: the base image, then ``get_anyres_image_grid_shape`` crops (rows x cols), each a SigLIP pass
    written out (``gemma3_vision_oracle.siglip``: eager loops; importance = last-layer attention each patch
    RECEIVES, mean over queries then heads; the last layer's output is what ``vision_feature_layer=-1`` reads);
  * per crop, VisPruner's selection (``vispruner_oracle.paper_select``) of ``T`` patches: important by importance,
    diverse by duplicate removal on the patches' normalised features;
  * every patch is projected by the model's projector; the placeholders, in order: the base crop's patches in
    raster order, then the anyres grid (crops tiled rows x cols, each ``side x side``) unpadded by transformers'
    ``unpad_image`` (run on row / col index maps), row by row, each row closed by one ``image_newline``;
  * an image whose unpadded grid is larger than ``anyres_max_N`` allows (``sqrt(h * w / (N * side^2)) > 1.1``, the
    model's bilinear resize) keeps ALL its tokens: its packed tokens mix neighbouring patches;
  * the language model runs on the row with the dropped patches' placeholders removed (newlines kept), original
    position ids (``positions=gaps``) or ``0..n'-1`` (``repack``), through ``pre_llm_oracle``.
"""
from __future__ import annotations

import math

import torch

from . import gemma3_vision_oracle as siglip_oracle
from . import pre_llm_oracle as po
from . import vispruner_oracle as vp


def placeholders(model, size) -> list[tuple[int, int] | None]:
    """The image's packed tokens in order: ``(crop, patch)``, or None for an ``image_newline`` (no resize)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    s = cfg.vision_config.image_size
    side = s // cfg.vision_config.patch_size
    out: list = [(0, p) for p in range(side * side)]
    nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, s)
    H, W = nph * side, npw * side
    idx = torch.stack([torch.arange(H)[:, None].expand(H, W), torch.arange(W)[None, :].expand(H, W)]).float()
    rc = unpad_image(idx, torch.as_tensor(size)).long()
    for i in range(rc.shape[1]):
        for j in range(rc.shape[2]):
            r, c = int(rc[0, i, j]), int(rc[1, i, j])
            out.append((1 + (r // side) * npw + c // side, (r % side) * side + c % side))
        out.append(None)
    return out


def resized(model, size) -> bool:
    """The model's anyres_max rule: the unpadded grid is bilinearly shrunk (its tokens then mix patches)."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    toks = placeholders(model, size)
    h = sum(t is None for t in toks)
    w = (len(toks) - side * side) // h - 1
    n = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
    return math.sqrt(h * w / (n * side * side)) > 1.1


def kept_patches(model, crops: torch.Tensor, T: int, r: float) -> tuple[list[list[int]], torch.Tensor]:
    """(per crop its kept patches, ascending; ``[n, N, text_D]`` every patch projected)."""
    kept, feats = [], []
    for crop in crops:
        out, imp = siglip_oracle.siglip(model, crop)
        N = out.shape[0]
        kept.append(sorted(vp.paper_select([float(a) for a in imp], out, T, r)) if T < N else list(range(N)))
        feats.append(out)
    with torch.no_grad():
        proj = model.model.multi_modal_projector(torch.stack(feats))
    return kept, proj


def reduced_row(model, inputs: dict, T: int, r: float):
    """(kept visual positions, LLM input ``[n', D]``, their position ids, the unreduced length) of a row alone."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config
    size = inputs["image_sizes"][0]
    n_crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    toks = placeholders(model, size)
    keep_all = resized(model, size)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids).clone()
    img = (ids == cfg.image_token_id).nonzero()[:, 0].tolist()
    if keep_all:  # the model's own features at every placeholder (nothing dropped)
        with torch.no_grad():
            f = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                               return_dict=True).pooler_output[0]
        assert len(img) == f.shape[0]
        emb[img] = f
        return img, emb, list(range(len(ids))), len(ids)
    assert len(img) == len(toks)
    kept, proj = kept_patches(model, inputs["pixel_values"][0][:n_crops], T, r)
    drop = set()
    for p, t in zip(img, toks):
        if t is None:
            emb[p] = model.model.image_newline.detach()
        elif t[1] in kept[t[0]]:
            emb[p] = proj[t[0], t[1]]
        else:
            drop.add(p)
    pos = [p for p in range(len(ids)) if p not in drop]
    return [p for p in img if p not in drop], emb[pos], pos, len(ids)


def logits(model, inputs: dict, T: int, r: float, positions: str = "gaps") -> tuple[list[int], torch.Tensor]:
    """(kept visual positions, logits ``[n', V]`` of the reduced row; ``positions``: gaps (original position ids)
    or repack (0..n'-1))."""
    kept, x, pos, _ = reduced_row(model, inputs, T, r)
    return kept, po.row_logits(model, x, pos, positions)


def greedy(model, inputs: dict, T: int, r: float, steps: int, suppress: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens after the reduced row (no cache: the whole sequence each step; new tokens at positions
    n, n + 1, ... after the unreduced prompt's n), ``suppress``: never chosen."""
    _, x, pos, n = reduced_row(model, inputs, T, r)
    out = []
    for _ in range(steps):
        last = po.row_logits(model, x, pos, "gaps")[-1].clone()
        for t in suppress:
            last[t] = float("-inf")
        tok = int(last.argmax())
        out.append(tok)
        with torch.no_grad():
            x = torch.cat([x, model.get_input_embeddings()(torch.tensor([tok]))])
        pos = pos + [n]
        n += 1
    return out
