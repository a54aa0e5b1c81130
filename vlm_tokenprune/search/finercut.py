"""FinerCut's greedy sublayer removal (Zhang et al., "FinerCut: Finer-grained Interpretable Layer
Pruning for Large Language Models", arXiv 2405.18218).

Every attention and every MLP sublayer is a separate candidate. Step by step, the candidate whose
removal -- together with the ones already removed -- changes the model's output least is removed:
the distance is the Jensen-Shannon divergence between the pruned and the unpruned model's
next-token distributions at every real position of the calibration batches. The result is the
removal order (``calibrate(model, batches, what="sublayers")`` writes it; ``skip_sublayers`` with
``calibration=`` and ``removed=`` applies its first entries).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import InputError, UnsupportedModelError
from .fitness import build_calibration, divergence, log_probs


def _policy(removed: Sequence[tuple[str, int]]) -> str | None:
    attn = sorted(j for k, j in removed if k == "attn")
    ffn = sorted(j for k, j in removed if k == "ffn")
    if not attn and not ffn:
        return None
    parts = ([f"attn={';'.join(map(str, attn))}"] if attn else []) + ([f"ffn={';'.join(map(str, ffn))}"] if ffn else [])
    return "skip_sublayers:" + ",".join(parts)


def candidates(model) -> list[tuple[str, int]]:
    """Removable sublayers: attention of the layers whose cache the masks are not sized from
    (``structural.plan.mask_layers``: Gemma 3 keeps its first sliding and first full-attention layer), every MLP."""
    from ..adapters import resolve_adapter
    from ..structural.plan import mask_layers

    adapter = resolve_adapter(model)
    adapter.check(model)
    seams = adapter.seams(model)
    n, kept = seams.num_layers, set(mask_layers(seams))
    return [("attn", j) for j in range(n) if j not in kept] + [("ffn", j) for j in range(n)]


def greedy_sublayers(model, batches: Sequence[Mapping[str, Any]], count: int | None = None, progress: bool = True,
                     metric: str = "js") -> dict:
    """``{"order": [[kind, layer], ...], "distance": [...], "metric", "samples"}``: the greedy removal order."""
    from tqdm.auto import tqdm

    from ..patching import patch
    from ..patching import is_patched

    if is_patched(model):
        raise UnsupportedModelError("model", "is patched; calibrate the original model (unpatch first)")
    batches = list(batches)
    if not batches:
        raise InputError("batches", "gave no batch")
    cands = candidates(model)
    count = len(cands) // 2 if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(cands):
        raise InputError("count", f"must be an integer in 1..{len(cands)} (removable sublayers), got {count!r}")
    cal = build_calibration(model, batches)
    removed: list[tuple[str, int]] = []
    dist: list[float] = []
    bar = tqdm(total=count * len(cands) - count * (count - 1) // 2, desc="finercut", disable=not progress)
    for _ in range(count):
        best = None
        for c in cands:
            if c in removed:
                continue
            pol = _policy(removed + [c])
            with patch(model, pol):
                d = sum(divergence(ref, log_probs(model, b, m), metric) * int(m.sum())
                        for b, m, ref in zip(cal.batches, cal.masks, cal.reference)) / sum(int(m.sum()) for m in cal.masks)
            if best is None or d < best[0]:
                best = (d, c)
            bar.update(1)
        removed.append(best[1])
        dist.append(best[0])
    bar.close()
    return {"order": [list(c) for c in removed], "distance": dist, "metric": metric,
            "samples": sum(int(b["input_ids"].shape[0]) for b in batches)}
