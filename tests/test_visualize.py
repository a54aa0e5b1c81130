"""Kept-token pictures (``vlm_tokenprune.eval.visualize``) and ``vlm-tokenprune viz``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_tokenprune import patch
from vlm_tokenprune.cli import main
from vlm_tokenprune.eval import visualize as V
from vlm_tokenprune.eval.synthetic import make_example
from vlm_tokenprune.eval.tiny_vlm import IMAGE_TOKEN_ID, load_tiny_vlm, prompts

THREE = "fastv:layer=1,keep=0.3+fastv:layer=2,keep=0.15+fastv:layer=3,keep=0.05"


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_tiny_vlm()


def width(n_panels: int, size: int = 288, margin: int = 8) -> int:
    return n_panels * (size + margin) + margin


def test_cells_are_the_traced_kept_positions_on_the_patch_grid(tiny):
    model, processor = tiny
    ex = make_example(2_000_000_001, "location")
    view, panels = V.kept_tokens(model, processor, ex["image"], ex["question"], THREE)
    # the same prefill by hand: kept original positions -> index from the first image token -> (row, col) on the 16x16 grid
    inputs = processor(images=[ex["image"]], text=prompts([ex["question"]]), return_tensors="pt")
    first = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with patch(model, THREE) as h, torch.no_grad():
        model(**inputs)
        trace = h.last_trace()
    assert len(panels) == 3
    for panel, st in zip(panels, trace.stages):
        assert panel.grid == (side, side)
        assert sorted(panel.kept_cells) == sorted(divmod(p - first, side) for p in st.kept_positions[0])
        assert panel.visual_after == len(panel.kept_cells) == st.visual_after[0]
    assert [p.visual_after for p in panels] == [77, 38, 13]  # 30 / 15 / 5 % of 256
    # LLaVA-1.5: the picture is the processor's pixels, de-normalised (here the 128 px image itself)
    assert view.size == ex["image"].size
    diff = np.asarray(view, dtype=np.int16) - np.asarray(ex["image"], dtype=np.int16)
    assert np.abs(diff).max() <= 1


def test_figure_has_one_panel_per_stage_kept_cells_bright_dropped_dim(tiny, tmp_path):
    model, processor = tiny
    ex = make_example(2_000_000_001, "location")
    out = tmp_path / "kept.png"
    fig = V.kept_tokens_figure(model, processor, image=ex["image"], question=ex["question"], policy=THREE, out=out)
    with Image.open(out) as im:
        assert im.size == fig.size == (width(3), 28 + 288 + 8 + 2 * 16)  # + the Q / A caption and the legend lines
    _, panels = V.kept_tokens(model, processor, ex["image"], ex["question"], THREE)
    side = panels[0].grid[0]
    cell = 288 // side
    src = ex["image"].resize((288, 288), Image.NEAREST)
    for i, panel in enumerate(panels):
        x0 = 8 + i * (288 + 8)
        kept = set(panel.kept_cells)
        for r, c in [(r, c) for r in range(side) for c in range(side)][::7]:
            px = fig.getpixel((x0 + c * cell + cell // 2, 28 + r * cell + cell // 2))
            orig = src.getpixel((c * cell + cell // 2, r * cell + cell // 2))
            if (r, c) in kept:
                assert px == orig
            else:
                assert all(abs(a - int(b * V.DIM)) <= 1 for a, b in zip(px, orig))


def test_merged_groups_get_their_own_colour(tiny, tmp_path):
    model, processor = tiny
    ex = make_example(2_000_000_002, "color")
    policy = "aim_merge:keep=0.125"
    view, panels = V.kept_tokens(model, processor, ex["image"], ex["question"], policy)
    (panel,) = panels
    side = panel.grid[0]
    # the groups are the trace's merge sources on the grid: they partition every cell, one kept cell each
    inputs = processor(images=[ex["image"]], text=prompts([ex["question"]]), return_tensors="pt")
    first = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    with patch(model, policy) as h, torch.no_grad():
        model(**inputs)
        st = h.last_trace().stages[0]
    by_hand = [sorted(divmod(p - first, side) for p in src) for src in st.sources[0] if len(src) >= 2]
    assert sorted(map(sorted, panel.groups)) == sorted(by_hand) and by_hand
    covered = [c for src in st.sources[0] for c in src]
    assert sorted(covered) == list(range(first, first + side * side))
    fig = V.render_panels(view, panels)
    cell = 288 // side
    src_img = view.resize((288, 288), Image.NEAREST)
    for g, group in enumerate(panel.groups):
        colour = V.group_colour(g)
        for r, c in group[:3]:
            px = fig.getpixel((8 + c * cell + cell // 2, 28 + r * cell + cell // 2))
            orig = src_img.getpixel((c * cell + cell // 2, r * cell + cell // 2))
            expect = [round(o * (1 - V.TINT) + k * V.TINT) for o, k in zip(orig, colour)]
            assert all(abs(a - b) <= 2 for a, b in zip(px, expect)), (g, r, c, px, expect)


def test_viz_cli_default_model_and_synthetic_image(capsys, tmp_path):
    out = tmp_path / "one.png"
    assert main(["viz", "--policy", "fastv:layer=2,keep=0.25", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] == width(1)
    img = tmp_path / "in.png"
    make_example(2_000_000_003)["image"].save(img)
    assert main(["viz", "--image", str(img), "--question", "what digit is written ?",
                 "--policy", "feather:layer=1,keep=0.3+feather:layer=2,keep=0.09,of=current", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] == width(2)
    assert main(["viz", "--image", str(tmp_path / "missing.png"), "--question", "q", "--policy", "fastv"]) == 2
    assert "--image" in capsys.readouterr().err
