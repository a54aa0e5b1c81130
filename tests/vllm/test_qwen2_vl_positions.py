"""The M-RoPE numbering the vLLM Qwen2-VL / 2.5-VL subclasses give a reduced prompt == what ``patch()``
gives it with ``positions=gaps`` (kept tokens keep transformers' ``get_rope_index`` ids of the UNREDUCED
prompt, text does not move, decoding continues after the largest id), including when vLLM feeds an
image's features over several prefill chunks. Pure functions: runs without vLLM."""
from __future__ import annotations

import pytest
import torch

from kit import tiny_qwen
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, make_qwen_batch
from vlm_tokenprune.integrations.vllm.qwen2_vl import (
    grid_positions, prompt_mrope_positions, qwen_image_layout, write_kept_positions,
)

ROW = [4, "img", 3, "img", 1, "img", 5]
GRIDS = [(2, 3), (4, 2), (1, 5)]  # (h, w) merged tokens: non-square, wide and tall


def hf_positions(model, inputs) -> torch.Tensor:
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])
    return pos[:, 0]  # [3, L]


def items_of(ids: torch.Tensor, grids, counts):
    """(offset, placeholders, t, h, w, 1.0) per image, offsets in the (reduced) prompt ``ids``."""
    starts = torch.nonzero(ids == QWEN_VISION_START_ID).flatten().tolist()
    return [(s + 1, k, 1, h, w, 1.0) for s, (h, w), k in zip(starts, grids, counts)]


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_unreduced_prompt_numbered_as_get_rope_index(version):
    model = tiny_qwen("sdpa", version)
    inputs = make_qwen_batch(model, [ROW], image_grids=GRIDS)
    ids = inputs["input_ids"][0]
    pos, delta = prompt_mrope_positions(len(ids), items_of(ids, GRIDS, [h * w for h, w in GRIDS]))
    want = hf_positions(model, inputs)
    assert torch.equal(pos, want)
    assert delta == int(want.max()) + 1 - len(ids)


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
def test_reduced_prompt_keeps_original_positions(version, chunk):
    """Drop a random subset of each image's tokens; the features (with their (t, h, w) channels) arrive whole or
    in prefill chunks of ``chunk`` prompt tokens. Kept tokens get the unreduced prompt's ids, text keeps its ids."""
    model = tiny_qwen("sdpa", version)
    inputs = make_qwen_batch(model, [ROW], image_grids=GRIDS)
    ids = inputs["input_ids"][0]
    full = hf_positions(model, inputs)
    g = torch.Generator().manual_seed(0)
    is_img = ids == IMAGE_TOKEN_ID
    img_idx = torch.nonzero(is_img).flatten()
    keep = torch.ones(len(ids), dtype=torch.bool)
    embeds, counts, first = [], [], 0
    for h, w in GRIDS:
        n = h * w
        kept = torch.sort(torch.randperm(n, generator=g)[: max(1, n // 2)]).values
        drop = torch.ones(n, dtype=torch.bool)
        drop[kept] = False
        keep[img_idx[first:first + n][drop]] = False
        thw = grid_positions(1, h, w)[kept].float()
        embeds.append(torch.cat([torch.randn(len(kept), 8, generator=g), thw], 1))
        counts.append(len(kept))
        first += n
    red_ids = ids[keep]
    pos, delta = prompt_mrope_positions(len(red_ids), items_of(red_ids, GRIDS, counts))
    want = full[:, keep]
    text = red_ids != IMAGE_TOKEN_ID
    assert torch.equal(pos[:, text], want[:, text])  # text is final before any feature exists
    assert delta == int(full.max()) + 1 - len(red_ids)  # decode continues after the largest id, as patch()
    # the runner: each step hands the slices of the features its chunk covers
    media = (IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID)
    step = chunk or len(red_ids)
    slots = torch.nonzero(red_ids == IMAGE_TOKEN_ID).flatten().tolist()
    flat = torch.cat(embeds)
    for start in range(0, len(red_ids), step):
        in_chunk = [i for i, s in enumerate(slots) if start <= s < start + step]
        chunk_embeds = [flat[i:i + 1] for i in in_chunk]  # worst case: one slice per token
        feats, pos, d = write_kept_positions(red_ids, chunk_embeds, pos, start, media, QWEN_VISION_START_ID)
        assert all(f.shape[1] == 8 for f in feats) and d == delta
    assert torch.equal(pos, want)


def test_image_layout_is_the_adapters_raster_grid():
    model = tiny_qwen("sdpa", "2")
    lay = qwen_image_layout(model.config, [1, 8, 6])  # merge 2: 4 x 3 merged tokens
    assert lay.n == 12 and lay.coords_known
    assert lay.row.tolist() == [r for r in range(4) for _ in range(3)]
    assert lay.col.tolist() == [c for _ in range(4) for c in range(3)]
    assert not bool(lay.is_newline.any()) and not bool(lay.segment.any())


def test_serve_plan_from_the_config(monkeypatch):
    """No policy, or one that keeps every token: None (the subclasses then run as stock vLLM's); ``repack`` on
    Qwen: refused naming the field, before any engine exists."""
    import copy

    from vlm_tokenprune.errors import IncompatiblePolicyError
    from vlm_tokenprune.integrations.vllm.qwen2_vl import serve_plan

    monkeypatch.delenv("VTP_POLICY", raising=False)
    cfg = copy.deepcopy(tiny_qwen("sdpa", "2").config)
    assert serve_plan(cfg) is None
    cfg.vtp_policy = "uniform:site=pre_llm,keep=1.0,positions=gaps"
    assert serve_plan(cfg) is None
    cfg.vtp_policy = "divprune:keep=0.25,positions=gaps"
    assert serve_plan(cfg).stage.criterion == "divprune"
    cfg.vtp_policy = "divprune"  # the preset says positions=repack
    with pytest.raises(IncompatiblePolicyError, match=r"stages\[0\]\.positions.*allowed: gaps"):
        serve_plan(cfg)
