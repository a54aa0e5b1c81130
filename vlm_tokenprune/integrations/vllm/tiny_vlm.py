"""The shipped tiny VLM as a folder vLLM loads: ``python -m vlm_tokenprune.integrations.vllm.tiny_vlm DST``.

Two differences from ``vlm_tokenprune/assets/tiny_vlm`` (the weights and answers are the same):

- the CLIP tower's keys: transformers 5.x writes ``vision_tower.*``, vLLM's CLIP loader wants the hub layout
  ``vision_tower.vision_model.*`` (which transformers also loads);
- a chat template (``chat_template.jinja``) that renders one user turn as the model's training prompt,
  ``<s>USER: <image>\\n{question} ASSISTANT:``: vLLM's ``LLM.chat`` (what lmms-eval's ``vllm`` model calls)
  needs one, and puts the image placeholder before the text of a message whose content is a string.

Imports no vLLM.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}USER: {{ message['content'] }} ASSISTANT:{% endfor %}"
FILES = ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


def export_tiny_vlm(dst: "str | Path") -> Path:
    """Write the vLLM-loadable copy of the shipped tiny VLM to ``dst`` (created; files there are overwritten)."""
    from safetensors.torch import load_file, save_file

    from ...assets import TINY_VLM

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(TINY_VLM / name, dst / name)
    sd = load_file(TINY_VLM / "model.safetensors")
    prefix, hub = "vision_tower.", "vision_tower.vision_model."
    renamed = {(hub + k[len(prefix):] if k.startswith(prefix) and not k.startswith(hub) else k): v for k, v in sd.items()}
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vlm_tokenprune.integrations.vllm.tiny_vlm DST_FOLDER")
    print(export_tiny_vlm(sys.argv[1]))
