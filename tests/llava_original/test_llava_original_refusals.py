"""The original LLaVA adapter without the ``llava`` package: registered, imports nothing from ``llava``, refuses
anything that is not the original ``LlavaLlamaForCausalLM`` before a hook exists (runs in every environment)."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune.errors import UnsupportedModelError
from vlm_tokenprune.registry import ADAPTERS


def test_registered_without_importing_llava():
    assert "llava_llama" in ADAPTERS.names()
    code = "import sys, vlm_tokenprune; assert 'llava' not in sys.modules, 'vlm_tokenprune imported llava'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)  # a fresh interpreter: nothing imported yet


def test_a_model_typed_llava_llama_that_is_not_the_original_class_is_refused():
    fake = torch.nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type="llava_llama")
    with pytest.raises(UnsupportedModelError) as e:
        vtp.patch(fake, "fastv")
    assert e.value.field == "model" and "prepare_inputs_labels_for_multimodal" in str(e.value)
    assert not fake._forward_pre_hooks and not fake._forward_hooks
