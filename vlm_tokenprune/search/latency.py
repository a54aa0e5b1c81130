"""Measured prefill latency as a search constraint (``vlm-tokenprune search --budget latency=R``).

The ratio of a policy's prefill time to the unpruned model's on this machine: the whole prefill
(vision tower + language model, ``model(**batch, logits_to_keep=1)``) of one calibration batch, timed
interleaved with the baseline (order alternating, ``eval.timing.interleaved``), medians of ``iters``
runs each. Measurements are cached per policy and, with ``path``, kept in a JSON file, so a resumed
search reuses them and stays what the straight run was; a fresh measurement on a loaded or shared
machine is noisy (EvoPress, arXiv 2410.14649, reports its latency-constrained runs on dedicated GPUs).
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Mapping


class LatencyRatio:
    """``ratio(policy_string)`` -> measured prefill latency ratio (None policy: 1.0)."""

    def __init__(self, model, batch: Mapping[str, Any], *, iters: int = 5, warmup: int = 1,
                 path: "str | os.PathLike | None" = None) -> None:
        if iters < 1 or warmup < 0:
            raise ValueError(f"iters >= 1 and warmup >= 0, got {iters}, {warmup}")
        self.model, self.batch, self.iters, self.warmup = model, dict(batch), iters, warmup
        self.path = os.fspath(path) if path is not None else None
        self.cache: dict[str, float] = {}
        if self.path and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.cache = json.load(f)["ratios"]
        self.measured = 0  # fresh measurements in this process

    def __call__(self, policy: str | None) -> float:
        if policy is None:
            return 1.0
        if policy not in self.cache:
            from ..eval.timing import interleaved

            t = interleaved(self.model, policy, {"prefill": lambda: self.model(**self.batch, logits_to_keep=1)},
                            iters=self.iters, warmup=self.warmup, device=self.model.device)
            self.cache[policy] = statistics.median(t["prefill"]["patched"]) / statistics.median(t["prefill"]["baseline"])
            self.measured += 1
            if self.path:
                from .checkpoint import write_json_atomic

                write_json_atomic(self.path, {"what": "prefill latency ratio, interleaved medians", "iters": self.iters,
                                              "ratios": self.cache})
        return self.cache[policy]
