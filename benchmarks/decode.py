"""CPU decode-step benchmark: per-step time of a patched model's cached decode vs the unpatched model's.

Geometry (random weights, built offline): tiny LLaVA with a Llama text model of hidden 256, 8 layers,
4 heads (GQA 4/2), MLP 512; CLIP tower 128 px / patch 8 (16 x 16 = 256 visual tokens per image), one
tower layer; prompt = text + 1..4 images (256..1024 visual tokens), batch 1, sdpa, fp32, one torch thread.

What is timed: ONE decode step (a one-token forward on a cache holding the prompt and 4 generated
tokens), repeated from a fresh copy of the same cache so every step sees the same cache length. The
patched model's cache holds only the kept tokens from the pruned layer on. For each policy and cache
length, baseline and patched steps are interleaved in one loop (order alternating), after a warm-up.
Reported: ``ratio`` = median(patched step) / median(baseline step), the step times in ms, and ``hooks us``:
the median wall time per patched step spent inside the library's LLM-site hooks (``engine.top_pre_hook``,
``top_post_hook`` and every decoder layer's ``layer_pre_hook``, timed by wrappers installed before ``patch``),
i.e. the Python work a decode step pays for the policy.

Usage: ``python benchmarks/decode.py [--repeats 31] [--out benchmarks/results/decode_cpu.md]``
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import vlm_tokenprune as vtp  # noqa: E402
from vlm_tokenprune import engine  # noqa: E402
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch  # noqa: E402

POLICIES = ["fastv:layer=2,keep=0.25", "fastv:layer=2,keep=0.5", "uniform:site=pre_llm,keep=0.25,positions=gaps"]


def _cache(out) -> dict:
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}


def _prepared(model, inputs, steps: int = 4):
    """(cache kwargs after the prompt + ``steps`` greedy tokens, next token, attention mask)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask = inputs["attention_mask"]
        for _ in range(steps + 1):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            if _ == steps:
                break
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **_cache(out))
    return _cache(out), nxt, mask


HOOK_SECONDS = [0.0]


def _timed(fn):
    """``fn`` adding its wall time to ``HOOK_SECONDS`` (installed on ``engine`` before ``patch`` binds the hooks)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            HOOK_SECONDS[0] += time.perf_counter() - t0
    return wrapper


for _name in ("top_pre_hook", "top_post_hook", "layer_pre_hook"):
    setattr(engine, _name, _timed(getattr(engine, _name)))


def _step(model, state) -> float:
    cache, nxt, mask = state
    fresh = {k: copy.deepcopy(v) for k, v in cache.items()}
    HOOK_SECONDS[0] = 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=nxt, attention_mask=mask, use_cache=True, **fresh)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = build_tiny_llava("sdpa", layers=8, hidden=256, heads=4, kv_heads=2, intermediate=512, image_size=128,
                             patch=8, vision_layers=1)
    rows = []
    for n_img in (1, 2, 4):
        inputs = make_batch(model, [[8] + ["img"] * n_img + [8]])
        base = _prepared(model, inputs)
        for pol in POLICIES:
            h = vtp.patch(model, pol)
            patched = _prepared(model, inputs)
            h.unpatch()
            b, p, hooks = [], [], []
            for i in range(args.repeats + 3):
                order = [("b", base), ("p", patched)] if i % 2 == 0 else [("p", patched), ("b", base)]
                for kind, state in order:
                    if kind == "p":
                        h = vtp.patch(model, pol)
                        t = _step(model, state)
                        h.unpatch()
                        if i >= 3:
                            hooks.append(HOOK_SECONDS[0])
                    else:
                        t = _step(model, state)
                    if i >= 3:
                        (p if kind == "p" else b).append(t)
            mb, mp = statistics.median(b), statistics.median(p)
            mh = statistics.median(hooks)
            rows.append((256 * n_img, pol, mb * 1e3, mp * 1e3, mp / mb, mh * 1e6))
            print(f"{256 * n_img:5d} visual  {pol:48s} base {mb * 1e3:7.2f} ms  patched {mp * 1e3:7.2f} ms  "
                  f"ratio {mp / mb:.3f}  hooks {mh * 1e6:6.0f} us", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Decode-step ratios (CPU, one thread)\n\n" + __doc__.split("\n\n")[1] + "\n\n")
            f.write("| visual tokens | policy | baseline ms/step | patched ms/step | ratio | hooks us/step |\n"
                    "|---|---|---|---|---|---|\n")
            for v, pol, mb, mp, r, us in rows:
                f.write(f"| {v} | `{pol}` | {mb:.2f} | {mp:.2f} | {r:.3f} | {us:.0f} |\n")
            f.write("\nReproduce: `OMP_NUM_THREADS=1 python benchmarks/decode.py --out benchmarks/results/decode_cpu.md`\n")


if __name__ == "__main__":
    main()
