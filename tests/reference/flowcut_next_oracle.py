"""Independent reference for FlowCut's official LLaVA-NeXT input to the language model (arXiv 2505.19536;
``TungChintao/FlowCut`` ``flowcut/llava_arch.py``: ``prepare_inputs_labels_for_multimodal_flowcut``,
``restore_image_features_sorted``, ``unpad_mask``), batch size 1, sharing no code with ``vlm_tokenprune``.

Per image: the base crop's kept patches in their order, then the anyres crops' kept patches put back on the full
``(rows x side) x (cols x side)`` grid, the padded border removed, and read in raster order; NO ``image_newline``
token anywhere. The grid border follows the Hugging Face model's own ``unpad_image`` (the official ``unpad_mask``
uses ``int()`` where HF rounds the scaled side: the same rows and columns except at rare float boundaries).
The tower part is ``flowcut_vit_oracle.flowcut_encode``.
"""
from __future__ import annotations

import torch

from . import eager_runner as base
from . import flowcut_vit_oracle as vit


def image_features(model, inputs: dict, K: int) -> list[torch.Tensor]:
    """Per image ``[n_i, D]``: the projected features the official code splices in, in its order."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image,
    )

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    feats, kept, _ = vit.flowcut_encode(model, vit.all_crops(model, inputs), K)
    out, c0 = [], 0
    with torch.no_grad():
        proj = [model.model.multi_modal_projector(f[1:]) for f in feats]  # CLS dropped ("default" strategy)
        for size in inputs["image_sizes"]:
            n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            parts = [proj[c0]]
            if n > 1:
                rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                D = proj[c0].shape[-1]
                grid = torch.zeros(D + 1, rows * side, cols * side)  # features + a "kept" channel
                for p in range(1, n):
                    pr, pc = divmod(p - 1, cols)
                    for i, t in enumerate(kept[c0 + p][1:]):
                        r, c = divmod(t - 1, side)
                        grid[:D, pr * side + r, pc * side + c] = proj[c0 + p][i]
                        grid[D, pr * side + r, pc * side + c] = 1.0
                grid = unpad_image(grid, size)
                for r in range(grid.shape[1]):
                    for c in range(grid.shape[2]):
                        if grid[D, r, c] > 0:
                            parts.append(grid[:D, r, c][None])
            out.append(torch.cat(parts))
            c0 += n
    return out


def lm_input(model, inputs: dict, K: int) -> tuple[torch.Tensor, list[int]]:
    """``(embeds [1, T', D], image positions in it)``: the prompt's text with each image's run of placeholders
    replaced by its official features (images must be separated by text)."""
    base.check_single(inputs)
    ids = inputs["input_ids"][0].tolist()
    feats = image_features(model, inputs, K)
    emb = model.get_input_embeddings()
    pieces, img_pos, n, i, p = [], [], 0, 0, 0
    with torch.no_grad():
        while p < len(ids):
            if ids[p] == model.config.image_token_id:
                while p < len(ids) and ids[p] == model.config.image_token_id:
                    p += 1
                f = feats[i]
                i += 1
                img_pos += list(range(n, n + f.shape[0]))
            else:
                f = emb(torch.tensor([ids[p]]))
                p += 1
            pieces.append(f)
            n += f.shape[0]
    assert i == len(feats), "one run of placeholders per image"
    return torch.cat(pieces)[None], img_pos
