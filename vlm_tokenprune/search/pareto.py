"""Pareto table and plot of what a search evaluated: accuracy (or divergence) against predicted FLOPs."""
from __future__ import annotations

import os
from typing import Sequence


def pareto_front(rows: Sequence[dict], x: str = "flops_ratio", y: str = "accuracy", higher_is_better: bool = True) -> list[int]:
    """Indices of the rows no other row beats: lower-or-equal ``x`` and better-or-equal ``y``, one strictly."""
    pts = [(i, r[x], r[y]) for i, r in enumerate(rows) if r.get(y) is not None and r.get(x) is not None]
    sign = 1 if higher_is_better else -1
    front = []
    for i, xi, yi in pts:
        beaten = any(xj <= xi and sign * yj >= sign * yi and (xj < xi or sign * yj > sign * yi) for j, xj, yj in pts if j != i)
        if not beaten:
            front.append(i)
    return front


def markdown(rows: Sequence[dict], front: Sequence[int]) -> str:
    """One line per row, sorted by FLOPs: policy, FLOPs ratio, divergence (batches), held-out accuracy, Pareto."""
    lines = ["| policy | FLOPs ratio | divergence (calibration batches) | held-out accuracy | Pareto |", "|---|---|---|---|---|"]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["flops_ratio"], rows[i].get("fitness") or 0.0))
    for i in order:
        r = rows[i]
        fit = "-" if r.get("fitness") is None else f"{r['fitness']:.4f} ({r.get('batches', 0)})"
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        lines.append(f"| `{r['policy'] or 'baseline'}` | {r['flops_ratio']:.3f} | {fit} | {acc} | {'yes' if i in front else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], front: Sequence[int], path: "str | os.PathLike", budget: float | None = None) -> bool:
    """Accuracy vs FLOPs ratio (the front joined); False when matplotlib is missing or nothing has an accuracy."""
    if not any(r.get("accuracy") is not None for r in rows):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["flops_ratio"] for r in pts], [r["accuracy"] for r in pts], s=14, color="0.6", label="evaluated")
    fr = sorted((rows[i] for i in front), key=lambda r: r["flops_ratio"])
    ax.plot([r["flops_ratio"] for r in fr], [r["accuracy"] for r in fr], "o-", color="C0", label="Pareto front")
    if budget is not None:
        ax.axvline(budget, color="C3", ls="--", lw=1, label=f"budget {budget:g}")
    ax.set_xlabel("predicted prefill FLOPs ratio (LM)")
    ax.set_ylabel("held-out accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
