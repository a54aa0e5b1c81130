"""Files shipped inside the package (``vlm_tokenprune/assets/``): the trained tiny VLM and the learned
selectors / calibration files made on it. The one place that knows where they live."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_VLM = ASSETS / "tiny_vlm"  # config, weights, tokenizer / processor, and the files trained on this model


def tiny_vlm_file(name: str) -> Path:
    """``vlm_tokenprune/assets/tiny_vlm/<name>`` (e.g. ``"atp.safetensors"``, ``"yopo_heads.json"``)."""
    return TINY_VLM / name
