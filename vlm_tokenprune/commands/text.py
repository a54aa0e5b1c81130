"""Output helpers of the ``vlm-tokenprune`` commands: tables, layer runs, FLOPs units, copyable stage strings."""
from __future__ import annotations

from typing import Any

from ..errors import VTPError


def table(rows: list[list[str]], header: list[str], notes: list[str] | None = None) -> str:
    """Left-aligned columns; ``notes[i]`` (if any) is printed on its own line under row i, indented."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt(header), fmt(["-" * w for w in widths])]
    for i, r in enumerate(rows):
        lines.append(fmt(r))
        if notes and notes[i]:
            lines.append(" " * (widths[0] + 4) + notes[i])
    return "\n".join(lines)


def runs(tokens: list[int]) -> list[str]:
    """``[640, 640, 352, ...]`` -> ``["layers  0-1 : 640", ...]`` (consecutive equal lengths merged)."""
    out, start = [], 0
    width = len(str(len(tokens) - 1))
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or tokens[i] != tokens[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            out.append(f"layer{'s' if i - 1 > start else ' '} {span.ljust(2 * width + 1)}: {tokens[start]}")
            start = i
    return out


def tflops(x: float) -> str:
    return f"{x / 1e12:.4g} TFLOPs" if x >= 1e11 else f"{x / 1e9:.4g} GFLOPs"


WIDTH = 100  # columns of `methods` (a stage string that holds a file path may run past it: it must stay one line)


def compact_stage(st: Any) -> str:
    """``st`` as a stage string that parses back to exactly ``st``: ``Stage.describe()`` without the parameters
    whose default gives the same stage (where, budget and positions always shown), so a line of `methods` can
    be copied into a policy."""
    from .. import Policy

    text = st.describe()
    name, _, rest = text.partition(":")
    items = [x for x in rest.split(",") if x] if rest else []
    fixed = {"layer", "depth", "site", "keep", "tokens", "of", "rounding", "positions"}
    for item in list(items):
        if item.partition("=")[0] in fixed and not st.structural:
            continue
        trial = [x for x in items if x != item]
        candidate = f"{name}:{','.join(trial)}" if trial else name
        try:
            if Policy.parse(candidate).stages == (st,):
                items = trial
        except VTPError:
            continue
    return f"{name}:{','.join(items)}" if items else name


def wrapped(text: str, indent: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * indent,
                         break_long_words=False, break_on_hyphens=False) or [""]
