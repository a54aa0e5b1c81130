"""``vlm-tokenprune``: list methods, explain a policy's cost, run the shipped tiny VLM, benchmark, profile, draw.

    vlm-tokenprune methods
    vlm-tokenprune explain "fastv:layer=2,keep=0.5" [--model-config llava-1.5-7b | path/to/config.json]
    vlm-tokenprune demo [--policy "fastv:layer=2,keep=0.25"] [--n 10]
    vlm-tokenprune bench --policy fastv [--policy uniform ...] [--budgets 0.5,0.25,0.11] [--n 500] [--out DIR]
    vlm-tokenprune profile --model {tiny,llava-1.5-7b,llava-next-7b,qwen2-vl-7b,PATH} --policy P [--iters 20] [--json F]
    vlm-tokenprune viz [--image IMG --question Q] --policy P --out kept.png
    vlm-tokenprune search --model {tiny,PATH} --budget flops=0.3 [--calibration-data cal.jsonl] [--heldout-data held.jsonl]
    vlm-tokenprune train {covipal,...} [trainer options]   (learned selectors; `train NAME --help`)

Exit status: 0 on success, 2 for a bad policy, option or config (the message names the field).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

# KNOWN_MODELS, read_policy, trainers, compact_stage: importable from here as before the split into commands/
from .commands.explain import KNOWN_MODELS, cmd_explain, model_names, read_policy  # noqa: F401
from .commands.methods import cmd_methods
from .commands.run import cmd_bench, cmd_demo, cmd_profile, cmd_search, cmd_train, cmd_viz, parse_budgets, trainers  # noqa: F401
from .commands.text import compact_stage  # noqa: F401
from .errors import VTPError

PROG = "vlm-tokenprune"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog=PROG, description="Inference-time visual-token pruning for Hugging Face VLMs.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("methods", help="list the registered presets and criteria")
    m.set_defaults(func=cmd_methods)

    e = sub.add_parser("explain", help="parse a policy and predict its tokens per layer and prefill FLOPs")
    e.add_argument("policy", help='a policy string, e.g. "fastv:layer=2,keep=0.5", or a YAML / JSON policy file')
    e.add_argument("--model-config", default="llava-1.5-7b", metavar="NAME|PATH",
                   help="a known geometry (" + ", ".join(model_names()) + ") or a path to a Hugging Face config.json "
                   "(default: llava-1.5-7b)")
    e.add_argument("--n-text", type=int, default=64, help="text tokens in the prompt, system prompt included (default 64)")
    e.add_argument("--n-visual", type=int, default=None, help="visual tokens (default: from the model)")
    e.add_argument("--json", action="store_true", help="print the prediction as JSON")
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("demo", help="answer a few synthetic questions with the shipped tiny VLM, with and without a policy (offline)")
    d.add_argument("--policy", default="fastv:layer=2,keep=0.25", help="a policy string or a YAML / JSON policy file (default fastv:layer=2,keep=0.25)")
    d.add_argument("--n", type=int, default=10, help="questions from the synthetic test split (default 10, types balanced)")
    d.add_argument("--batch-size", type=int, default=8, help="questions per generate() batch (default 8)")
    d.add_argument("--repeats", type=int, default=7, help="timed prefills of each kind (default 7; 0: no timing, n/a)")
    d.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="offline benchmark: accuracy, tokens, FLOPs, prefill ratio (the shipped tiny VLM; "
                       "profile's geometries: no accuracy)")
    b.add_argument("--policy", action="append", required=True, help="a policy string or a YAML / JSON policy file (repeat for several)")
    b.add_argument("--budgets", default=None, help="keep fractions, e.g. 0.5,0.25,0.11 (multi-stage: see README)")
    b.add_argument("--n", type=int, default=500, help="test-split examples (default 500)")
    b.add_argument("--batch-size", type=int, default=8, help="examples per generate() batch (default 8)")
    b.add_argument("--out", default="vtp_bench", help="output folder for bench.json / .md / .png (default ./vtp_bench)")
    from .eval.bench_geometry import add_cli_args

    add_cli_args(b)  # --model tiny | PATH | profile's geometries, --layers, --vision-layers, --n-text
    b.add_argument("--timing-iters", type=int, default=5,
                   help="interleaved prefills timed per policy (default 5; 0: none, the prefill ratio reads n/a)")
    b.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="where the hot ops run: auto (Triton on CUDA when installed), torch, triton (default auto)")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    b.set_defaults(func=cmd_bench)

    se = sub.add_parser("search", help="EvoPress search for the best policy under a FLOPs budget (token budgets, "
                        "FinerCut sublayers, heads); writes best.yaml and a Pareto table")
    se.add_argument("--model", default="tiny", help="tiny (the shipped tiny VLM) or a local Hugging Face VLM checkpoint "
                    "folder (other than the tiny VLM's format: needs --calibration-data, and --heldout-data or --heldout 0)")
    se.add_argument("--calibration-data", default=None, metavar="FILE.jsonl", help='your calibration records, one '
                    '{"image": path(s) relative to the file, "prompt": full prompt text, "answer": optional} per line '
                    "(default: the synthetic val split, tiny VLM format only)")
    se.add_argument("--heldout-data", default=None, metavar="FILE.jsonl", help="your held-out records (answer required; "
                    "disjoint from the calibration records), scored by greedy exact match (default: synthetic test split)")
    se.add_argument("--answer-tokens", type=int, default=8, help="calibration records without an answer: the unpruned "
                    "model's greedy continuation of this many tokens is the teacher-forced target (default 8)")
    se.add_argument("--dtype", default="auto", help="--model PATH: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    se.add_argument("--device", default="auto", help="--model PATH: auto (CUDA when available), cpu, cuda, cuda:N")
    se.add_argument("--budget", default="flops=0.3", help="flops=R: predicted LM prefill FLOPs ratio <= R (default 0.3); "
                    "latency=R: measured prefill latency ratio on this machine <= R (interleaved with the baseline, medians)")
    se.add_argument("--latency-iters", type=int, default=5, help="--budget latency=R: timed runs per policy (default 5)")
    se.add_argument("--space", default="tokens", help="comma list of tokens, sublayers, heads (default tokens)")
    se.add_argument("--calibration", type=int, default=64, help="calibration examples (synthetic val split, or the first "
                    "N records of --calibration-data; default 64)")
    se.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8)")
    se.add_argument("--generations", type=int, default=20, help="evolution generations (default 20)")
    se.add_argument("--offspring", type=int, default=16, help="children per generation (default 16)")
    se.add_argument("--seed", type=int, default=0, help="random seed of the search (default 0)")
    se.add_argument("--criterion", default="fastv", help="criterion of the LLM token stages (default fastv)")
    se.add_argument("--entry", default="auto", help="stage before the LLM as a policy fragment (e.g. mctf:layer=0), "
                    "auto (MCTF where the model has a CLIP tower) or none")
    se.add_argument("--levels", type=int, default=16, help="token budget levels: keep 1, 1-1/L, ..., 1/L (default 16)")
    se.add_argument("--sublayers", type=int, default=2, help="removed sublayers when the space has sublayers (default 2)")
    se.add_argument("--heads", type=int, default=4, help="heads pruned for visual tokens when the space has heads (default 4)")
    se.add_argument("--criteria", default="", help="LLM-stage criteria the search chooses among, e.g. fastv,dart "
                    "(default: --criterion only)")
    se.add_argument("--trade", type=float, default=0.5, help="share of children that move budget between sub-spaces "
                    "under the one FLOPs constraint (0: --sublayers / --heads counts stay fixed; default 0.5)")
    se.add_argument("--no-seeds", action="store_true", help="do not seed the search with the presets the space expresses")
    se.add_argument("--heldout", type=int, default=200, help="held-out examples (synthetic test split, or the first N "
                    "records of --heldout-data; 0: none; default 200)")
    se.add_argument("--heldout-top", type=int, default=8, help="candidates besides the best scored on the held-out split")
    se.add_argument("--out", default="vtp_search", help="output folder (default ./vtp_search)")
    se.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.json")
    se.add_argument("--per-sample", action="store_true", help="CoLa (2507.07996) analysis: the best chain of skipped / "
                    "repeated layers per test example by MCTS (writes OUT/per_sample.json)")
    se.add_argument("--samples", type=int, default=5, help="--per-sample: test examples (default 5)")
    se.add_argument("--simulations", type=int, default=200, help="--per-sample: MCTS simulations per example")
    se.add_argument("--length-penalty", type=float, default=0.1, help="--per-sample: reward = p(answer) - penalty x "
                    "chain length / layers (default 0.1)")
    se.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    se.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    se.set_defaults(func=cmd_search)

    from .eval.profiler import MODEL_CHOICES

    pr = sub.add_parser("profile", help="prefill latency, TTFT, peak memory, tokens and FLOPs of policies vs the baseline")
    pr.add_argument("--model", default="tiny", metavar="{" + ",".join(MODEL_CHOICES) + "}|PATH",
                    help="the shipped tiny VLM, a known geometry (random weights from its config) or a local checkpoint")
    pr.add_argument("--policy", action="append", help="a policy string or a YAML / JSON policy file (repeat for several; default fastv:layer=2,keep=0.25)")
    pr.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    pr.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    pr.add_argument("--iters", type=int, default=20, help="timed prefills per policy and kind (default 20)")
    pr.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones (default 2)")
    pr.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (to fit a CPU)")
    pr.add_argument("--vision-layers", type=int, default=None, help="vision tower depth of a built geometry")
    pr.add_argument("--batch", type=int, default=1, help="rows of the built prompt batch (default 1)")
    pr.add_argument("--n-text", type=int, default=64, help="text tokens of the built prompt (default 64)")
    pr.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps")
    pr.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                    help="where the hot ops run: auto (Triton on CUDA when installed), torch, triton (default auto)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default 0)")
    pr.add_argument("--no-ttft", action="store_true", help="skip the generate(max_new_tokens=1) timings")
    pr.add_argument("--no-parts", action="store_true",
                    help="skip the forward-from-pixels timings split into vision tower (+ projector) and language model")
    pr.add_argument("--json", default=None, help="write the report as JSON")
    pr.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    pr.set_defaults(func=cmd_profile)

    v = sub.add_parser("viz", help="draw each stage's kept visual tokens on the image (one panel per stage)")
    v.add_argument("--policy", required=True, help="a policy string or a YAML / JSON policy file")
    v.add_argument("--out", default="kept.png", help="the PNG to write (default kept.png)")
    v.add_argument("--image", default=None, help="an image file (default: a synthetic test-split image)")
    v.add_argument("--question", default=None, help="the question asked about --image (give both or neither)")
    v.add_argument("--example", type=int, default=1, help="synthetic test example used without --image (default 1)")
    v.add_argument("--model", default="tiny", help="tiny (the shipped VLM) or a local checkpoint folder")
    v.add_argument("--dtype", default="auto", help="auto (fp32 for the tiny VLM), fp32, bf16, fp16 (a checkpoint)")
    v.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    v.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' weight loading too)")
    v.set_defaults(func=cmd_viz)

    t = sub.add_parser("train", help="train a learned selector (covipal, ...): `train NAME --help` lists its options")
    t.add_argument("name", help="the trainer: vlm_tokenprune.train.NAME (e.g. covipal)")
    t.add_argument("args", nargs=argparse.REMAINDER, help="the trainer's own options")
    t.set_defaults(func=cmd_train)
    return p


# -- argument checks (before any model is loaded) ------------------------------------------------------
_AT_LEAST = {  # attribute -> (flag, smallest allowed value)
    "threads": ("--threads", 1), "n": ("--n", 1), "batch_size": ("--batch-size", 1), "batch": ("--batch", 1),
    "repeats": ("--repeats", 0), "iters": ("--iters", 1), "warmup": ("--warmup", 0), "timing_iters": ("--timing-iters", 0),
    "layers": ("--layers", 1), "vision_layers": ("--vision-layers", 1), "n_text": ("--n-text", 0),
    "n_visual": ("--n-visual", 1), "example": ("--example", 0),
}


def _writable_target(path: str, flag: str, folder: bool = False) -> None:
    """``path`` can be written: an existing file / folder we may write, or a new one in a writable folder."""
    from .errors import InputError

    target = os.path.abspath(path)
    if os.path.exists(target):
        if folder != os.path.isdir(target):
            raise InputError(flag, f"{path!r} exists and is {'not ' if folder else ''}a folder")
        if not os.access(target, os.W_OK):
            raise InputError(flag, f"{path!r} is not writable")
        return
    parent = os.path.dirname(target)
    while folder and parent and not os.path.exists(parent):  # bench creates the missing folders
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise InputError(flag, f"cannot write {path!r}: {parent!r} is not a writable folder")


def check_args(args: argparse.Namespace) -> None:
    """Every option of the command, checked before a model (or data) is loaded; an ``InputError`` naming the flag."""
    from .errors import InputError

    for attr, (flag, low) in _AT_LEAST.items():
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise InputError(flag, f"must be an integer >= {low}, got {value}")
    if getattr(args, "example", None) is not None:
        from .eval.synthetic import SPLIT_SEED_SPAN

        if args.example >= SPLIT_SEED_SPAN:
            raise InputError("--example", f"must be below {SPLIT_SEED_SPAN} (the test split's size), got {args.example}")
    device = getattr(args, "device", None)
    if device is not None and device != "auto":
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise InputError("--device", f"{device!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise InputError("--device", f"{device!r} is not available here (torch.cuda.is_available() is "
                             f"{torch.cuda.is_available()})")
        if dev.type not in ("cpu", "cuda", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()):
            raise InputError("--device", f"{device!r} is not available here; allowed: auto, cpu, cuda, cuda:N, mps")
    dtype = getattr(args, "dtype", None)
    if dtype is not None:
        from .eval.profiler import DTYPES

        if dtype != "auto" and dtype not in DTYPES:
            raise InputError("--dtype", f"{dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    attn = getattr(args, "attn", None)
    if attn is not None:
        from .compat import attention_names

        allowed = attention_names()
        if attn not in allowed:
            raise InputError("--attn", f"{attn!r}; allowed: {', '.join(allowed)}")
    policies = getattr(args, "policy", None)
    if policies is not None and args.command in ("demo", "bench", "profile", "viz"):
        from . import Policy

        texts = policies if isinstance(policies, list) else [policies]
        if len(texts) > 1:  # several: every malformed one reported together (issue 16), still before any model
            from .eval.bench import parse_all

            parse_all(texts, "--policy")
        for text in texts:
            Policy.parse(text)
    if args.command == "bench":
        _writable_target(args.out, "--out", folder=True)
        parse_budgets(args.budgets)
        from .eval.bench_geometry import check_cli_args

        check_cli_args(args)
    if args.command == "viz":
        _writable_target(args.out, "--out")
        if args.image is not None and not os.path.isfile(args.image):
            raise InputError("--image", f"{args.image!r} is not a file")
        if args.model != "tiny" and not os.path.isdir(args.model):
            raise InputError("--model", f"{args.model!r} is neither 'tiny' nor a local checkpoint folder")
        if args.model == "tiny" and args.dtype not in ("auto", "fp32", "float32"):
            raise InputError("--dtype", f"{args.dtype!r}: the shipped tiny VLM runs in fp32; allowed with --model tiny: "
                             "auto, fp32 (other dtypes need --model PATH)")
    if args.command == "search":
        from .commands.run import check_search_args

        check_search_args(args)
    if args.command == "profile":
        from .eval.profiler import MODEL_CHOICES

        if args.json:
            _writable_target(args.json, "--json")
        if args.model not in MODEL_CHOICES and not os.path.isdir(args.model):
            raise InputError("--model", f"{args.model!r} is neither one of {', '.join(MODEL_CHOICES)} nor a local "
                             "checkpoint folder")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse usage errors: 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "no_progress", False):  # transformers' own bars too (weight loading), not only ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        check_args(args)
        return args.func(args)
    except VTPError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vlm-tokenprune methods | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: point it somewhere that takes it
        return 0
    finally:
        if getattr(args, "no_progress", False):
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
