"""Where the vLLM plugin's policy comes from: one policy per engine, as vLLM users configure an engine.

- ``hf_overrides={"vtp_policy": "uniform:site=pre_llm,keep=0.25,positions=repack"}`` (``LLM(...)``) or
  ``--hf-overrides '{"vtp_policy": "..."}'`` (``vllm serve``): vLLM writes it onto the model's HF config, so
  every process of the engine (API server, engine core, workers) reads the same value, and it is part of
  the model config an engine is built from. A policy dict / file is given as its JSON string or file path
  (vLLM treats a dict value in ``hf_overrides`` as a nested config override).
- ``VTP_POLICY`` environment variable (a policy string or a policy file path), inherited by vLLM's
  processes: for launch scripts that cannot change the engine arguments.

Both set and different: an error naming both. Neither: the plugin stays inactive and the models run
exactly as stock vLLM's. Per-request policies (``mm_processor_kwargs``) are NOT supported: the policy
fixes each image's placeholder count in the processor and the reduction in the model, which vLLM 0.32
wires per engine; a request carrying ``vtp_policy`` in ``mm_processor_kwargs`` is refused by name.
"""
from __future__ import annotations

import os
from typing import Any

from ...errors import PolicyError

ENV_VAR = "VTP_POLICY"
HF_KEY = "vtp_policy"


def policy_spec(hf_config: Any | None = None) -> tuple[str | None, str]:
    """``(policy string or path, where it came from)``; ``(None, "")`` when no policy is set."""
    env = os.environ.get(ENV_VAR, "").strip() or None
    hf = getattr(hf_config, HF_KEY, None) if hf_config is not None else None
    if hf is not None and not isinstance(hf, str):
        raise PolicyError(f"hf_overrides.{HF_KEY}", f"must be a policy string, a JSON string or a policy file path, "
                          f"got {type(hf).__name__}")
    hf = (hf or "").strip() or None
    if env and hf and env != hf:
        raise PolicyError(f"hf_overrides.{HF_KEY}", f"{hf!r} differs from the environment's {ENV_VAR}={env!r}; "
                          "allowed: set one of them (or the same policy in both)")
    if hf:
        return hf, f"hf_overrides[{HF_KEY!r}]"
    if env:
        return env, f"${ENV_VAR}"
    return None, ""


def parse_spec(spec: str) -> Any:
    """A policy string, a JSON object string or a policy file path -> what ``Policy.parse`` takes."""
    s = spec.strip()
    if s.startswith("{"):
        import json

        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise PolicyError(HF_KEY, f"not valid JSON: {e}") from None
    return s


def refuse_request_policy(mm_kwargs: Any) -> None:
    """A request's ``mm_processor_kwargs`` naming a policy: refused (the policy is per engine)."""
    if mm_kwargs and HF_KEY in mm_kwargs:
        raise PolicyError(f"mm_processor_kwargs.{HF_KEY}", "per-request policies are not supported by the vLLM plugin "
                          f"(the policy fixes placeholder counts per engine); allowed: hf_overrides={{'{HF_KEY}': ...}} "
                          f"or ${ENV_VAR} when the engine starts")
