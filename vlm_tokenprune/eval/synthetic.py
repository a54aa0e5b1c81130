"""Deterministic synthetic visual question answering (numpy + PIL only).

Scenes are laid out on an ``IMAGE_SIZE`` x ``IMAGE_SIZE`` canvas split into a ``GRID`` x ``GRID`` grid of
cells, and drawn at ``RENDER_SIZE`` pixels by default (the shipped tiny VLM's input: 16 x 16 patches of 8 px);
``image_size=`` draws the same scene at another size (96 = the layout's native size, pixel for pixel).
Between ``MIN_OBJECTS`` and ``MAX_OBJECTS`` cells hold one coloured shape (every colour-shape pair at
most once per image, so "the red circle" is unambiguous) and one other cell holds a black digit drawn
from a 5x7 bitmap font. All other cells are empty. Question types (``QTYPES``):

``color``     "what color is the object in the top left ?"   -> "red"
``location``  "where is the red circle ?"                     -> "top left"
``exists``    "is there a blue square ?"                      -> "yes" / "no" (half the negatives share
              the colour or the shape with an object in the image, POPE-"adversarial" style)
``count``     "how many circles ?"                            -> "0" ... "6"
``read``      "what digit is written ?"                       -> "0" ... "9"

Cell names are ``"{row} {col}"`` with rows ``top upper lower bottom`` and columns
``left midleft midright right``. Answers are one word, except location (two words). Everything is a
pure function of the seed; :func:`make_split` uses disjoint seed ranges per split.

``scene_labels`` gives per-cell ground truth (used by the training script for its auxiliary
per-patch loss) and :func:`ask` draws further questions about the same scene (multi-question packing).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96  # layout units
RENDER_SIZE = 128  # pixels drawn by default
GRID = 4
CELL = IMAGE_SIZE // GRID
MIN_OBJECTS, MAX_OBJECTS = 3, 6

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (235, 205, 30), "purple": (145, 60, 185), "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
ROWS = ("top", "upper", "lower", "bottom")
COLS = ("left", "midleft", "midright", "right")
DIGITS = tuple(str(i) for i in range(10))
QTYPES = ("color", "location", "exists", "count", "read")
BACKGROUND = (245, 245, 240)
DIGIT_SCALE = 3  # 5x7 font -> 15x21 px

SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_SEED_SPAN = 1_000_000_000

_FONT = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}


def cell_name(cell: int) -> str:
    return f"{ROWS[cell // GRID]} {COLS[cell % GRID]}"


def vocabulary() -> list[str]:
    """Every word the generator and the prompt template can produce (lower case, no specials)."""
    words = ["user", "assistant", ":", "?", "what", "color", "is", "the", "object", "in", "where",
             "there", "a", "how", "many", "digit", "written", "yes", "no", "none"]
    words += list(COLORS) + list(SHAPES) + [PLURALS[s] for s in SHAPES] + list(ROWS) + list(COLS) + list(DIGITS)
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


def make_scene(seed: int) -> dict:
    """Scene layout for ``seed``: objects {cell: (color, shape, size, dx, dy)}, the digit and its cell."""
    rng = np.random.default_rng([int(seed), 7])
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = rng.permutation(GRID * GRID)[: n + 1]
    combos = rng.permutation(len(COLORS) * len(SHAPES))[:n]
    objects = {}
    for c, k in zip(cells[:n], combos):
        size = int(rng.integers(15, 21))
        slack = CELL - size - 2
        dx, dy = (int(v) for v in rng.integers(0, slack + 1, size=2))
        objects[int(c)] = (COLORS[k // len(SHAPES)], SHAPES[k % len(SHAPES)], size, dx + 1, dy + 1)
    digit = DIGITS[int(rng.integers(0, 10))]
    w, h = 5 * DIGIT_SCALE, 7 * DIGIT_SCALE
    ddx, ddy = int(rng.integers(0, CELL - w + 1)), int(rng.integers(0, CELL - h + 1))
    return {"seed": int(seed), "objects": objects, "digit": digit, "digit_cell": int(cells[n]),
            "digit_offset": (ddx, ddy)}


def render(scene: dict, image_size: int | None = None) -> Image.Image:
    """The scene drawn at ``image_size`` px (default ``RENDER_SIZE``). Layouts are in ``IMAGE_SIZE`` units and
    scaled, so every size shows the same scene (e.g. 128 px for a 16 x 16 grid of 8-px patches: 32-px cells,
    digit font pixels 4 px wide); ``IMAGE_SIZE`` draws the layout pixel for pixel."""
    size_px = RENDER_SIZE if image_size is None else int(image_size)
    f = size_px / IMAGE_SIZE

    def px(v: float) -> int:  # a length in IMAGE_SIZE units -> pixels (exact at the native size)
        return int(round(v * f))

    img = Image.new("RGB", (size_px, size_px), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for cell, (color, shape, size, dx, dy) in scene["objects"].items():
        x0 = (cell % GRID) * CELL + dx
        y0 = (cell // GRID) * CELL + dy
        box = (px(x0), px(y0), px(x0 + size) - 1, px(y0 + size) - 1)
        fill = RGB[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((x0 + size / 2) * f - 0.5, px(y0)), (px(x0), box[3]), (box[2], box[3])], fill=fill)
    cell = scene["digit_cell"]
    x0 = (cell % GRID) * CELL + scene["digit_offset"][0]
    y0 = (cell // GRID) * CELL + scene["digit_offset"][1]
    s = DIGIT_SCALE
    for r, line in enumerate(_FONT[scene["digit"]]):
        for c, bit in enumerate(line):
            if bit == "1":
                draw.rectangle((px(x0 + c * s), px(y0 + r * s), px(x0 + c * s + s) - 1, px(y0 + r * s + s) - 1), fill=(0, 0, 0))
    return img


def scene_labels(scene: dict) -> dict[str, np.ndarray]:
    """Per-cell ground truth ([GRID*GRID] int arrays), row-major.

    ``combo``: 0 empty, 1..18 colour-shape pair (1 + colour*3 + shape), 19 digit cell;
    ``color``: 0 none, 1..6; ``shape``: 0 none, 1..3, 4 digit; ``digit``: 0 none, 1..10 (digit+1).
    """
    n = GRID * GRID
    combo, color, shape, digit = (np.zeros(n, dtype=np.int64) for _ in range(4))
    for cell, (col, shp, *_rest) in scene["objects"].items():
        ci, si = COLORS.index(col), SHAPES.index(shp)
        combo[cell] = 1 + ci * len(SHAPES) + si
        color[cell] = 1 + ci
        shape[cell] = 1 + si
    dc = scene["digit_cell"]
    combo[dc] = 1 + len(COLORS) * len(SHAPES)
    shape[dc] = 1 + len(SHAPES)
    digit[dc] = 1 + int(scene["digit"])
    return {"combo": combo, "color": color, "shape": shape, "digit": digit}


def ask(scene: dict, qtype: str, rng: np.random.Generator, *, absent_location: bool = False) -> tuple[str, str, object]:
    """One question of ``qtype`` about ``scene``: (question, answer, key) where ``key`` names the object cell
    the question reveals (None if none) so a packer can avoid questions that give each other's answers away.

    ``absent_location=True`` (training only) asks where an absent colour-shape pair is (answer "none").
    """
    objs = scene["objects"]
    cells = sorted(objs)
    present = {(c, s) for c, s, *_ in objs.values()}
    if qtype == "color":
        cell = cells[int(rng.integers(len(cells)))]
        return f"what color is the object in the {cell_name(cell)} ?", objs[cell][0], cell
    if qtype == "location":
        if absent_location:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            c, s = absent[int(rng.integers(len(absent)))]
            return f"where is the {c} {s} ?", "none", ("absent", c, s)
        cell = cells[int(rng.integers(len(cells)))]
        return f"where is the {objs[cell][0]} {objs[cell][1]} ?", cell_name(cell), cell
    if qtype == "exists":
        if rng.random() < 0.5:
            cell = cells[int(rng.integers(len(cells)))]
            return f"is there a {objs[cell][0]} {objs[cell][1]} ?", "yes", cell
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        colors = {c for c, _ in present}
        shapes = {s for _, s in present}
        hard = [(c, s) for c, s in absent if c in colors or s in shapes]
        pool = hard if (hard and rng.random() < 0.5) else absent
        c, s = pool[int(rng.integers(len(pool)))]
        return f"is there a {c} {s} ?", "no", ("absent", c, s)
    if qtype == "count":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        n = sum(1 for _c, s, *_ in objs.values() if s == shape)
        return f"how many {PLURALS[shape]} ?", str(n), ("count", shape)
    if qtype == "read":
        return "what digit is written ?", scene["digit"], "read"
    raise ValueError(f"unknown question type {qtype!r}; allowed: {', '.join(QTYPES)}")


def make_example(seed: int, qtype: str | None = None, image_size: int | None = None) -> dict:
    """One (image, question, answer, qtype) example; the question type is drawn from the seed unless given.
    ``image_size`` (default ``RENDER_SIZE``) only changes the rendering, not the scene or the question."""
    scene = make_scene(seed)
    rng = np.random.default_rng([int(seed), 11])
    if qtype is None:
        qtype = QTYPES[int(rng.integers(len(QTYPES)))]
    question, answer, _key = ask(scene, qtype, rng)
    return {"image": render(scene, image_size), "question": question, "answer": answer, "qtype": qtype, "seed": int(seed)}


def split_seeds(name: str, n: int) -> range:
    if name not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {name!r}; allowed: train, val, test")
    if n > SPLIT_SEED_SPAN:
        raise ValueError(f"n={n} exceeds the split's seed range ({SPLIT_SEED_SPAN})")
    base = SPLIT_SEED_BASE[name]
    return range(base, base + n)


def make_split(name: str, n: int, balanced: bool = True, image_size: int | None = None) -> list[dict]:
    """``n`` examples of split ``name`` ("train" / "val" / "test"), disjoint seed ranges per split.

    ``balanced=True`` cycles through the question types (example i has type ``QTYPES[i % 5]``) so small
    subsets cover every type equally; otherwise each type is drawn from the seed. ``image_size`` renders the
    images at that size (default ``RENDER_SIZE``; e.g. the processor's, ``processor.image_processor.size``).
    """
    return [make_example(s, QTYPES[i % len(QTYPES)] if balanced else None, image_size)
            for i, s in enumerate(split_seeds(name, n))]
