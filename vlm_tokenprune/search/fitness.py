"""Fitness of a policy: divergence of its next-token distributions from the unpruned model's on
calibration batches (EvoPress, arXiv 2410.14649: KL to the uncompressed model; FinerCut, arXiv
2405.18218: a distance between the pruned and the original model's outputs).

``Calibration`` holds fixed batches of model inputs, the positions that count and the unpruned
model's log-probabilities there, computed once. A mask ``[B, K]`` covers the LAST ``K`` positions of
the (left-padded) sequence, e.g. the positions that predict the answer tokens of a teacher-forced
prompt + answer: token reduction removes visual tokens from the middle of the sequence, so the
tail lines up with and without a policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

METRICS = ("kl", "js")


@dataclass
class Calibration:
    batches: list[dict]
    masks: list[torch.Tensor]  # [B, K] bool over the last K positions
    reference: list[torch.Tensor]  # [positions, V] float32 log-probs of the unpruned model

    def __len__(self) -> int:
        return len(self.batches)


@torch.no_grad()
def log_probs(model, batch: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
    logits = model(**batch, use_cache=False).logits
    K = mask.shape[1]
    if logits.shape[1] < K:
        raise ValueError(f"the policy's output has {logits.shape[1]} positions, fewer than the {K} the calibration "
                         "mask covers: use masks over the text tail (token reduction shortens the sequence)")
    return F.log_softmax(logits[:, logits.shape[1] - K:][mask].float(), dim=-1)


def build_calibration(model, batches: Sequence[Mapping[str, Any]], masks: Sequence[torch.Tensor] | None = None) -> Calibration:
    """Reference log-probs of the (unpatched) ``model`` on ``batches``; ``masks`` default: every real position."""
    batches = [dict(b) for b in batches]
    if masks is None:
        masks = [b["attention_mask"].bool() if "attention_mask" in b else torch.ones_like(b["input_ids"], dtype=torch.bool)
                 for b in batches]
    masks = [m.bool() for m in masks]
    return Calibration(batches, masks, [log_probs(model, b, m) for b, m in zip(batches, masks)])


def divergence(ref: torch.Tensor, out: torch.Tensor, metric: str = "kl") -> float:
    """Mean over positions of KL(ref || out) or the Jensen-Shannon divergence (log-probs in, nats out)."""
    if metric == "kl":
        return float((ref.exp() * (ref - out)).sum(-1).mean())
    if metric == "js":
        m = torch.logsumexp(torch.stack([ref, out]), 0) - torch.log(torch.tensor(2.0))
        return float(0.5 * (ref.exp() * (ref - m)).sum(-1).mean() + 0.5 * (out.exp() * (out - m)).sum(-1).mean())
    raise ValueError(f"metric {metric!r}; allowed: {', '.join(METRICS)}")


def policy_divergence(model, cal: Calibration, policy: Any, batch: int, metric: str = "kl") -> float:
    """Divergence of ``policy`` (None: the unpruned model) from the reference on calibration batch ``batch``."""
    from ..patching import patch

    if policy is None:
        return 0.0
    with patch(model, policy):
        out = log_probs(model, cal.batches[batch], cal.masks[batch])
    return divergence(cal.reference[batch], out, metric)
