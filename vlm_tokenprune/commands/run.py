"""The commands that run a model: ``demo`` (the shipped tiny VLM), ``bench``, ``search``, ``profile``, ``viz``, ``train``."""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from .text import table


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .. import Policy, patch
    from ..errors import InputError
    from ..eval import profiler
    from ..eval.bench import accuracy, evaluate_policy
    from ..eval.synthetic import make_split
    from ..eval.tiny_vlm import ASSET_DIR, load_tiny_vlm

    pol = Policy.parse(args.policy)  # a policy string or a YAML / JSON file
    if args.n < 1 or args.repeats < 0 or args.batch_size < 1:
        raise InputError("--n/--repeats/--batch-size", f"need n >= 1, repeats >= 0 (0: no timing), batch size >= 1; "
                         f"got {args.n}, {args.repeats}, {args.batch_size}")
    torch.set_num_threads(args.threads)
    model, processor = load_tiny_vlm()
    h = patch(model, pol)  # validate against the model before doing anything
    resolved = h.policy  # a preset's paper layers mapped to this model's depth (Policy.at_depth)
    h.unpatch()
    examples = make_split("test", args.n)
    base = evaluate_policy(model, processor, examples, None, batch_size=args.batch_size)
    pruned = evaluate_policy(model, processor, examples, pol, batch_size=args.batch_size)

    # measured LM prefill of the first question, interleaved with the unpatched model
    inputs = profiler.to_device(profiler.tiny_inputs(processor, 1), model)
    # vision-site policies time their LM prefill on their own tower's features (LMPrefillCall.prepare)
    if args.repeats:
        prefill = profiler.LMPrefillCall(model, inputs, profiler.encode_images(model, inputs))
        t = profiler.interleaved(model, pol, {"prefill": prefill}, iters=args.repeats, warmup=1, device=model.device)
        tb, tp = statistics.median(t["prefill"]["baseline"]), statistics.median(t["prefill"]["patched"])
        scoring_s = statistics.median(t["stage_seconds"])

    tc, vc = model.config.text_config, model.config.vision_config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo model: the shipped trained tiny LLaVA ({ASSET_DIR}), {n_params / 1e6:.2f} M parameters: "
          f"CLIP-style tower {vc.num_hidden_layers} x {vc.hidden_size} ({vc.image_size} px, patch {vc.patch_size} -> "
          f"{(vc.image_size // vc.patch_size) ** 2} visual tokens), Llama {tc.num_hidden_layers} x {tc.hidden_size}; "
          f"{args.threads} torch thread(s)")
    if resolved != pol:
        print(f"policy as written: {pol.to_string()}")
    print(f"policy: {resolved.to_string()}" + ("  (layers mapped to this model's depth)" if resolved != pol else ""))
    print()
    print(f"{len(examples)} questions from the synthetic test split (greedy answers):")
    rows = [[str(i), e["qtype"], e["question"], e["answer"], b, p]
            for i, (e, b, p) in enumerate(zip(examples, base["predictions"], pruned["predictions"]))]
    print(table(rows, ["#", "type", "question", "answer", "baseline", "pruned"]))
    acc_b, acc_p = accuracy(examples, base["predictions"]), accuracy(examples, pruned["predictions"])
    n_ok = lambda preds: sum(p == e["answer"] for p, e in zip(preds, examples))  # noqa: E731
    print(f"accuracy: baseline {acc_b['all']:.2f} ({n_ok(base['predictions'])}/{len(examples)}), "
          f"pruned {acc_p['all']:.2f} ({n_ok(pruned['predictions'])}/{len(examples)})")
    print()
    print("tokens per decoder layer (question 0; the mean over all questions in brackets):")
    print(table([[str(j), str(a), f"{b} ({m:.1f})"] for j, (a, b, m) in
                  enumerate(zip(base["tokens_per_example"][0], pruned["tokens_per_example"][0], pruned["tokens_per_layer"]))],
                 ["layer", "baseline", "pruned"]))
    print()
    print(f"theoretical prefill FLOPs ratio: {pruned['flops_ratio']:.3f} (eval/flops.py on each question's own "
          f"tokens per layer, summed over the {len(examples)} questions)")
    if not args.repeats:
        print("measured LM prefill latency: n/a (--repeats 0)")
        return 0
    print(f"measured LM prefill latency (question 0, image features precomputed): baseline {1e3 * tb:.2f} ms, "
          f"pruned {1e3 * tp:.2f} ms (median of {args.repeats}, interleaved); ratio {tp / tb:.3f}")
    print(f"scoring + selection: {1e3 * scoring_s:.2f} ms ({100 * scoring_s / tb:.1f} % of the baseline prefill)")
    print("  (a model this small is dominated by per-call overhead; `vlm-tokenprune profile` and "
          "benchmarks/prefill.py time larger geometries)")
    return 0


# -- bench / profile / viz -------------------------------------------------------------------------
def parse_budgets(text: str | None) -> list[float] | None:
    from ..errors import InputError

    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError("--budgets", f"{text!r}; expected keep fractions joined with commas, e.g. 0.5,0.25,0.11") from None


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..eval import profiler
    from ..eval.bench import markdown_table, run_bench, write_outputs

    torch.set_num_threads(args.threads)
    if args.model in profiler.KNOWN_GEOMETRIES:  # random weights: tokens, FLOPs, timing; accuracy n/a
        from ..eval.bench_geometry import cmd_bench_geometry

        return cmd_bench_geometry(args, parse_budgets(args.budgets))
    model_path = None if args.model == "tiny" else args.model
    result = run_bench(args.policy, parse_budgets(args.budgets), n=args.n, batch_size=args.batch_size, model_path=model_path,
                       timing_iters=args.timing_iters, backend=args.backend, progress=not args.no_progress)
    paths = write_outputs(result, args.out)
    print(markdown_table(result))
    print()
    print("wrote " + ", ".join(paths.values()))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """EvoPress search (arXiv 2410.14649) for the best policy under a FLOPs budget (``vlm_tokenprune.search``)."""
    import torch

    from ..eval.tiny_vlm import load_tiny_vlm
    from ..search.api import search_policy

    torch.set_num_threads(args.threads)
    if args.model == "tiny" or folder_speaks_synthetic(args.model):  # the shipped tiny VLM's format: as before
        model, processor = load_tiny_vlm(path=None if args.model == "tiny" else args.model)
    else:  # any supported HF VLM folder (AutoModelForImageTextToText + AutoProcessor), on --device in --dtype
        from ..eval.loading import load_vlm

        model, processor = load_vlm(args.model, dtype=args.dtype, device=args.device)
    if args.per_sample:
        return _per_sample(args, model, processor)
    res = search_policy(
        model, processor, args.budget, space=args.space, calibration=args.calibration, batch_size=args.batch_size,
        generations=args.generations, offspring=args.offspring, seed=args.seed, criterion=args.criterion,
        entry=None if args.entry == "none" else args.entry, levels=args.levels, sublayers=args.sublayers, heads=args.heads,
        heldout=args.heldout, heldout_top=args.heldout_top, out=args.out, resume=args.resume, progress=not args.no_progress,
        criteria=tuple(c.strip() for c in args.criteria.split(",") if c.strip()), trade=args.trade,
        seed_presets=not args.no_seeds, latency_iters=args.latency_iters, calibration_data=args.calibration_data,
        heldout_data=args.heldout_data, answer_tokens=args.answer_tokens,
    )
    acc = "-" if res.accuracy is None else f"{res.accuracy:.3f}"
    print(f"best policy: {res.policy or '(none: the unpruned model)'}")
    lat = "" if res.latency_ratio is None else f", measured prefill latency ratio {res.latency_ratio:.3f}"
    print(f"predicted FLOPs ratio {res.flops_ratio:.3f}{lat}, KL {res.fitness:.5f}, held-out accuracy {acc}")
    print("wrote " + ", ".join(res.files.values()))
    return 0


def folder_speaks_synthetic(path: str) -> bool:
    """Whether the checkpoint folder's tokenizer is the shipped tiny VLM's (``search.data.speaks_synthetic``); the
    tokenizer alone is loaded, not the model."""
    from types import SimpleNamespace

    from ..search.data import speaks_synthetic

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return speaks_synthetic(SimpleNamespace(tokenizer=tok))


def check_search_args(args: argparse.Namespace) -> None:
    """``search``'s options, its data files included, checked before any model is loaded (``InputError`` naming the flag)."""
    from ..errors import InputError
    from ..search.api import check_counts
    from ..search.records import check_disjoint, read_records

    counts = ("generations", "offspring", "calibration", "levels", "sublayers", "heads", "heldout", "heldout_top",
              "answer_tokens", "latency_iters", "samples", "simulations", "trade", "length_penalty")
    check_counts(lambda name: "--" + name.replace("_", "-"), **{name: getattr(args, name) for name in counts})
    if args.model != "tiny" and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise InputError("--model", f"{args.model!r} is neither 'tiny' nor a local checkpoint folder (with config.json)")
    if args.per_sample and (args.calibration_data or args.heldout_data):
        raise InputError("--per-sample", "runs on the synthetic test split; it takes no --calibration-data / --heldout-data")
    cal = read_records(args.calibration_data, "--calibration-data") if args.calibration_data else None
    held = read_records(args.heldout_data, "--heldout-data", require_answer=True) if args.heldout_data else None
    if cal is not None and held is not None:
        check_disjoint(cal, held, ("--calibration-data", "--heldout-data"))
    synthetic = args.model == "tiny" or folder_speaks_synthetic(args.model)
    if not synthetic:
        if cal is None and not args.per_sample:
            raise InputError("--calibration-data", f"{args.model!r} does not use the shipped tiny VLM's tokenizer, so the "
                             "synthetic calibration split means nothing to it; give --calibration-data FILE.jsonl (one "
                             '{"image", "prompt", "answer"} record per line)')
        if held is None and args.heldout > 0 and not args.per_sample:
            raise InputError("--heldout-data", f"{args.model!r} does not use the shipped tiny VLM's tokenizer, so the "
                             "synthetic held-out split means nothing to it; give --heldout-data FILE.jsonl (records with "
                             "answers) or --heldout 0")
        if args.per_sample:
            raise InputError("--per-sample", "runs on the synthetic test split: the shipped tiny VLM's format only")
    elif args.dtype not in ("auto", "fp32", "float32") or args.device not in ("auto", "cpu"):
        raise InputError("--dtype/--device", f"{args.dtype!r} / {args.device!r}: a model in the shipped tiny VLM's format "
                         "runs in fp32 on the CPU; allowed with it: auto, fp32 / auto, cpu")


def _per_sample(args: argparse.Namespace, model: Any, processor: Any) -> int:
    """CoLa (arXiv 2507.07996): the best layer chain per held-out example by MCTS (analysis only)."""
    import json
    import os

    from ..eval.synthetic import make_split
    from ..search.cola import per_sample
    from ..search.data import processor_image_size

    rows = per_sample(model, processor, make_split("test", args.samples, image_size=processor_image_size(processor)),
                      simulations=args.simulations, length_penalty=args.length_penalty, seed=args.seed,
                      progress=not args.no_progress)
    print(table([[r["qtype"], r["answer"], f"{r['full_probability']:.3f}", "-".join(map(str, r["chain"])),
                   f"{r['chain_probability']:.3f}", str(len(r["chain"]))] for r in rows],
                 ["question", "answer", "p(answer) full", "best chain", "p(answer) chain", "layers run"]))
    print("analysis only: each chain is found with the answer in hand; serving per-sample chains needs a predictor "
          "of the chain from the input, which CoLa (arXiv 2507.07996) does not give")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "per_sample.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"simulations": args.simulations, "length_penalty": args.length_penalty, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from ..eval import profiler

    torch.set_num_threads(args.threads)
    report = profiler.profile(
        args.model, args.policy or ["fastv:layer=2,keep=0.25"], iters=args.iters, warmup=args.warmup, layers=args.layers,
        vision_layers=args.vision_layers, dtype=args.dtype, attn_implementation=args.attn, device=args.device,
        batch=args.batch, n_text=args.n_text, seed=args.seed, backend=args.backend, ttft=not args.no_ttft,
        parts=not args.no_parts, json_path=args.json,
    )
    print(profiler.format_report(report))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    import torch

    from ..errors import InputError
    from ..eval import profiler
    from ..eval.visualize import kept_tokens_figure

    torch.set_num_threads(args.threads)
    if (args.image is None) != (args.question is None):
        raise InputError("--image/--question", "give both, or neither (then a synthetic test-split question is used)")
    if args.image is None:
        from ..eval.synthetic import QTYPES, make_example, split_seeds

        ex = make_example(split_seeds("test", args.example + 1)[args.example], QTYPES[args.example % len(QTYPES)])
        image, question = ex["image"], ex["question"]
        print(f"synthetic test example {args.example}: {question!r} (answer {ex['answer']!r})")
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.image).convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise InputError("--image", f"cannot read {args.image}: {e}") from None
        question = args.question
    if args.model == "tiny":
        from ..eval.tiny_vlm import load_tiny_vlm

        model, processor = load_tiny_vlm()
    else:
        if not os.path.isdir(args.model):
            raise InputError("--model", f"{args.model!r} is neither 'tiny' nor a local checkpoint folder")
        model, processor = profiler.load_vlm(args.model, dtype=args.dtype)
    fig = kept_tokens_figure(model, processor, image=image, question=question, policy=args.policy, out=args.out)
    print(f"wrote {args.out} ({fig.size[0]}x{fig.size[1]} px)")
    return 0


def trainers() -> list[str]:
    """Names of the trainer modules in ``vlm_tokenprune.train`` (each has ``main(argv)``)."""
    import pkgutil

    from .. import train

    return sorted(m.name for m in pkgutil.iter_modules(train.__path__) if m.name != "common" and not m.name.startswith("_"))


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    from ..errors import InputError

    names = trainers()
    if args.name not in names:
        raise InputError("train", f"unknown trainer {args.name!r}; allowed: {', '.join(names)}")
    return importlib.import_module(f"vlm_tokenprune.train.{args.name}").main(list(args.args))
