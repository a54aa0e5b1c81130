"""Vision-site stages under ``generate(num_beams > 1)`` and ``num_return_sequences > 1``.

Transformers 5.x encodes the images once, then ``generate()`` repeats every prompt row ``k`` times (and the encoded
images group by group) before the first forward, so the language model sees ``k`` copies of each row for one tower
run. Each copy must be reduced exactly as its row alone: the first step's logits of every copy == the patched
model's own prefill of the unexpanded batch (the oracle: one tower run per image, no expansion), and each
returned beam's score == the patched prefill + cached decode of that sequence (LLaVA). The expanded rows keep what
their row keeps (the trace). Families: LLaVA-1.5 (FlowCut, VisionZip, MCTF), LLaVA-OneVision, InternVL, Gemma 3,
Qwen3-VL (VisPruner; OneVision, InternVL, Gemma 3, Qwen3-VL: whole groups / windows, several images per row),
Qwen2-VL (FlowCut's official Qwen stage, patches pruned inside the packed tower), Qwen2.5-VL (VisPruner, window order).
"""
from __future__ import annotations

import pytest
import torch

import vlm_tokenprune as vtp
from kit import tiny_llava
from vlm_tokenprune.eval.tiny_families import build_tiny_internvl, build_tiny_onevision, make_internvl_batch
from vlm_tokenprune.eval.tiny_families import make_onevision_batch
from vlm_tokenprune.eval.tiny_gemma3 import build_tiny_gemma3, make_gemma3_batch
from vlm_tokenprune.eval.tiny_models import make_batch

torch.set_num_threads(1)


# transformers whose forward takes ``mm_encoder_outputs`` encode the images once and repeat them ROW by row; older
# 5.x repeat ``pixel_values`` IMAGE by image, which gives a row with two images the wrong images in its copies (the
# unpatched model too), so there every row holds one image
import inspect  # noqa: E402

from transformers import LlavaForConditionalGeneration  # noqa: E402

MULTI = "mm_encoder_outputs" in inspect.signature(LlavaForConditionalGeneration.forward).parameters


def _llava():
    model = tiny_llava("sdpa", vision_layers=6, tweaks=("peaked_tower",))
    return model, make_batch(model, [[5, "img", 7], [2, "img", 3, "img", 4] if MULTI else [2, "img", 4]])


def _onevision():
    model = build_tiny_onevision("sdpa")
    return model, make_onevision_batch(model, [[3, "img", 6], [2, "img", 4]], image_sizes=[[20, 36], [36, 20]])


def _internvl():
    model = build_tiny_internvl("sdpa")
    if MULTI:
        return model, make_internvl_batch(model, [[3, "img", 2, "img", 4], [2, "img", 5]], tiles=[3, 1, 2])
    return model, make_internvl_batch(model, [[3, "img", 4], [2, "img", 5]], tiles=[1, 1])  # tiles repeat one by one too


def _gemma3():
    model = build_tiny_gemma3("sdpa")
    return model, make_gemma3_batch(model, [[3, "img", 2, "img", 6] if MULTI else [3, "img", 6], [2, "img", 5]])


def _qwen3_vl():
    from test_qwen3_vl import tiny

    from vlm_tokenprune.eval.tiny_models import make_qwen_batch

    model = tiny("sdpa")
    if MULTI:
        return model, make_qwen_batch(model, [[3, "img", 2, "img", 4], [2, "img", 3]], image_grids=[(3, 4), (2, 3), (4, 2)])
    return model, make_qwen_batch(model, [[3, "img", 4], [2, "img", 3]], image_grids=[(3, 4), (4, 2)])


def _qwen2_vl():
    from test_qwen2_vl_vision_site import tiny

    from vlm_tokenprune.eval.tiny_models import make_qwen_batch

    model = tiny("sdpa")
    if MULTI:
        return model, make_qwen_batch(model, [[3, "img", 2, "img", 4], [2, "img", 3]], image_grids=[(3, 4), (2, 3), (4, 2)])
    return model, make_qwen_batch(model, [[3, "img", 4], [2, "img", 3]], image_grids=[(3, 4), (4, 2)])


def _qwen2_5_vl():
    from test_qwen2_5_vl_vision_site import tiny

    from vlm_tokenprune.eval.tiny_models import make_qwen_batch

    model = tiny("sdpa")
    if MULTI:
        return model, make_qwen_batch(model, [[3, "img", 2, "img", 4], [2, "img", 3]], image_grids=[(3, 4), (2, 3), (4, 2)])
    return model, make_qwen_batch(model, [[3, "img", 4], [2, "img", 3]], image_grids=[(3, 4), (4, 2)])


CASES = {  # name: (model and batch, vision-site policy)
    "llava-flowcut_vit": (_llava, "flowcut_vit:tokens=8"),
    "llava-visionzip": (_llava, "visionzip:tokens=8,positions=repack"),
    "llava-mctf": (_llava, "mctf:layer=1,tokens=8"),
    "onevision-vispruner": (_onevision, "vispruner:tokens=3,positions=gaps"),
    "internvl-vispruner": (_internvl, "vispruner:tokens=2,positions=repack"),
    "gemma3-vispruner": (_gemma3, "vispruner:tokens=2,positions=gaps"),
    "qwen3_vl-vispruner": (_qwen3_vl, "vispruner:tokens=3,positions=gaps"),
    "qwen2_vl-flowcut_vit": (_qwen2_vl, "flowcut_vit:tokens=3,positions=gaps"),
    "qwen2_5_vl-vispruner": (_qwen2_5_vl, "vispruner:tokens=3,positions=gaps"),
}
EXPAND = [{"num_beams": 3, "num_return_sequences": 3, "do_sample": False}, {"num_return_sequences": 2, "do_sample": True}]


@pytest.mark.parametrize("expand", EXPAND, ids=["beams", "sampled_sequences"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_copy_of_a_row_is_reduced_as_the_row_alone(case, expand):
    build, policy = CASES[case]
    model, inputs = build()
    k = expand["num_return_sequences"]
    torch.manual_seed(0)
    with vtp.patch(model, policy) as h, torch.no_grad():
        want = model(**inputs).logits[:, -1].float()
        kept = h.last_trace().stages[0].visual_after
        out = model.generate(**inputs, max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **expand)
        got = h.last_trace("prefill").stages[0].visual_after
    assert kept != [int(n) for n in (inputs["input_ids"] == model.config.image_token_id).sum(1)]  # the stage reduced
    assert got == [n for n in kept for _ in range(k)]
    assert out.sequences.shape[0] == k * inputs["input_ids"].shape[0]
    torch.testing.assert_close(out.logits[0].float(), want.repeat_interleave(k, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llava-flowcut_vit", "llava-mctf"])
def test_beam_scores_equal_the_patched_prefill_and_cached_decode_of_each_sequence(case):
    """A returned beam's score (length_penalty 0: its summed log-probability) == the patched model's own prefill of
    the row (one tower run, no expansion) + cached teacher-forced decode of that sequence."""
    from test_reliability_serving import assert_beam_scores_are_sequence_logprobs

    model, _ = CASES[case][0]()
    for b, spec in enumerate([[5, "img", 7], [2, "img", 3, "img", 4] if MULTI else [2, "img", 4]]):
        assert_beam_scores_are_sequence_logprobs(model, make_batch(model, [spec], seed=b), CASES[case][1])
