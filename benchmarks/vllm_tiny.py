"""The shipped tiny VLM answering the offline test split in vLLM (the vlm_tokenprune plugin) and in transformers
(``vlm-tokenprune bench``'s own evaluation, ``eval.bench.evaluate_policy``) under the same policies.

Run in the vLLM virtual environment (.ci/run ``vllm_env``), e.g.::

    LD_PRELOAD=$V/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1 \
        $V/bin/python benchmarks/vllm_tiny.py --n 300 --out table.md   # recorded: benchmarks/results/vllm_tiny.md

Per policy: one vLLM engine (policy from ``hf_overrides``), greedy 4 tokens like ``bench``; accuracy of both,
how many predictions agree, and the mean prompt length vLLM saw (the kept placeholders). The checkpoint is
copied to a temporary folder with its CLIP keys renamed for vLLM's loader (``vision_tower.vision_model.*``).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

POLICIES = ["divprune", "aim_merge", "uniform:site=pre_llm,keep=0.25,positions=repack"]


def vllm_copy(dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from vlm_tokenprune.eval.tiny_vlm import ASSET_DIR

    dst.mkdir(parents=True, exist_ok=True)
    for f in ASSET_DIR.iterdir():
        if f.suffix in (".json",) and f.name != "yopo_heads.json":
            shutil.copy(f, dst / f.name)
    sd = load_file(ASSET_DIR / "model.safetensors")
    out = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.")
            and not k.startswith("vision_tower.vision_model.") else k): v for k, v in sd.items()}
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def vllm_answers(path: Path, policy: str | None, examples: list[dict]) -> tuple[list[str], float, float]:
    from vllm import LLM, SamplingParams

    from vlm_tokenprune.eval.tiny_vlm import EOS_ID, prompts

    t0 = time.perf_counter()
    kw = {"hf_overrides": {"vtp_policy": policy}} if policy else {}
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, seed=0, **kw)
    start = time.perf_counter() - t0
    reqs = [{"prompt": p, "multi_modal_data": {"image": e["image"]}}
            for p, e in zip(prompts([e["question"] for e in examples]), examples)]
    sp = SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=[EOS_ID], skip_special_tokens=True)
    outs = llm.generate(reqs, sp, use_tqdm=False)
    preds = [o.outputs[0].text.strip() for o in outs]
    mean_len = sum(len(o.prompt_token_ids) for o in outs) / len(outs)
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    return preds, mean_len, start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--policy", action="append", help="policies (default: %s)" % ", ".join(POLICIES))
    ap.add_argument("--out", default=None, help="markdown file to write")
    args = ap.parse_args()
    import torch

    from vlm_tokenprune.eval.bench import accuracy, evaluate_policy
    from vlm_tokenprune.eval.synthetic import make_split
    from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm

    torch.set_num_threads(1)
    examples = make_split("test", args.n)
    model, processor = load_tiny_vlm()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = vllm_copy(Path(tmp) / "tiny_vlm")
        for pol in args.policy or POLICIES:
            hf = evaluate_policy(model, processor, examples, pol)
            hf_acc = accuracy(examples, hf["predictions"])["all"]
            hf_len = sum(t[0] for t in hf["tokens_per_example"]) / len(examples)
            preds, mean_len, start = vllm_answers(path, pol, examples)
            v_acc = accuracy(examples, preds)["all"]
            agree = sum(a == b for a, b in zip(preds, hf["predictions"]))
            rows.append((pol, hf_acc, v_acc, agree, hf_len, mean_len, start))
            print(rows[-1], flush=True)
    lines = ["| policy | bench accuracy (transformers + patch()) | vLLM accuracy | same answer | prompt tokens "
             "HF / vLLM | engine start s |", "|---|---|---|---|---|---|"]
    lines += [f"| `{p}` | {a:.3f} | {b:.3f} | {g}/{args.n} | {hl:.1f} / {vl:.1f} | {s:.0f} |"
              for p, a, b, g, hl, vl, s in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
