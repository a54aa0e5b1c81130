"""CPU decode-step benchmark: per-step time of a patched model's cached decode vs the unpatched model's.

Geometry (random weights, built offline): tiny LLaVA with a Llama text model of hidden 256, 8 layers,
4 heads (GQA 4/2), MLP 512; CLIP tower 128 px / patch 8 (16 x 16 = 256 visual tokens per image), one
tower layer; prompt = text + 1..4 images (256..1024 visual tokens), batch 1, sdpa and eager, fp32, one torch thread.

What is timed: ONE decode step (a one-token forward on a cache holding the prompt and 4 generated
tokens), repeated from a fresh copy of the same cache so every step sees the same cache length (the copy is
registered with the patched handle as the prompt's cache, so every patched step is a real pruned decode step:
the script checks ``last_trace().phase == "decode"``). The patched model's cache holds only the kept tokens
from the pruned layer on. Three models share the weights: the unpatched one, the patched one and an
instrumented patched one (each library hook wrapped by a timer and counter); for each policy and cache
length their steps are interleaved in one loop (order rotating), after a warm-up, so load changes hit all
three alike. Reported: ``ratio`` = median(patched step) / median(baseline step) and the step times in ms;
``library calls``: library calls per decode step (every hook function ``patch()`` registered, on any module,
and every decoder-layer call routed through the library by ``RoutedLayers``); ``library us``: the median wall
time per step spent inside them (instrumented model); ``library %``: that time over the median baseline step.

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
from vlm_tokenprune.eval.tiny_models import build_tiny_llava, make_batch  # noqa: E402
from vlm_tokenprune.sites.routed_layers import LayerCall, RoutedLayers  # noqa: E402

POLICIES = ["fastv:layer=2,keep=0.25", "fastv:layer=2,keep=0.5", "fastv:layer=6,keep=0.25",
            "uniform:site=pre_llm,keep=0.25,positions=gaps"]


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


class HookMeter:
    """Wraps every library hook of a patched model, and every routed decoder-layer call (``RoutedLayers``):
    calls and wall time inside them, per step."""

    def __init__(self, model):
        self.calls, self.seconds = 0, 0.0
        for m in model.modules():
            for hooks in (m._forward_pre_hooks, m._forward_hooks):
                for key, fn in list(hooks.items()):
                    if getattr(fn, "__vtp__", False):
                        hooks[key] = self._wrap(fn)
            if isinstance(m, RoutedLayers):
                for call in m._calls:
                    if isinstance(call, LayerCall):
                        call.before = self._wrap(call.before)

    def _wrap(self, fn):
        def hook(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        hook.__vtp__ = True
        return hook


def _step(model, state, handle=None, record=None) -> float:
    cache, nxt, mask = state
    fresh = {k: copy.deepcopy(v) for k, v in cache.items()}
    if handle is not None:  # the copy continues the same prompt (a copied cache is not one the handle has seen)
        for v in fresh.values():
            handle.remember(v, record)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=nxt, attention_mask=mask, use_cache=True, **fresh)
    t = time.perf_counter() - t0
    if handle is not None and handle.last_trace().phase != "decode":
        raise RuntimeError(f"the patched step ran as {handle.last_trace().phase!r}, not as a pruned decode step")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--attn", default="sdpa,eager", help="attention implementations, comma-separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for attn in args.attn.split(","):
        _measure(attn, args.repeats, rows)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Decode-step ratios (CPU, one thread)\n\n" + __doc__.split("\n\n")[1] + "\n\n")
            f.write("| attention | visual tokens | cache length | policy | baseline ms/step | patched ms/step | ratio "
                    "| library calls/step | library us/step | library % of baseline step |\n"
                    "|---|---|---|---|---|---|---|---|---|---|\n")
            for attn, v, c, pol, mb, mp, r, n, us, pct in rows:
                f.write(f"| {attn} | {v} | {c} | `{pol}` | {mb:.2f} | {mp:.2f} | {r:.3f} | {n} | {us:.1f} | {pct:.2f} |\n")
            f.write("\nReproduce: `OMP_NUM_THREADS=1 python benchmarks/decode.py --out benchmarks/results/decode_cpu.md`\n")


def _measure(attn: str, repeats: int, rows: list) -> None:
    base = build_tiny_llava(attn, layers=8, hidden=256, heads=4, kv_heads=2, intermediate=512, image_size=128,
                            patch=8, vision_layers=1)
    for n_img in (1, 2, 4):
        inputs = make_batch(base, [[8] + ["img"] * n_img + [8]])
        base_state = _prepared(base, inputs)
        for pol in POLICIES:
            patched, instrumented = copy.deepcopy(base), copy.deepcopy(base)
            hp, hi = vtp.patch(patched, pol), vtp.patch(instrumented, pol)
            meter = HookMeter(instrumented)
            p_state, i_state = _prepared(patched, inputs), _prepared(instrumented, inputs)
            p_rec, i_rec = hp.session(next(iter(p_state[0].values()))), hi.session(next(iter(i_state[0].values())))
            runs = {"b": (base, base_state, None, None), "p": (patched, p_state, hp, p_rec),
                    "i": (instrumented, i_state, hi, i_rec)}
            times: dict = {k: [] for k in runs}
            calls, hook_s = [], []
            for i in range(repeats + 3):
                order = "bpi"[i % 3:] + "bpi"[:i % 3]
                for kind in order:
                    meter.calls, meter.seconds = 0, 0.0
                    t = _step(*runs[kind])
                    if i >= 3:
                        times[kind].append(t)
                        if kind == "i":
                            calls.append(meter.calls)
                            hook_s.append(meter.seconds)
            hp.unpatch()
            hi.unpatch()
            mb, mp = statistics.median(times["b"]), statistics.median(times["p"])
            mh = statistics.median(hook_s)
            cache_len = base_state[2].shape[1] - 1
            rows.append((attn, 256 * n_img, cache_len, pol, mb * 1e3, mp * 1e3, mp / mb, max(calls), mh * 1e6,
                         100 * mh / mb))
            print(f"{attn:5s} {256 * n_img:5d} visual (cache {cache_len:5d})  {pol:46s} base {mb * 1e3:7.2f} ms  "
                  f"patched {mp * 1e3:7.2f} ms  ratio {mp / mb:.3f}  hook calls {max(calls):2d}  "
                  f"hooks {mh * 1e6:6.1f} us ({100 * mh / mb:.2f} %)", flush=True)


if __name__ == "__main__":
    main()
