"""``tests/llava_original/hf_reference.json`` is what the vision-site policies give on the HF LLaVA twin now.

The original LLaVA code base (transformers 4.36) and HF LLaVA (transformers 5.x) cannot load in one interpreter:
``tests/llava_original/test_llava_original_vision.py`` (llava venv) compares the original code base against
that file, and this test (main environment) recomputes it from the HF twin with the same weights, so a change
on either side fails one of them. Regenerate with ``python tests/llava_original/hf_twin.py``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava_original"))
import hf_twin  # noqa: E402

ATOL = 1e-4  # the oldest and newest transformers of the window may round differently


@pytest.fixture(scope="module")
def fresh():
    return hf_twin.hf_reference()


def test_reference_file_is_current(fresh):
    recorded = json.load(open(hf_twin.REFERENCE))
    assert sorted(recorded) == sorted(fresh), "cases changed: regenerate with python tests/llava_original/hf_twin.py"
    for key, want in recorded.items():
        got = fresh[key]
        assert got.get("kept_positions") == want.get("kept_positions"), key
        assert got.get("vision_tokens_per_layer") == want.get("vision_tokens_per_layer"), key
        assert got["generated"] == want["generated"], key
        for field in ("last_logits", "position_norms"):
            torch.testing.assert_close(torch.tensor(got[field]), torch.tensor(want[field]), atol=ATOL, rtol=0)


def test_every_vision_method_of_the_hf_llava_adapter_is_a_case():
    """The twin covers each vision-site criterion (a new one must be added to ``hf_twin.CASES``)."""
    from vlm_tokenprune.registry import CRITERIA
    from vlm_tokenprune.vision.base import VisionCriterion

    def is_vision(c) -> bool:
        return issubclass(c, VisionCriterion) if isinstance(c, type) else isinstance(c, VisionCriterion)

    vision = {n for n in CRITERIA.names() if is_vision(CRITERIA.get(n))}
    covered = {p.split(":")[0] for _, p in hf_twin.CASES}
    assert vision and vision <= covered, vision - covered


def test_the_cases_change_the_model(fresh):
    """Each policy acts (kept tokens and tokens differ from the plain twin): the equality is not vacuous."""
    for key, v in fresh.items():
        select, policy = key.split("|")
        if policy != "plain":
            plain = fresh[f"{select}|plain"]
            assert v["generated"] != plain["generated"] or v["last_logits"] != plain["last_logits"], key
            assert v["vision_tokens_per_layer"][-1] < hf_twin.PATCHES + 1, key
