"""Batch helpers: a padded batch row as its own batch of one, visual-token counts, generated tokens."""
from __future__ import annotations

import torch

from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID


def n_image_tokens(inputs: dict, b: int = 0) -> int:
    """Image placeholders in row ``b``."""
    return int((inputs["input_ids"][b] == IMAGE_TOKEN_ID).sum())


def n_visual(inputs: dict, b: int = 0) -> int:
    """Image and video placeholders in row ``b`` (Qwen2-VL counts both as visual tokens)."""
    ids = inputs["input_ids"][b]
    return int(((ids == IMAGE_TOKEN_ID) | (ids == QWEN_VIDEO_TOKEN_ID)).sum())


def left_padding(inputs: dict, b: int) -> int:
    """Padding slots of row ``b`` (positions of the row alone = batch positions minus this, left padded)."""
    return int((inputs["attention_mask"][b] == 0).sum())


def _take(inputs: dict, rows: list, b: int, kind: str, grid_key: str, pix_key: str) -> dict:
    """Row ``b``'s Qwen images (``kind="img"``) or videos (``"vid"``): their grids and flattened patches."""
    before = sum(seg == kind for r in rows[:b] for seg in r)
    n = sum(seg == kind for seg in rows[b])
    if not n:
        return {}
    patches = inputs[grid_key].prod(-1)
    start = int(patches[:before].sum())
    out = {grid_key: inputs[grid_key][before:before + n],
           pix_key: inputs[pix_key][start:start + int(patches[before:before + n].sum())]}
    if kind == "vid" and "second_per_grid_ts" in inputs:
        out["second_per_grid_ts"] = inputs["second_per_grid_ts"][before:before + n]
    return out


def row_alone(inputs: dict, rows: list, b: int) -> dict:
    """Row ``b`` of a padded batch (``make_batch`` / ``make_qwen_batch`` of ``rows``) as its own unpadded
    batch of one, with its own images (and videos) only; works for either padding side."""
    real = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][real][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in inputs:  # Qwen2-VL / 2.5-VL: patches flattened over images, grids per image
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][b][real][None]
        out.update(_take(inputs, rows, b, "img", "image_grid_thw", "pixel_values"))
        out.update(_take(inputs, rows, b, "vid", "video_grid_thw", "pixel_values_videos"))
        return out
    if "token_type_ids" in inputs:  # Gemma 3: 1 at the image placeholders (the bidirectional image block)
        out["token_type_ids"] = inputs["token_type_ids"][b][real][None]
    first = sum(seg == "img" for r in rows[:b] for seg in r)
    n_img = sum(seg == "img" for seg in rows[b])
    if n_img:
        out["pixel_values"] = inputs["pixel_values"][first: first + n_img]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][first: first + n_img]
    return out


def new_tokens(ids: torch.Tensor, prompt_len: int, eos, pad) -> list[int]:
    """Generated tokens of one row up to and including the first EOS (the rest of a batch row is padding)."""
    out = []
    for t in ids[prompt_len:].tolist():
        out.append(t)
        if t == eos:
            break
    rest = ids[prompt_len + len(out):].tolist()
    assert all(t == pad for t in rest), rest
    return out


def cache_kwargs(out) -> dict:
    """The keyword that passes the KV cache ``out`` returned to the next forward: ``cache=`` on transformers
    >= 5.2x (which renamed it), ``past_key_values=`` on earlier 5.x (setup.py's window starts at 5.17)."""
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}
