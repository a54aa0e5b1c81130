"""``vlm-tokenprune methods``: every preset and criterion, with a stage string one can copy into a policy."""
from __future__ import annotations

import argparse

from ..errors import VTPError
from .text import compact_stage, wrapped


def cmd_methods(args: argparse.Namespace) -> int:
    from .. import CRITERIA, PRESETS, Policy

    lines = ["Presets: the first word of a policy string, listed with stages that parse back to the same policy",
             "(copy them to change a layer or a budget); depth=32: a paper's layer for a 32-layer LLM, mapped to",
             "the model's depth by patch(). Keys override a one-stage preset (layer, keep, tokens, criterion",
             "params); a multi-stage one takes its criteria's params and rounding.", ""]
    for name, preset in PRESETS.items():
        lines.append(f"{name}" + (f"  [arXiv {preset.arxiv}]" if preset.arxiv else ""))
        try:
            stages = [compact_stage(s) for s in Policy.parse(name).stages]
        except VTPError as e:  # needs an argument (e.g. a calibration file made for the model)
            lines += wrapped(f"(needs arguments: {e})", 6)
            stages = []
        for i, st in enumerate(stages):
            lines.append(("    = " if i == 0 else "    + ") + st)
        lines += wrapped(preset.description, 4)
    lines += ["", "Criteria: how a stage scores visual tokens (higher = keep); params with their defaults.", ""]
    for name, crit in CRITERIA.items():
        arxiv = getattr(crit, "arxiv", None)
        lines.append(f"{name}" + (f"  [arXiv {arxiv}]" if arxiv else ""))
        lines += wrapped(getattr(crit, "paper", "") or "", 4)
        params = ", ".join(f"{k}={p.default!r}" for k, p in crit.params.items())
        if params:
            lines += wrapped("params: " + params, 4)
    print("\n".join(lines))
    return 0
