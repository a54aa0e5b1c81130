"""GPU check: everything that needs a GPU, in one command that finishes in under 8 minutes on an H100.

    python benchmarks/gpu.py --out DIR            # on the GPU machine (torch CUDA, triton; no network)
    python benchmarks/gpu.py --dry-run --out DIR  # the same code path on CPU: tiny geometries, Triton interpreter

Writes ``DIR/gpu_report.md`` and ``DIR/gpu_report.json`` (rewritten after every part, so a run cut
short keeps what it measured). Four parts, each guarded (a failure is recorded with its traceback
and the next part runs), each printing its elapsed time; a part (or a model, or a row) that would
overrun the time budget (``--budget-s``, default 480 s) is skipped and the report says so.

1. ``kernels``: the Triton kernels compiled for the GPU vs their PyTorch references
   (``vlm_tokenprune.ops`` with ``backend="triton"`` / ``"torch"``): attention-row scores (FastV's
   whole-row softmax with RoPE, FEATHER's subset softmax), top-k and the kept-token gather;
   identical kept indices, scores within the CPU tests' tolerance, gathers bit-identical;
   bf16 / fp16 / fp32, N = 576 / 2880 / 11520 visual tokens, GQA group 1 / 4 / 8, 1 and 64 query rows.
2. ``timings``: the same ops timed (CUDA events, median of ``--reps`` calls after a warm-up), torch
   path vs kernels: scoring, top-k, gather and the whole selection step (score -> top-k -> gather of
   hidden states, cos, sin and position ids) at each N, LLaVA-1.5-7B attention geometry, bf16.
3. ``prefill``: full-depth random-weight LLaVA-1.5-7B (576 visual tokens), LLaVA-NeXT-7B (one 672 x 672
   image: 2928 tokens, 2880 + 48 newlines) and Qwen2-VL-7B (a 32 x 32 = 1024-token image), bf16, sdpa,
   built directly on the GPU from the geometry table ``vlm_tokenprune.eval.profiler.KNOWN_GEOMETRIES``
   and reused across policies: baseline vs the presets fastv, feather, pdrop, flowcut, aim_merge, mctf,
   a structural preset (yopo_25, its head file calibrated on the model being measured), backend triton
   vs torch, the two budget rows of the goals, one eager row; through ``profiler.profile`` (LM-prefill
   and TTFT ratios, FLOPs-predicted ratio and quotient, peak memory) plus the scoring + selection time
   measured with a device synchronise around every LLM-site stage; and N = 11520 (20 images) for the
   O(rows x N) scaling of the attention-row scoring.
4. ``decode``: a 200-token greedy cached ``generate()`` equal to a cache-free oracle, one policy per
   site (LLM: FastV, both backends, against ``tests/reference/fastv_oracle.py``, the paper oracle
   written without library code; pre-LLM: aim_merge; vision: flowcut_vit; those two reduce the image
   independently of the text, so one cache-free forward of the patched model over prompt + generated
   tokens gives every step's logits), fp32, LLaVA-1.5-7B width with 8 decoder layers. Compared
   teacher-forced: per step the oracle's greedy token (EOS and the image placeholder excluded, as
   ``min_new_tokens`` and ``suppress_tokens`` do in the cached run) must
   be the cached run's token; the largest logit difference is reported.

Parts run in the order 1, 2, 4, 3 (the long prefill part last, so the budget trims it, not the
correctness checks). ``--dry-run`` sets ``TRITON_INTERPRET=1`` before triton is imported, runs on the
CPU with the same geometries shrunk in width (depth kept, so the paper presets' layers exist),
short sequences and few repetitions; its figures mean nothing, it proves the command runs
(``tests/test_gpu_dry_run.py``). Goals from the issue are judged only on a GPU run.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PARTS = ("kernels", "timings", "decode", "prefill")  # run order
MODELS = ("llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes DIR/gpu_report.md and DIR/gpu_report.json.")
    p.add_argument("--out", required=True, help="folder for gpu_report.md / gpu_report.json (created)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny geometries, Triton interpreter: proves the command runs (CI)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="time budget in seconds; parts, models and rows that would overrun it are skipped (default 480)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)} (default: all)")
    p.add_argument("--models", default=",".join(MODELS), help=f"prefill models, subset of {', '.join(MODELS)} (default: all)")
    p.add_argument("--iters", type=int, default=None, help="interleaved prefill iterations per row (default 10; dry run 1)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per kernel timing (default 100; dry run 2)")
    p.add_argument("--decode-steps", type=int, default=None, help="tokens generated per decode check (default 200; dry run 6)")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    models = [x for x in a.models.split(",") if x]
    if set(parts) - set(PARTS) or not parts:
        p.error(f"--parts {a.parts!r}; allowed: {', '.join(PARTS)}")
    if set(models) - set(MODELS):
        p.error(f"--models {a.models!r}; allowed: {', '.join(MODELS)}")
    a.parts, a.models = [x for x in PARTS if x in parts], [x for x in MODELS if x in models]
    return a


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # the interpreter is chosen when triton decorates a kernel: set (or clear) it before anything imports triton
    if ARGS.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("OMP_NUM_THREADS", "1" if ARGS.dry_run else "8")
    # this folder's scripts must not shadow installed packages (a benchmarks/kernels.py once broke transformers)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    if REPO not in sys.path:
        sys.path.insert(0, REPO)

import copy  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCORE_TOL = dict(atol=2e-6, rtol=1e-5)  # tests/test_kernels.py's tolerance for the fp32 scores


# ------------------------------------------------------------------------------------------------
# configuration: the GPU run and its dry-run shrink
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    dry: bool
    device: torch.device
    # kernels (LLaVA-1.5-7B attention: 32 heads of 128; hidden 4096); prompt = prefix + N visual + rest text
    heads: int = 32
    head_dim: int = 128
    hidden: int = 4096
    n_text: int = 64
    prefix: int = 35
    kernel_n: tuple = (576, 2880, 11520)
    kernel_rows: tuple = (1, 64)
    gqa: tuple = (1, 4, 8)
    all_cases: bool = True  # parity: every combination (dry run: a covering subset, every value at least once)
    timing_n: tuple = (576, 2880, 11520)
    reps: int = 100
    warmup_reps: int = 10
    # prefill
    prefill_dtype: torch.dtype = torch.bfloat16
    iters: int = 10
    warmup: int = 2
    sel_reps: int = 5
    qwen_grid: tuple = (32, 32)
    scaling_images: int = 20  # 20 x 576 = 11520 visual tokens
    # decode
    decode_model: str = "llava-1.5-7b"
    decode_layers: int = 8
    decode_steps: int = 200
    # time estimates (s) used by the budget before starting a piece
    est: dict = field(default_factory=lambda: {"kernels": 60, "timings": 45, "decode": 60, "model": 45, "row": 8})


def make_config(a: argparse.Namespace) -> Config:
    if a.dry_run:
        cfg = Config(dry=True, device=torch.device("cpu"), heads=8, head_dim=16, hidden=64, n_text=8, prefix=3,
                     kernel_n=(13, 37), kernel_rows=(1, 3), all_cases=False, timing_n=(13,), reps=1, warmup_reps=0,
                     iters=1, warmup=0, sel_reps=1,
                     qwen_grid=(4, 4), scaling_images=3, decode_layers=4, decode_steps=6,
                     est={"kernels": 1, "timings": 1, "decode": 1, "model": 1, "row": 0})
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu.py: no CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU")
        cfg = Config(dry=False, device=torch.device("cuda"))
    if a.iters is not None:
        cfg.iters = a.iters
    if a.reps is not None:
        cfg.reps = a.reps
    if a.decode_steps is not None:
        cfg.decode_steps = a.decode_steps
    return cfg


def dry_geometry(g: dict) -> dict:
    """A KNOWN_GEOMETRIES entry shrunk for the CPU dry run: same family and LLM depth (the paper presets'
    layers exist), tiny widths, 8 vision layers (room for MCTF's per-layer merging), 112 px crops (8 x 8 patches)."""
    g = copy.deepcopy(g)
    if g["family"] == "qwen2_vl":  # GQA 7 as Qwen2-7B (28/4); head_dim 16 -> M-RoPE sections sum to 8
        g["text"].update(hidden_size=112, intermediate_size=224, num_attention_heads=7, num_key_value_heads=1)
        g["mrope_section"] = [2, 3, 3]
        g["vision"].update(embed_dim=32, num_heads=2, depth=8)
    else:
        g["text"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
        g["vision"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=112, projection_dim=32,
                           num_hidden_layers=8)
        if "pinpoints" in g:
            g["pinpoints"] = [[h // 3, w // 3] for h, w in g["pinpoints"]]
            g["image_size"] = (224, 224)
    g["description"] = "dry run (width shrunk): " + g["description"]
    return g


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.total = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()

    def allows(self, estimate: float) -> bool:
        return self.left() >= estimate


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn, dev: torch.device, reps: int, warmup: int) -> dict:
    """Median (p25, p75) of ``reps`` calls in ms: CUDA events around each call on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(out, n=4, method="inclusive") if len(out) > 1 else [out[0]] * 3
    return {"median": statistics.median(out), "p25": q[0], "p75": q[2], "n": len(out)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_kind(e: BaseException) -> str:
    """``refused``: the library said no, with its field (a policy that does not fit the model); else ``crashed``."""
    from vlm_tokenprune.errors import VTPError

    return "refused" if isinstance(e, (VTPError, Refused)) else "crashed"


def short_tb(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)[-8:])


def load_oracle(name: str):
    """``tests/reference/<name>.py`` (the oracles, a package with relative imports), loaded from its folder
    under a private package name: ``tests`` is not importable on every install and may clash with another."""
    pkg = "_gpu_check_reference"
    if pkg not in sys.modules:
        folder = os.path.join(REPO, "tests", "reference")
        spec = importlib.util.spec_from_file_location(pkg, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[pkg] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{pkg}.{name}")


def rope_tables(L: int, D: int, dev, dtype):
    pos = torch.arange(L, dtype=torch.float32)[:, None] / (10000 ** (torch.arange(0, D, 2) / D))[None, :]
    emb = torch.cat([pos, pos], dim=-1)[None]
    return emb.cos().to(dev, dtype), emb.sin().to(dev, dtype)


def scores_case(cfg: Config, N: int, G: int, R: int, dtype, seed: int) -> dict:
    """FastV-shaped inputs: one row of prefix + N visual + text tokens, R query rows at the end."""
    H, D = cfg.heads, cfg.head_dim
    L = N + cfg.n_text
    g = torch.Generator().manual_seed(seed)
    dev = cfg.device
    q = torch.randn(1, H, R, D, generator=g).to(dev, dtype)
    k = torch.randn(1, H // G, L, D, generator=g).to(dev, dtype)
    cos, sin = rope_tables(L, D, dev, dtype)
    subset = torch.arange(cfg.prefix, cfg.prefix + N, device=dev)[None]
    return dict(q=q, k=k, q_idx=torch.arange(L - R, L, device=dev)[None], k_valid=torch.ones(1, L, dtype=torch.bool, device=dev),
                cos=cos, sin=sin, subset=subset, subset_ok=torch.ones_like(subset, dtype=torch.bool), scaling=D ** -0.5,
                L=L, N=N)


def score_call(x: dict, mode: str, backend: str):
    from vlm_tokenprune import ops

    rope = mode == "row"  # FastV: RoPE, whole causal row; FEATHER preset: no RoPE, softmax over the visual keys
    return ops.attention_scores(x["q"], x["k"], x["q_idx"], x["k_valid"], scaling=x["scaling"],
                                cos=x["cos"] if rope else None, sin=x["sin"] if rope else None,
                                subset=x["subset"], subset_ok=x["subset_ok"], softmax_over=mode, backend=backend)


def keep_index(cfg: Config, x: dict, idx: torch.Tensor) -> torch.Tensor:
    """Sequence positions kept after a selection: prefix text, the chosen visual tokens, the rest."""
    dev = cfg.device
    return torch.cat([torch.arange(cfg.prefix, device=dev)[None], cfg.prefix + idx,
                      torch.arange(cfg.prefix + x["N"], x["L"], device=dev)[None]], dim=1)


def gather_tensors(cfg: Config, L: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    dev = cfg.device
    hidden = torch.randn(1, L, cfg.hidden, generator=g).to(dev, dtype)
    cos, sin = rope_tables(L, cfg.head_dim, dev, dtype)
    return [hidden, cos, sin, torch.arange(L, device=dev)[None]], [1, 1, 1, -1]


# ------------------------------------------------------------------------------------------------
# part 1: kernel parity
# ------------------------------------------------------------------------------------------------
def part_kernels(cfg: Config, budget: Budget) -> dict:
    from vlm_tokenprune import ops

    ops.check_backend("triton", cfg.device)
    interpreted = ops.kernels_interpreted()
    if cfg.device.type == "cuda" and interpreted:
        raise RuntimeError("the kernels were built for the Triton interpreter on a GPU run (TRITON_INTERPRET set?)")
    rows, seed = [], 0
    axes = (cfg.kernel_n, list(DTYPES.items()), cfg.gqa, cfg.kernel_rows, ("row", "keys"))
    if cfg.all_cases:
        cases = list(itertools.product(*axes))
    else:  # every value of every axis at least once
        cases = [tuple(d[i % len(d)] for d in axes) for i in range(max(len(d) for d in axes) + 1)]
    for N, (dname, dtype), G, R, mode in cases:
        seed += 1
        x = scores_case(cfg, N, G, R, dtype, seed)
        want, got = score_call(x, mode, "torch"), score_call(x, mode, "triton")
        diff = float((got - want).abs().max())
        close = bool(torch.allclose(got, want, **SCORE_TOL))
        kk = torch.tensor([max(1, N // 4)], device=cfg.device)
        ref_idx = ops.topk(want, x["subset_ok"], kk, backend="torch")[0]
        same_topk_op = torch.equal(ops.topk(want, x["subset_ok"], kk, backend="triton")[0], ref_idx)
        tri_idx = ops.topk(got, x["subset_ok"], kk, backend="triton")[0]
        same_kept = torch.equal(tri_idx, ref_idx)
        srt = want[0].sort(descending=True).values
        margin = float(srt[kk - 1] - srt[kk]) if N > int(kk) else float("inf")
        keep = keep_index(cfg, x, ref_idx)
        tensors, dims = gather_tensors(cfg, x["L"], dtype, seed)
        a = ops.gather_tokens(keep, tensors, dims=dims, backend="torch")
        b = ops.gather_tokens(keep, tensors, dims=dims, backend="triton")
        same_gather = all(torch.equal(u, v) for u, v in zip(a, b))
        ok = close and same_topk_op and same_kept and same_gather
        rows.append(dict(N=N, dtype=dname, gqa=G, R=R, softmax=mode, max_abs_diff=diff, within_tol=close,
                         same_topk_op=same_topk_op, same_kept=same_kept, topk_margin=margin,
                         same_gather=same_gather, ok=ok))
        if not ok:
            print(f"  MISMATCH {rows[-1]}", flush=True)
    n_ok = sum(r["ok"] for r in rows)
    print(f"  kernel parity: {n_ok}/{len(rows)} cases identical / within tolerance", flush=True)
    return {"cases": rows, "n_cases": len(rows), "n_ok": n_ok, "all_ok": n_ok == len(rows),
            "interpreted": interpreted, "tolerance": SCORE_TOL}


# ------------------------------------------------------------------------------------------------
# part 2: kernel timings
# ------------------------------------------------------------------------------------------------
def part_timings(cfg: Config, budget: Budget) -> dict:
    from vlm_tokenprune import ops

    dtype = torch.bfloat16
    rows = []
    for N in cfg.timing_n:
        x1 = scores_case(cfg, N, 1, 1, dtype, seed=N)
        xr = scores_case(cfg, N, 1, cfg.kernel_rows[-1], dtype, seed=N + 1)
        kk = torch.tensor([max(1, N // 4)], device=cfg.device)
        s = score_call(x1, "row", "torch")
        tensors, dims = gather_tensors(cfg, x1["L"], dtype, seed=N)
        keep = keep_index(cfg, x1, ops.topk(s, x1["subset_ok"], kk, backend="torch")[0])

        def step(backend, x=x1, kk=kk, tensors=tensors, dims=dims):
            sc = score_call(x, "row", backend)
            idx = ops.topk(sc, x["subset_ok"], kk, backend=backend)[0]
            return ops.gather_tokens(keep_index(cfg, x, idx), tensors, dims=dims, backend=backend)

        ops_ = {
            "scores R=1": lambda b: score_call(x1, "row", b),
            f"scores R={cfg.kernel_rows[-1]}": lambda b: score_call(xr, "row", b),
            "top-k (N/4)": lambda b: ops.topk(s, x1["subset_ok"], kk, backend=b),
            "gather": lambda b: ops.gather_tokens(keep, tensors, dims=dims, backend=b),
            "selection step": step,
        }
        for name, fn in ops_.items():
            t = {b: time_ms(lambda b=b: fn(b), cfg.device, cfg.reps, cfg.warmup_reps) for b in ("torch", "triton")}
            rows.append(dict(N=N, op=name, torch_ms=t["torch"]["median"], triton_ms=t["triton"]["median"],
                             torch_iqr=[t["torch"]["p25"], t["torch"]["p75"]], triton_iqr=[t["triton"]["p25"], t["triton"]["p75"]],
                             speedup=t["torch"]["median"] / t["triton"]["median"]))
            print(f"  N={N} {name}: torch {rows[-1]['torch_ms']:.3f} ms, triton {rows[-1]['triton_ms']:.3f} ms "
                  f"({rows[-1]['speedup']:.2f}x)", flush=True)
    return {"rows": rows, "geometry": f"{cfg.heads} heads x {cfg.head_dim}, MHA, hidden {cfg.hidden}, bf16, "
            f"prompt = {cfg.prefix} + N visual + {cfg.n_text - cfg.prefix} text", "reps": cfg.reps}


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def geometry(cfg: Config, name: str) -> dict:
    from vlm_tokenprune.eval import profiler

    g = profiler.KNOWN_GEOMETRIES[name]
    return dry_geometry(g) if cfg.dry else g


def build(cfg: Config, name: str, dtype, layers=None, attn="sdpa"):
    """A random-weight model of a profiler geometry, built directly on the device (no CPU init)."""
    from vlm_tokenprune.eval import profiler

    g = geometry(cfg, name)
    saved = profiler.KNOWN_GEOMETRIES.get(name)
    profiler.KNOWN_GEOMETRIES[name] = g  # the dry run's shrink, for build_geometry in this process only
    try:
        model = profiler.build_geometry(name, layers=layers, dtype=dtype, attn_implementation=attn, device=cfg.device)
    finally:
        profiler.KNOWN_GEOMETRIES[name] = saved
    grid = cfg.qwen_grid if g["family"] == "qwen2_vl" else None
    inputs = profiler.random_inputs(model, n_text=cfg.n_text if not cfg.dry else 16, image_size=g.get("image_size"),
                                    grid=grid)
    return model, profiler.to_device(inputs, model), g


def n_visual_of(model, inputs) -> int:
    ids = inputs["input_ids"][0]
    toks = {getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None)} - {None}
    return int(sum(int((ids == t).sum()) for t in toks))


# ------------------------------------------------------------------------------------------------
# part 4: cached decode vs cache-free oracle
# ------------------------------------------------------------------------------------------------
def part_decode(cfg: Config, budget: Budget) -> dict:
    import vlm_tokenprune as vtp

    # IEEE fp32 everywhere (cuDNN's convolutions, the CLIP patch embedding, default to TF32 on GPUs)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model, inputs, _ = build(cfg, cfg.decode_model, torch.float32, layers=cfg.decode_layers)
    S = cfg.decode_steps
    L = inputs["input_ids"].shape[1]
    eos = model.config.text_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    image_id = model.config.image_token_id  # a generated placeholder id would be an image in the cache-free forward
    gen = dict(max_new_tokens=S, min_new_tokens=S, do_sample=False, output_logits=True, return_dict_in_generate=True,
               pad_token_id=model.config.text_config.pad_token_id, suppress_tokens=[image_id])
    checks = [("llm", "fastv:layer=2,keep=0.25", "torch"), ("llm", "fastv:layer=2,keep=0.25", "triton"),
              ("pre_llm", "aim_merge", "triton"), ("vision", "flowcut_vit", "triton")]
    oracle, eager, rows = None, None, []
    for site, policy, backend in checks:
        t0 = time.perf_counter()
        row = dict(site=site, policy=policy, backend=backend)
        try:
            with torch.no_grad():
                with vtp.patch(model, policy, backend=backend) as h:
                    model(**inputs)  # a prefill alone: its trace has the kept positions
                    tr = h.last_trace()
                    kept = [list(s.kept_positions[0]) for s in tr.stages]
                    out = model.generate(**inputs, **gen)
                    toks = out.sequences[:, L:]
                    got = torch.stack(out.logits, 1)[0].float()  # [S, V], raw (before min_new_tokens' EOS mask)
                    if site != "llm":  # text-independent reduction: one cache-free forward gives every step
                        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], toks[:, :-1]], 1),
                                    attention_mask=torch.ones(1, L + S - 1, dtype=torch.long, device=cfg.device))
                        want = model(**full, use_cache=False).logits[0, -S:].float()
                        row["oracle"] = "cache-free forward of the patched model over prompt + generated tokens"
                if site == "llm":
                    if oracle is None:
                        oracle = load_oracle("fastv_oracle")
                        eager = oracle.eager_copy(model)
                    with torch.device(cfg.device):  # the oracle builds its position ids / masks with torch.tensor
                        embeds = oracle.prompt_embeds(model, inputs)
                        img = oracle.image_positions(model, inputs["input_ids"])
                        k = tr.stages[0].visual_after[0]
                        okeep = oracle.keep_from_embeds(eager, embeds, img, 2, k)
                        sc = sorted(oracle.scores_from_embeds(eager, embeds, img, 2).values(), reverse=True)
                        row["keep_margin"] = sc[k - 1] - sc[k] if 0 < k < len(sc) else None  # a near tie flips the set
                        emb = eager.model.language_model.embed_tokens(toks[:, :-1])
                        # decode equality with the library's kept set (a near tie may flip the oracle's own choice,
                        # reported beside it: same_kept_as_oracle, keep_margin)
                        want = oracle.logits_from_embeds(eager, torch.cat([embeds, emb], 1), img, 2, kept[0])[0, -S:].float()
                    row["oracle"] = ("tests/reference/fastv_oracle.py (eager, layer by layer, no cache), teacher-forced on the "
                                     "cached kept set; its own top-k compared separately")
                    row["same_kept_as_oracle"] = okeep == kept[0]
                    row["kept_differences"] = sorted(set(okeep) ^ set(kept[0]))[:20]
            masked = want.clone()
            masked[:, eos + [image_id]] = float("-inf")  # what min_new_tokens / suppress_tokens forbid
            otoks = masked.argmax(-1)
            same = otoks == toks[0]
            top2 = masked.topk(2, dim=-1).values
            row.update(steps=S, same_tokens=bool(same.all()), first_mismatch=None if bool(same.all()) else int((~same).nonzero()[0]),
                       max_abs_logit_diff=float((want - got).abs().max()), min_top2_gap=float((top2[:, 0] - top2[:, 1]).min()),
                       kept_visual=[len(k) for k in kept])
            row["ok"] = row["same_tokens"] and row.get("same_kept_as_oracle", True)
        except Exception as e:  # one check's failure is recorded; the others run
            row.update(ok=False, kind=error_kind(e), error=f"{type(e).__name__}: {e}", traceback=short_tb(e))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  decode {site} {policy} [{backend}]: ok={row['ok']} "
              f"{row.get('error') or ''} ({row['seconds']:.1f} s)", flush=True)
    del model, eager
    free_memory()
    return {"rows": rows, "all_ok": all(r["ok"] for r in rows),
            "model": f"{cfg.decode_model} geometry, {cfg.decode_layers} decoder layers, fp32, sdpa, random weights"}


# ------------------------------------------------------------------------------------------------
# part 3: prefill profiles
# ------------------------------------------------------------------------------------------------
def resolve_flowcut(family: str) -> str:
    """The paper's name if registered (depth-/family-aware preset), else this family's FlowCut preset."""
    from vlm_tokenprune import Policy

    try:
        Policy.parse("flowcut")
        return "flowcut"
    except Exception:
        return "flowcut_next" if family == "llava_next" else "flowcut_vit"


def structural_policy(model, inputs, out_dir: str, name: str):
    """yopo_25 by name, its head file replaced by one calibrated on this model (vtp.calibrate, one input)."""
    import vlm_tokenprune as vtp

    path = os.path.join(out_dir, f"yopo_heads_{name}.json")
    vtp.calibrate(model, [inputs], what="heads", path=path, progress=False)
    d = vtp.Policy.parse("yopo_25").to_dict()
    for st in d["stages"]:
        if "calibration" in st.get("params", {}):
            st["params"]["calibration"] = path
    return vtp.Policy.from_dict(d)


def synced_selection_ms(cfg: Config, model, policy, backend: str, call, reps: int):
    """Median per prefill of the LLM-site stages' time (scoring + selection + packing), with a device
    synchronise before and after each stage (the trace's own host clock does not wait for the GPU).
    Returns (ms or None, note)."""
    import vlm_tokenprune as vtp
    from vlm_tokenprune import engine

    names = [n for n in ("_run_stage", "_run_drop") if callable(getattr(engine, n, None))]
    if not names:
        return None, "engine._run_stage not found (renamed?): trace seconds only"
    orig = {n: getattr(engine, n) for n in names}
    acc: list = []

    def wrap(fn):
        def timed(*a, **k):
            sync(cfg.device)
            t0 = time.perf_counter()
            r = fn(*a, **k)
            sync(cfg.device)
            acc.append(time.perf_counter() - t0)
            return r
        return timed

    for n in names:
        setattr(engine, n, wrap(orig[n]))
    try:
        pol = vtp.Policy.parse(policy)
        with torch.no_grad(), vtp.patch(model, pol, backend=backend):
            call.prepare(pol)
            if cfg.warmup:
                call()  # warm-up
            totals = []
            for _ in range(reps):
                acc.clear()
                call()
                totals.append(sum(acc))
    finally:
        for n in names:
            setattr(engine, n, orig[n])
    if not any(totals):
        return None, "no LLM-site stage ran"
    return 1e3 * statistics.median(totals), "synchronised around each LLM-site stage"


class ForwardCall:
    """A forward from pixels (``logits_to_keep=1``), with ``LMPrefillCall``'s ``prepare`` interface: the
    selection-time measurement where precomputed image features are ignored (transformers 5.17)."""

    def __init__(self, model, inputs):
        self.model, self.inputs = model, inputs

    def prepare(self, policy) -> None:
        pass

    def __call__(self):
        return self.model(**self.inputs, logits_to_keep=1)


class Refused(Exception):
    """profile() skipped the policy: it does not fit this model (a PolicyError, reported by the library)."""


def profile_row(cfg: Config, model, inputs, label: str, policy, backend: str, call, honoured: bool,
                ttft: bool = True) -> dict:
    """One policy vs the baseline through ``profiler.profile`` (LM prefill, TTFT, parts of a forward from
    pixels), plus the synchronised LLM-site stage time. The LM time is the profiler's LM prefill on
    precomputed image features where the model honours them (``honoured``), else the ``llm`` part of the
    forward from pixels (the language model's own span, hooks included)."""
    from vlm_tokenprune import Policy
    from vlm_tokenprune.eval import profiler

    t0 = time.perf_counter()
    pol = Policy.parse(policy)
    rep = profiler.profile(model, [pol], inputs=inputs, iters=cfg.iters, warmup=cfg.warmup, device=cfg.device,
                           backend=backend, ttft=ttft, parts=True)
    if not rep["policies"]:
        raise Refused("; ".join(f"{x['policy']}: {x['error']}" for x in rep.get("skipped", [])) or "skipped by profile()")
    r = rep["policies"][0]
    llm = r["parts"]["llm"]
    if honoured:
        base_ms, ratio, lm_src = r["baseline_prefill_ms"]["median"], r["measured_ratio"], "LM prefill (mm_encoder_outputs)"
    else:
        base_ms, ratio, lm_src = llm["baseline_ms"]["median"], llm["ratio"], "llm part of a forward from pixels"
    llm_site = any(s.site == "llm" and s.changes_tokens for s in pol.stages)
    sel_call = call if honoured else ForwardCall(model, inputs)
    sel_ms, note = (synced_selection_ms(cfg, model, pol, backend, sel_call, cfg.sel_reps) if llm_site
                    else (None, "no LLM-site stage"))
    row = dict(
        label=label, policy=r["policy"], backend=backend, attn=rep["model"]["attn_implementation"],
        sites=sorted({s.site for s in pol.stages}), llm_site=llm_site, lm_time=lm_src,
        tokens=f"{r['tokens_per_layer'][0]} -> {r['tokens_per_layer'][-1]}", tokens_per_layer=r["tokens_per_layer"],
        kept_visual_per_stage=[[int(v) for v in k] for k in r["kept_visual_per_stage"]],
        baseline_prefill_ms=base_ms, prefill_ms=base_ms * ratio,
        measured_ratio=ratio, speedup=1.0 / ratio, predicted_ratio=r["predicted_ratio"],
        quotient=r["predicted_ratio"] / ratio, ttft_ratio=r.get("ttft_ratio"),
        profiler_prefill_ratio=r["measured_ratio"], llm_part_ratio=llm["ratio"],
        vision_part_ratio=(r["parts"].get("vision") or {}).get("ratio"), forward_ratio=r.get("forward_ratio"),
        baseline_ttft_ms=(r.get("baseline_ttft_ms") or {}).get("median"), ttft_ms=(r.get("ttft_ms") or {}).get("median"),
        trace_overhead_pct=r["overhead_pct_of_baseline"], selection_ms=sel_ms, selection_note=note,
        selection_pct=None if sel_ms is None else 100.0 * sel_ms / base_ms,
        peak_mib=None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20,
        baseline_peak_mib=None if r["baseline_peak_memory_bytes"] is None else r["baseline_peak_memory_bytes"] / 2**20,
        peak_abs_gib=None if r["peak_memory_abs_bytes"] is None else r["peak_memory_abs_bytes"] / 2**30,
        ok=True,
    )
    row["seconds"] = time.perf_counter() - t0
    return row


def model_rows(cfg: Config, name: str, family: str, n_visual: int) -> list:
    """(label, policy, backend, goal tag) rows of one model."""
    rows = [("fastv", "fastv", "triton", None), ("fastv", "fastv", "torch", None),
            ("feather", "feather", "triton", None), ("feather", "feather", "torch", None),
            ("pdrop", "pdrop", "triton", None), ("pdrop", "pdrop", "torch", None),
            ("flowcut", resolve_flowcut(family), "triton", None),
            ("aim_merge", "aim_merge", "triton", None), ("mctf", "mctf", "triton", None),
            ("yopo_25 (structural)", "STRUCTURAL", "triton", None)]
    if name == "llava-1.5-7b":
        k = 64 * n_visual // 576 if cfg.dry else 64
        rows.append((f"576 -> 64 (FastV layer 2)", f"fastv:layer=2,tokens={k}", "triton", "llava15_64"))
    if name == "llava-next-7b":
        k = 160 * n_visual // 2928 if cfg.dry else 160
        rows.append((f"2880 -> 160 (FastV layer 2)", f"fastv:layer=2,tokens={k}", "triton", "next_160"))
        rows.append((f"2880 -> 160 (uniform before the LLM)", f"uniform:site=pre_llm,tokens={k}", "triton", None))
    if name == "llava-1.5-7b":
        rows.append(("fastv (eager attention)", "fastv", "triton", "EAGER"))
    if cfg.dry:  # the interpreter is slow: the kernels inside a model once (FastV on LLaVA-1.5), the rest on torch
        out, seen = [], set()
        for label, policy, backend, tag in rows:
            backend = backend if (name == "llava-1.5-7b" and label == "fastv") else "torch"
            if (label, backend) not in seen:
                seen.add((label, backend))
                out.append((label, policy, backend, tag))
        rows = out
    return rows


def part_prefill(cfg: Config, budget: Budget, models: list, out_dir: str, report_cb) -> dict:
    from vlm_tokenprune.eval import profiler
    from vlm_tokenprune.eval.tiny_models import make_batch

    result: dict = {"models": {}, "skipped": [], "scaling": []}
    for name in models:
        if not budget.allows(cfg.est["model"]):
            result["skipped"].append(f"{name}: not started, {budget.left():.0f} s left of the budget")
            print(f"  SKIP {name}: budget", flush=True)
            continue
        t0 = time.perf_counter()
        entry: dict = {"rows": [], "errors": [], "skipped": []}
        result["models"][name] = entry
        try:
            model, inputs, g = build(cfg, name, cfg.prefill_dtype)
        except Exception as e:
            entry["errors"].append(dict(label="build", kind="crashed", error=f"{type(e).__name__}: {e}", traceback=short_tb(e)))
            print(f"  {name}: build FAILED {type(e).__name__}: {e}", flush=True)
            continue
        sync(cfg.device)
        entry["build_s"] = time.perf_counter() - t0
        n_vis = n_visual_of(model, inputs)
        desc = g["description"]
        if g["family"] == "qwen2_vl":
            desc += f"; measured here with a {cfg.qwen_grid[0]} x {cfg.qwen_grid[1]} = {n_vis}-token image"
        entry.update(description=desc, n_visual=n_vis, prompt_len=int(inputs["input_ids"].shape[1]),
                     dtype=str(cfg.prefill_dtype).replace("torch.", ""), params_b=sum(p.numel() for p in model.parameters()) / 1e9)
        print(f"  {name}: built in {entry['build_s']:.1f} s ({entry['params_b']:.2f} B params), "
              f"{entry['prompt_len']} tokens ({n_vis} visual)", flush=True)
        lm_inputs = profiler.encode_images(model, inputs)
        call = profiler.LMPrefillCall(model, inputs, lm_inputs)
        honoured = profiler.encoder_outputs_honoured(model, inputs, lm_inputs)
        entry["lm_time"] = ("LM prefill on precomputed image features (profiler 'prefill')" if honoured else
                            "llm part of a forward from pixels: this transformers ignores mm_encoder_outputs")
        plan = model_rows(cfg, name, g["family"], n_vis)
        for label, policy, backend, tag in plan:
            if not budget.allows(cfg.est["row"]):
                entry["skipped"].append(f"{label} [{backend}]: {budget.left():.0f} s left")
                continue
            eager = tag == "EAGER"
            ttft = not cfg.dry or not entry["rows"]  # dry run: generate() once per model
            try:
                if policy == "STRUCTURAL":
                    policy = structural_policy(model, inputs, out_dir, name)
                if eager:
                    model.set_attn_implementation("eager")
                row = profile_row(cfg, model, inputs, label, policy, backend, call, honoured, ttft=ttft)
                row["goal"] = None if eager else tag
                entry["rows"].append(row)
                print(f"    {label} [{backend}, {row['attn']}]: {row['tokens']} tokens, prefill {row['speedup']:.2f}x "
                      f"(predicted {1 / row['predicted_ratio']:.2f}x, quotient {row['quotient']:.2f}), TTFT ratio "
                      f"{_f(row['ttft_ratio'])}, selection {row['selection_ms'] if row['selection_ms'] is None else round(row['selection_ms'], 3)} ms "
                      f"({row['seconds']:.1f} s)", flush=True)
            except Exception as e:
                entry["errors"].append(dict(label=label, policy=str(policy), backend=backend, kind=error_kind(e),
                                            error=f"{type(e).__name__}: {e}", traceback=short_tb(e)))
                print(f"    {label} [{backend}] FAILED {type(e).__name__}: {e}", flush=True)
            finally:
                if eager:
                    model.set_attn_implementation("sdpa")
            report_cb()
        if name == "llava-1.5-7b":  # N = 11520: the same model, 20 images in one prompt
            result["scaling"] = scaling_rows(cfg, model, budget, make_batch, profiler, entry, honoured)
        entry["seconds"] = time.perf_counter() - t0
        del model, inputs, call
        free_memory()
        report_cb()
    return result


def scaling_rows(cfg: Config, model, budget: Budget, make_batch, profiler, entry, honoured: bool) -> list:
    """FastV on LLaVA-1.5-7B with ``scaling_images`` images (N = 11520 on the GPU run), both backends."""
    out = []
    if not budget.allows(3 * cfg.est["row"]):
        entry["skipped"].append(f"N = {cfg.scaling_images} images scaling rows: {budget.left():.0f} s left")
        return out
    try:
        inputs = profiler.to_device(make_batch(model, [[34 if not cfg.dry else 4, *["img"] * cfg.scaling_images, 29 if not cfg.dry else 4]]), model)
        call = profiler.LMPrefillCall(model, inputs, profiler.encode_images(model, inputs))
        n = n_visual_of(model, inputs)
        long = copy.copy(cfg)
        long.iters = max(1, min(cfg.iters, 5))  # ~0.4 s per 7B prefill at 11.6k tokens
        for backend in ("torch",) if cfg.dry else ("triton", "torch"):
            row = profile_row(long, model, inputs, f"fastv, N = {n}", "fastv", backend, call, honoured, ttft=False)
            row["N"] = n
            out.append(row)
            print(f"    N={n} fastv [{backend}]: prefill {row['speedup']:.2f}x, selection {row['selection_ms']} ms, "
                  f"peak {row['peak_mib']} MiB ({row['seconds']:.1f} s)", flush=True)
    except Exception as e:
        entry["errors"].append(dict(label=f"scaling N ({cfg.scaling_images} images)", kind=error_kind(e),
                                    error=f"{type(e).__name__}: {e}",
                                    traceback=short_tb(e)))
        print(f"    scaling FAILED {type(e).__name__}: {e}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# goals and the report
# ------------------------------------------------------------------------------------------------
def judge(state: dict) -> list:
    dry = state["meta"]["dry_run"]
    parts = state["parts"]
    res = lambda p: (parts.get(p) or {}).get("result") or {}  # noqa: E731
    goals = []

    def add(goal, value, passed, detail=""):
        status = "pending" if passed is None else ("pass" if passed else "fail")
        if dry and passed is not None:
            status = "not judged (dry run)"
        goals.append(dict(goal=goal, value=value, status=status, detail=detail))

    pre = res("prefill").get("models", {})
    rows = [r for m in pre.values() for r in m.get("rows", [])]
    # judged on the rows of the backend a GPU run gets by default (auto = the kernels); torch rows in the detail
    sdpa = [r for r in rows if r["attn"] == "sdpa"]
    inllm_all = [r for r in sdpa if r["llm_site"] and "pre_llm" not in r["sites"] and "vision" not in r["sites"]
                 and "yopo" not in r["label"]]
    inllm = [r for r in inllm_all if r["backend"] == "triton"]
    torch_rows = [r for r in inllm_all if r["backend"] == "torch"]
    if inllm:
        worst = min(inllm, key=lambda r: r["quotient"])
        tw = min((r["quotient"] for r in torch_rows), default=None)
        add("measured / FLOPs-predicted prefill speed-up >= 0.9 for in-LLM methods", f"min {worst['quotient']:.3f}",
            all(r["quotient"] >= 0.9 for r in inllm), f"worst: {worst['label']} (backend triton, {len(inllm)} rows); "
            f"backend torch min {_f(tw)}")
    else:
        add("measured / FLOPs-predicted prefill speed-up >= 0.9 for in-LLM methods", "-", None, "no prefill rows")
    for tag, goal, need in (("next_160", "LLaVA-NeXT-7B 2880 -> 160 visual tokens >= 5x prefill (FastV layer 2)", 5.0),
                            ("llava15_64", "LLaVA-1.5-7B 576 -> 64 >= 2.5x prefill (FastV layer 2)", 2.5)):
        r = next((r for r in rows if r.get("goal") == tag), None)
        add(goal, "-" if r is None else f"{r['speedup']:.2f}x", None if r is None else r["speedup"] >= need,
            "" if r is None else f"predicted {1 / r['predicted_ratio']:.2f}x; TTFT "
            f"{'-' if r['ttft_ratio'] is None else format(1 / r['ttft_ratio'], '.2f')}x; LM time: {r['lm_time']}")
    t = [r for r in res("timings").get("rows", []) if r["op"] == "selection step"]
    mid = sorted({r["N"] for r in t})
    pick = next((r for r in t if r["N"] == 2880), None) or (t[len(t) // 2] if t else None)
    add("fused selection >= 2x the torch ops at N = 2880", "-" if pick is None else f"{pick['speedup']:.2f}x at N = {pick['N']}",
        None if pick is None else pick["speedup"] >= 2.0, f"N measured: {mid}")
    sel = [r for r in sdpa if r["selection_pct"] is not None and r["backend"] == "triton"]
    if sel:
        worst = max(sel, key=lambda r: r["selection_pct"])
        tw = max((r["selection_pct"] for r in sdpa if r["selection_pct"] is not None and r["backend"] == "torch"),
                 default=None)
        add("selection <= 2 % of prefill", f"max {worst['selection_pct']:.2f} %", all(r["selection_pct"] <= 2.0 for r in sel),
            f"worst: {worst['label']} (backend triton); synchronised LLM-site stage time / baseline LM time; "
            f"backend torch max {_f(tw, '.2f')} %")
    else:
        add("selection <= 2 % of prefill", "-", None, "no rows")
    k = res("kernels")
    add("kernels == references (kept indices identical, scores within tolerance, gathers identical)",
        f"{k['n_ok']}/{k['n_cases']}" if k else "-", k.get("all_ok") if k else None)
    d = res("decode")
    add("200-token cached decode == cache-free oracle, one policy per site",
        f"{sum(r['ok'] for r in d['rows'])}/{len(d['rows'])}" if d else "-", d.get("all_ok") if d else None)
    return goals


def _f(x, fmt=".3f"):
    return "-" if x is None else format(x, fmt)


def table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def render(state: dict) -> str:
    m = state["meta"]
    L = ["# GPU check (`benchmarks/gpu.py`)", "",
         f"- command: `{m['command']}`",
         f"- device: {m['device_name']}; torch {m['torch']} (CUDA {m['cuda']}); transformers {m['transformers']}; "
         f"triton {m['triton']}; Python {m['python']}; git {m['git_commit']}; {m['date']}",
         f"- budget {m['budget_s']:.0f} s; elapsed {state.get('elapsed_s', 0):.0f} s"]
    if m["dry_run"]:
        L += ["- **DRY RUN** (CPU, tiny widths, Triton interpreter): the figures below mean nothing; it proves the command runs."]
    L += ["", "## Goals", ""]
    L += table(["goal", "value", "status", "detail"], [[g["goal"], g["value"], g["status"], g["detail"]] for g in state["goals"]])
    if state.get("problems"):
        L += ["", "## Problems", "", *[f"- {x}" for x in state["problems"]]]
    L += ["", "## Parts", ""]
    L += table(["part", "status", "seconds", "note"], [[p, v["status"], _f(v.get("seconds"), ".1f"), v.get("note", "")]
                                                       for p, v in state["parts"].items()])
    for p, v in state["parts"].items():
        if v.get("error"):
            L += ["", f"### {p}: error", "", "```", v["error"], v.get("traceback", ""), "```"]
    r = (state["parts"].get("kernels") or {}).get("result")
    if r:
        L += ["", "## 1. Kernel parity (Triton vs PyTorch reference)", "",
              f"{r['n_ok']} of {r['n_cases']} cases pass (interpreted: {r['interpreted']}); tolerance {r['tolerance']}. "
              "Failing cases:" if r["n_ok"] < r["n_cases"] else
              f"All {r['n_cases']} cases pass (interpreted: {r['interpreted']}; score tolerance {r['tolerance']}).", ""]
        bad = [c for c in r["cases"] if not c["ok"]]
        worst = {}
        for c in r["cases"]:
            key = (c["N"], c["dtype"])
            worst[key] = max(worst.get(key, 0.0), c["max_abs_diff"])
        L += table(["N", "dtype", "max abs score diff (all GQA, rows, softmax modes)"],
                   [[n, d, f"{v:.2e}"] for (n, d), v in worst.items()])
        if bad:
            L += [""] + table(["N", "dtype", "GQA", "R", "softmax", "max diff", "within tol", "same top-k op",
                               "same kept", "top-k margin", "same gather"],
                              [[c["N"], c["dtype"], c["gqa"], c["R"], c["softmax"], f"{c['max_abs_diff']:.2e}", c["within_tol"],
                                c["same_topk_op"], c["same_kept"], f"{c['topk_margin']:.2e}", c["same_gather"]] for c in bad])
    r = (state["parts"].get("timings") or {}).get("result")
    if r:
        L += ["", "## 2. Kernel timings (median ms, CUDA events)", "", r["geometry"], ""]
        L += table(["N", "op", "torch ms", "triton ms", "torch / triton"],
                   [[x["N"], x["op"], _f(x["torch_ms"]), _f(x["triton_ms"]), _f(x["speedup"], ".2f")] for x in r["rows"]])
    r = (state["parts"].get("prefill") or {}).get("result")
    if r:
        L += ["", "## 3. Prefill profiles (random weights, full depth)", "",
              "speed-up = baseline / patched LM prefill (median of interleaved runs); predicted = FLOPs "
              "(eval/flops.py on the run's own trace); quotient = measured / predicted speed-up; selection = "
              "scoring + selection of the LLM-site stages, synchronised, as % of the baseline prefill; "
              "trace % = the trace's host-clock stage seconds (not synchronised); peak = peak memory above "
              "the model (patched / baseline)."]
        for name, e in r["models"].items():
            L += ["", f"### {name}", "", f"{e.get('description', '')}; {e.get('prompt_len', '?')} tokens "
                  f"({e.get('n_visual', '?')} visual), {e.get('dtype', '')}, {_f(e.get('params_b'), '.2f')} B params, "
                  f"built in {_f(e.get('build_s'), '.1f')} s", ""]
            L += table(["row", "policy", "backend", "attn", "tokens/layer", "base ms", "speed-up", "predicted", "quotient",
                        "TTFT speed-up", "selection ms (%)", "trace %", "peak MiB (base)"],
                       [[x["label"], f"`{x['policy']}`", x["backend"], x["attn"], x["tokens"], _f(x["baseline_prefill_ms"], ".2f"),
                         _f(x["speedup"], ".2f"), _f(1 / x["predicted_ratio"], ".2f"), _f(x["quotient"]),
                         _f(None if x["ttft_ratio"] is None else 1 / x["ttft_ratio"], ".2f"),
                         "-" if x["selection_ms"] is None else f"{x['selection_ms']:.3f} ({x['selection_pct']:.2f} %)",
                         _f(x["trace_overhead_pct"], ".2f"), f"{_f(x['peak_mib'], '.0f')} ({_f(x['baseline_peak_mib'], '.0f')})"]
                        for x in e["rows"]])
            if e.get("lm_time"):
                L += ["", f"LM time: {e['lm_time']}."]
            for err in e["errors"]:
                if err.get("kind") == "refused":
                    L += ["", f"- refused by the library ({err['label']}, {err.get('backend', '')}): {err['error']}"]
                else:
                    L += ["", f"- FAILED {err['label']}: {err['error']}", "", "```", err.get("traceback", ""), "```"]
            for s in e["skipped"]:
                L += [f"- skipped (budget): {s}"]
        if r.get("scaling"):
            L += ["", "### Attention-row scoring vs N (FastV, LLaVA-1.5-7B geometry)", ""]
            sc = [(x["tokens_per_layer"][0], x) for m_ in r["models"].values() for x in m_["rows"]
                  if x["label"] == "fastv" and x["attn"] == "sdpa"] + [(x["tokens_per_layer"][0], x) for x in r["scaling"]]
            L += table(["prompt tokens", "backend", "selection ms", "ms per 1000 prompt tokens", "peak MiB (base)", "speed-up"],
                       [[n, x["backend"], _f(x["selection_ms"]), _f(None if x["selection_ms"] is None else 1e3 * x["selection_ms"] / n),
                         f"{_f(x['peak_mib'], '.0f')} ({_f(x['baseline_peak_mib'], '.0f')})", _f(x["speedup"], ".2f")]
                        for n, x in sorted(sc, key=lambda t: (t[1]["backend"], t[0]))])
        for s in r.get("skipped", []):
            L += [f"- skipped (budget): {s}"]
    r = (state["parts"].get("decode") or {}).get("result")
    if r:
        L += ["", "## 4. Cached decode vs cache-free oracle", "", r["model"], ""]
        L += table(["site", "policy", "backend", "steps", "same tokens", "first mismatch", "max abs logit diff",
                    "min top-2 gap", "same kept as oracle (score margin at k)", "oracle"],
                   [[x["site"], f"`{x['policy']}`", x["backend"], x.get("steps", "-"), x.get("same_tokens", "-"),
                     x.get("first_mismatch", "-"), _f(x.get("max_abs_logit_diff"), ".2e"), _f(x.get("min_top2_gap"), ".2e"),
                     f"{x.get('same_kept_as_oracle', '-')} ({_f(x.get('keep_margin'), '.1e')})",
                     x.get("oracle", x.get("error", ""))] for x in r["rows"]])
        for x in r["rows"]:
            if x.get("traceback"):
                L += ["", f"- FAILED {x['site']} {x['policy']}: {x['error']}", "", "```", x["traceback"], "```"]
    return "\n".join(L) + "\n"


def problems(state: dict) -> list:
    """What went wrong beyond a policy the library refused: failed parts, crashed rows, mismatches."""
    out = []
    for p, v in state["parts"].items():
        if v["status"] == "failed":
            out.append(f"part {p} failed: {v.get('error')}")
        r = v.get("result") or {}
        if p == "kernels" and r and not r["all_ok"]:
            out.append(f"kernels: {r['n_cases'] - r['n_ok']} of {r['n_cases']} cases differ")
        if p == "decode":
            out += [f"decode {x['site']} {x['policy']} [{x['backend']}]: {x.get('error') or 'differs from the oracle'}"
                    for x in r.get("rows", []) if not x["ok"]]
        if p == "prefill":
            out += [f"prefill {m} {e['label']}: {e['error']}" for m, me in r.get("models", {}).items()
                    for e in me.get("errors", []) if e.get("kind") != "refused"]
    return out


def write_report(state: dict, out_dir: str, budget: Budget) -> None:
    state["elapsed_s"] = budget.elapsed()
    state["goals"] = judge(state)
    state["problems"] = problems(state)
    with open(os.path.join(out_dir, "gpu_report.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1, default=str)
    with open(os.path.join(out_dir, "gpu_report.md"), "w", encoding="utf-8") as f:
        f.write(render(state))


def meta(cfg: Config, a: argparse.Namespace) -> dict:
    import transformers

    from vlm_tokenprune.eval.profiler import git_commit

    try:
        import triton
        tv = triton.__version__
    except Exception as e:  # noqa: BLE001
        tv = f"not importable ({type(e).__name__})"
    return {"command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "dry_run": cfg.dry,
            "device_name": torch.cuda.get_device_name() if cfg.device.type == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "triton": tv, "python": sys.version.split()[0], "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": a.budget_s, "parts": a.parts, "models": a.models,
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def main(a: argparse.Namespace) -> int:
    budget = Budget(a.budget_s)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = make_config(a)
    os.makedirs(a.out, exist_ok=True)
    state = {"meta": meta(cfg, a), "parts": {}, "goals": []}
    print(f"gpu.py: {state['meta']['device_name']}, torch {torch.__version__}, budget {a.budget_s:.0f} s, "
          f"parts {', '.join(a.parts)}", flush=True)
    write_report(state, a.out, budget)
    runners = {"kernels": lambda: part_kernels(cfg, budget), "timings": lambda: part_timings(cfg, budget),
               "decode": lambda: part_decode(cfg, budget),
               "prefill": lambda: part_prefill(cfg, budget, a.models, a.out, lambda: write_report(state, a.out, budget))}
    for p in a.parts:
        est = cfg.est["model"] if p == "prefill" else cfg.est[p]
        if not budget.allows(est):
            state["parts"][p] = {"status": "skipped", "note": f"{budget.left():.0f} s left of {a.budget_s:.0f} s (needs ~{est} s)"}
            print(f"[{p}] SKIPPED: budget ({budget.left():.0f} s left)", flush=True)
            write_report(state, a.out, budget)
            continue
        print(f"[{p}] start at {budget.elapsed():.1f} s", flush=True)
        t0 = time.perf_counter()
        state["parts"][p] = {"status": "running"}
        try:
            state["parts"][p]["result"] = runners[p]()
            state["parts"][p]["status"] = "ok"
        except Exception as e:  # recorded; the next part runs
            state["parts"][p].update(status="failed", error=f"{type(e).__name__}: {e}", traceback=short_tb(e))
            print(f"[{p}] FAILED: {type(e).__name__}: {e}\n{short_tb(e)}", flush=True)
        finally:
            free_memory()
        state["parts"][p]["seconds"] = time.perf_counter() - t0
        print(f"[{p}] {state['parts'][p]['status']} in {state['parts'][p]['seconds']:.1f} s "
              f"(total {budget.elapsed():.1f} s)", flush=True)
        write_report(state, a.out, budget)
    write_report(state, a.out, budget)
    print(f"wrote {os.path.join(a.out, 'gpu_report.md')} and gpu_report.json in {budget.elapsed():.1f} s", flush=True)
    for g in state["goals"]:
        print(f"  [{g['status']}] {g['goal']}: {g['value']}", flush=True)
    for x in state["problems"]:
        print(f"  PROBLEM: {x}", flush=True)
    return 1 if state["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
