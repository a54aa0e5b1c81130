"""Kept-token pictures: the input image with each stage's kept visual tokens highlighted, one panel per stage.

    from vlm_tokenprune.eval.visualize import kept_tokens_figure
    fig = kept_tokens_figure(image=img, question="where is the red circle ?", policy="fastv:layer=2,keep=0.25",
                             out="kept.png")          # default model: the shipped trained tiny LLaVA

How: one patched prefill (``model(**inputs)``) of the prompt; ``handle.last_trace()`` gives each stage's
kept ORIGINAL prompt positions; the adapter's ``VisualLayout`` maps a position to its patch grid
(``segment``) and ``row`` / ``col`` on it. The panel draws the first image's first grid (LLaVA-1.5 /
Qwen2-VL: the whole image; LLaVA-NeXT: the base, whole-image grid) over the image as the model sees it
(for 4-D ``pixel_values``, e.g. LLaVA-1.5: the processor's resized / cropped pixels, de-normalised;
otherwise the input image). Dropped cells are dimmed; kept cells keep their pixels and get an outline.
Merging stages (``aim_merge``, ``mctf``; ``trace.stages[i].sources``): every cell of a merged group (two or
more original patches standing for one kept token) is tinted with the group's own colour, its kept
token's cell outlined. Pillow only (no matplotlib).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..policy import Policy

KEPT_OUTLINE = (230, 30, 30)
DIM = 0.25  # brightness of dropped cells
TINT = 0.55  # weight of a merged group's colour over its cells' pixels


@dataclass
class StagePanel:
    """What one panel shows: a stage's kept cells on the first image's first patch grid."""

    title: str
    grid: tuple[int, int]  # (rows, cols) of the drawn patch grid
    kept_cells: list[tuple[int, int]]  # (row, col) of kept visual tokens on that grid
    visual_before: int  # visual tokens of the prompt row entering the stage (all grids)
    visual_after: int
    # merging stages: the cells each kept token stands for, one list per group of >= 2 cells on this grid
    groups: list[list[tuple[int, int]]] | None = None


def kept_tokens(model, processor, image, question: str, policy: Any, *, backend: str = "auto",
                prompt: str | None = None) -> tuple[Any, list[StagePanel]]:
    """Run one patched prefill of (``image``, ``question``); ``(image as the model sees it, panels)``."""
    from .. import patch
    from ..errors import InputError
    from .profiler import build_prompt, to_device

    pol = Policy.parse(policy)
    image = image.convert("RGB")
    text = prompt if prompt is not None else build_prompt(processor, question, 1)
    inputs = to_device(dict(processor(images=[image], text=[text], return_tensors="pt")), model)
    with patch(model, pol, backend=backend) as handle, torch.no_grad():
        model(**inputs, logits_to_keep=1)
        trace = handle.last_trace()
        layout = handle.adapter.visual_layout(model, inputs["input_ids"], inputs)
        # the trace lists token stages only; number panels as the policy does (structural stages count too)
        numbers = [j for j, st in enumerate(handle.policy.stages) if not st.structural or st.op == "visual_drop"]
    if trace is None or trace.phase != "prefill" or not trace.stages:
        raise InputError("image", "the prompt holds no visual tokens to prune (is the image token in the prompt?)")
    if not layout.coords_known:
        raise InputError("image", "the patch grid of this input is unknown (LLaVA-NeXT needs image_sizes)")
    vis = layout.is_visual[0]
    first_grid = (layout.segment[0] == layout.segment[0][vis].min()) & vis & (layout.row[0] >= 0)
    grid = (int(layout.row[0][first_grid].max()) + 1, int(layout.col[0][first_grid].max()) + 1)
    panels = []
    for i, s in enumerate(trace.stages):
        def cell(p: int) -> tuple[int, int]:
            return int(layout.row[0, p]), int(layout.col[0, p])

        kept = [p for p in s.kept_positions[0] if bool(first_grid[p])]
        groups = None
        if s.sources is not None:
            on_grid = ([cell(p) for p in src if bool(first_grid[p])] for src in s.sources[0])
            groups = [g for g in on_grid if len(g) >= 2]
        where = f"before layer {s.layer}" if s.is_llm else f"at {s.site}"
        number = numbers[i] if len(numbers) == len(trace.stages) else i
        title = f"stage {number}: {s.criterion} {where}: {s.visual_after[0]}/{s.visual_before[0]} kept"
        panels.append(StagePanel(title, grid, [cell(p) for p in kept], s.visual_before[0], s.visual_after[0], groups))
    return _model_view(processor, inputs, image), panels


def _model_view(processor, inputs: dict, image):
    """The image as the model sees it: de-normalised 4-D ``pixel_values`` of the first image, else ``image``."""
    from PIL import Image

    pv = inputs.get("pixel_values")
    ip = getattr(processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if pv is None or pv.dim() != 4 or mean is None or std is None:
        return image
    x = pv[0].float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def render_panels(image, panels: list[StagePanel], *, panel_size: int = 288, margin: int = 8, title_height: int = 28,
                  caption: str | None = None, legend: bool = True, line_height: int = 16):
    """One row of panels (left to right = stages); returns a PIL image of width
    ``len(panels) * (panel_size + margin) + margin``. ``caption`` (e.g. the question and the answer) and a
    ``legend`` (kept / dropped / merged group) are drawn under the panels, one line each."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = image.size
    scale = panel_size / max(w, h)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    base = image.resize((pw, ph), Image.NEAREST if scale >= 1 else Image.BILINEAR)
    width = len(panels) * (panel_size + margin) + margin
    extra = line_height * ((caption is not None) + bool(legend))
    height = title_height + panel_size + margin + extra
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    dark = Image.eval(base, lambda v: int(v * DIM))
    for i, panel in enumerate(panels):
        x0 = margin + i * (panel_size + margin)
        rows, cols = panel.grid
        mask = Image.new("L", (pw, ph), 0)
        md = ImageDraw.Draw(mask)
        boxes = []
        for r, c in panel.kept_cells:
            box = _box(r, c, rows, cols, pw, ph)
            md.rectangle(box, fill=255)
            boxes.append(box)
        tile = Image.composite(base, dark, mask)
        for g, group in enumerate(panel.groups or ()):
            gmask = Image.new("L", (pw, ph), 0)
            gd = ImageDraw.Draw(gmask)
            for r, c in group:
                gd.rectangle(_box(r, c, rows, cols, pw, ph), fill=255)
            tinted = Image.blend(base, Image.new("RGB", (pw, ph), group_colour(g)), TINT)
            tile = Image.composite(tinted, tile, gmask)
        td = ImageDraw.Draw(tile)
        for box in boxes:
            td.rectangle(box, outline=KEPT_OUTLINE)
        canvas.paste(tile, (x0, title_height))
        draw.text((x0, 4), _fit(panel.title, panel_size, draw, font), fill=(0, 0, 0), font=font)
    y = title_height + panel_size + margin // 2
    if caption is not None:
        draw.text((margin, y), _fit(caption, width - 2 * margin, draw, font), fill=(0, 0, 0), font=font)
        y += line_height
    if legend:
        _legend(draw, font, margin, y, line_height - 4, any(p.groups for p in panels))
    return canvas


def _legend(draw, font, x: int, y: int, size: int, merged: bool) -> None:
    """Swatches: kept (bright, outlined), dropped (dimmed), and a merged group's tint when a panel has one."""
    items = [((200, 200, 200), KEPT_OUTLINE, "kept"), ((int(200 * DIM),) * 3, None, "dropped")]
    if merged:
        items.append((group_colour(0), KEPT_OUTLINE, "merged group (outlined: the kept token)"))
    for fill, outline, label in items:
        draw.rectangle((x, y, x + size, y + size), fill=fill, outline=outline)
        draw.text((x + size + 4, y), label, fill=(0, 0, 0), font=font)
        x += size + 12 + int(draw.textlength(label, font=font))


def _box(r: int, c: int, rows: int, cols: int, pw: int, ph: int) -> tuple[int, int, int, int]:
    return round(c * pw / cols), round(r * ph / rows), round((c + 1) * pw / cols) - 1, round((r + 1) * ph / rows) - 1


def group_colour(g: int) -> tuple[int, int, int]:
    """A distinct, saturated colour for merged group ``g`` (golden-ratio hue steps)."""
    import colorsys

    h = (g * 0.618033988749895) % 1.0
    return tuple(round(255 * v) for v in colorsys.hsv_to_rgb(h, 0.85, 0.95))


def _fit(text: str, width: int, draw, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
        if text == "…":
            break
    return text


def pruned_answer(model, processor, image, question: str, policy: Any, backend: str = "auto", prompt: str | None = None,
                  max_new_tokens: int = 8) -> str:
    """The patched model's greedy answer to (``image``, ``question``), for the figure's caption."""
    from .. import patch
    from .profiler import build_prompt, to_device

    text = prompt if prompt is not None else build_prompt(processor, question, 1)
    inputs = to_device(dict(processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")), model)
    with patch(model, policy, backend=backend), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tok = getattr(processor, "tokenizer", processor)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def kept_tokens_figure(model=None, processor=None, *, image, question: str, policy: Any, out: "str | os.PathLike | None" = None,
                       backend: str = "auto", prompt: str | None = None, panel_size: int = 288):
    """The picture of ``policy`` on (``image``, ``question``): one panel per stage (see the module docstring).

    ``model``/``processor`` default to the shipped tiny VLM. Returns the PIL image (saved to ``out`` if given).
    """
    if model is None:
        from .tiny_vlm import load_tiny_vlm

        model, processor = load_tiny_vlm()
    view, panels = kept_tokens(model, processor, image, question, policy, backend=backend, prompt=prompt)
    caption = f"Q: {question}  A (pruned): {pruned_answer(model, processor, image, question, policy, backend, prompt)}"
    fig = render_panels(view, panels, panel_size=panel_size, caption=caption)
    if out is not None:
        fig.save(out)
    return fig
