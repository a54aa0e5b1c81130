"""Weight files of learned selectors: one safetensors file, bound to the base model's geometry.

The file holds the module's tensors; its safetensors metadata holds ``format``, ``kind``
(``"atp"``, ``"covipal"``), the module's hyper-parameters (``hparams``, JSON), the base model's
geometry (``config``, JSON) and its hash. A policy points to the file
(``covipal:weights=path.safetensors``); loading it on another model is an
``IncompatiblePolicyError`` naming the differing config field.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
from torch import nn

from ..structural.calibration import config_hash, model_geometry
from ..errors import IncompatiblePolicyError, PolicyError

FORMAT = "vlm_tokenprune.learned/1"
# the way out of a weight file bound to another model: train one for this model (every kind has a trainer)
HOW_TO_TRAIN = {
    "atp": "allowed: weights trained for this model: `vlm-tokenprune train atp --model MODEL_DIR --out FILE` (a LLaVA "
           "folder with its processor), or in Python vlm_tokenprune.train.atp.train_atp(model, batches, ATPTrainConfig(...), out=FILE) for "
           "any supported HF VLM; then atp:weights=FILE",
    "covipal": "allowed: weights trained for this model: `vlm-tokenprune train covipal --model CHECKPOINT --out FILE` "
               "(tiny-VLM format), or in Python vlm_tokenprune.train.covipal.train(model, batches, out=FILE, "
               "config=CoViPALTrainConfig(...)) for any supported HF VLM; then covipal:weights=FILE",
    "*": "allowed: weights trained for this model (`vlm-tokenprune train {kind} --help`)",
}
_VISION = ("image_size", "patch_size", "hidden_size")


def base_geometry(model: nn.Module) -> dict:
    """Text-model geometry plus the vision tower's input geometry (a retrained tower with another grid differs)."""
    geo = {f"text_config.{k}": v for k, v in model_geometry(model).items()}
    vcfg = getattr(model.config, "vision_config", None)
    for k in _VISION:
        geo[f"vision_config.{k}"] = getattr(vcfg, k, None) if vcfg is not None else None
    return geo


def save_weights(path: str, kind: str, tensors: Mapping[str, torch.Tensor], hparams: Mapping[str, Any],
                 model: nn.Module) -> str:
    """Write ``tensors`` (a module's state dict) with ``hparams`` and ``model``'s geometry to ``path``."""
    from safetensors.torch import save_file

    geo = base_geometry(model)
    meta = {"format": FORMAT, "kind": kind, "hparams": json.dumps(dict(hparams), sort_keys=True),
            "config": json.dumps(geo, sort_keys=True), "config_hash": config_hash(geo)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path, metadata=meta)
    return path


def load_weights(path: str, kind: str, model: nn.Module | None, where: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weight file written by :func:`save_weights`; check it holds ``kind`` and belongs to ``model``.

    ``model=None`` skips the geometry check (reading a file to inspect it).
    """
    from safetensors import safe_open

    if not isinstance(path, str) or not os.path.isfile(path):
        raise PolicyError(where, f"{path!r} is not a file (train one with `vlm-tokenprune train {kind}`)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise PolicyError(where, f"cannot read {path!r} as safetensors: {e}") from None
    if meta.get("format") != FORMAT:
        raise PolicyError(where, f"{path!r} is not a {FORMAT} file")
    try:
        hparams = json.loads(meta.get("hparams") or "{}")
        json.loads(meta.get("config") or "{}")
    except ValueError as e:
        raise PolicyError(where, f"{path!r} has malformed metadata ({e})") from None
    if not isinstance(hparams, dict):
        raise PolicyError(where, f"{path!r} has malformed metadata (hparams is not an object)")
    if meta.get("kind") != kind:
        raise IncompatiblePolicyError(f"{where}.kind", f"{path!r} holds {meta.get('kind')!r} weights; this criterion needs {kind!r}")
    if model is not None:
        geo = base_geometry(model)
        if meta.get("config_hash") != config_hash(geo):
            theirs = json.loads(meta.get("config") or "{}")
            diff = [k for k in geo if theirs.get(k) != geo.get(k)]
            detail = ", ".join(f"{k}: {theirs.get(k)!r} in the file, {geo.get(k)!r} in the model" for k in diff)
            raise IncompatiblePolicyError(
                f"{where}.config_hash",
                f"{path!r} was trained on another model (config_hash {meta.get('config_hash')} != {config_hash(geo)}"
                + (f"; {detail}" if detail else "") + "); " + HOW_TO_TRAIN.get(kind, HOW_TO_TRAIN["*"]).format(kind=kind),
            )
    return tensors, hparams
