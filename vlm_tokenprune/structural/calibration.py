"""Calibration files: the JSON artifacts ``vlm_tokenprune.calibrate`` writes and structural policies read.

The artifact carries the text model's geometry and its hash (``model_geometry`` / ``config_hash``);
``load_artifact`` checks it against the model being patched (and its data past the header) before
any hook exists; ``select_layers`` / ``select_heads`` / ``select_sublayers`` turn it into the
concrete layers, heads or sublayers a policy removes (EfficientVLA arXiv 2506.10100, YOPO
arXiv 2410.06169, FinerCut arXiv 2405.18218).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import torch
from torch import nn

from ..errors import IncompatiblePolicyError, PolicyError

FORMAT = "vlm_tokenprune.calibration/1"
WHAT = ("heads", "layers", "sublayers")
GEOMETRY = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")


def model_geometry(model: nn.Module) -> dict:
    """The text model's shape fields the artifact is bound to."""
    cfg = getattr(model.config, "text_config", None) or model.config
    out = {k: getattr(cfg, k, None) for k in GEOMETRY}
    if out["head_dim"] is None and out["hidden_size"] and out["num_attention_heads"]:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out


def config_hash(geometry: Mapping) -> str:
    return hashlib.sha256(json.dumps(dict(geometry), sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def select_sublayers(art: dict, count: int, num_layers: int, where: str = "stages[0]") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The first ``count`` sublayers of a ``what="sublayers"`` artifact's greedy order: ``(attn layers, ffn layers)``."""
    order = art.get("order")
    ok = isinstance(order, list) and all(
        isinstance(p, list) and len(p) == 2 and p[0] in ("attn", "ffn") and isinstance(p[1], int)
        and not isinstance(p[1], bool) and 0 <= p[1] < num_layers for p in order)
    if not ok or len({(p[0], p[1]) for p in order}) != len(order):
        raise PolicyError(f"{where}.calibration.order", f"holds no usable sublayer order (a list of distinct ['attn' | 'ffn', "
                          f"layer < {num_layers}] pairs); make it again with vlm_tokenprune.calibrate(model, batches, "
                          "what='sublayers', path=PATH)")
    if count > len(order):
        raise IncompatiblePolicyError(f"{where}.removed", f"would remove {count} sublayers; the calibration file ranks "
                                      f"{len(order)} (calibrate with a larger count)")
    attn = sorted(layer for kind, layer in order[:count] if kind == "attn")
    ffn = sorted(layer for kind, layer in order[:count] if kind == "ffn")
    return tuple(attn), tuple(ffn)


def load_artifact(path: str, model: nn.Module, what: str, where: str) -> dict:
    """Read a calibration file and check it belongs to ``model`` and holds ``what``."""
    if not os.path.isfile(path):
        raise PolicyError(where, f"{path!r} is not a file (write one with vlm_tokenprune.calibrate(..., path=...))")
    try:
        with open(path, encoding="utf-8") as f:
            art = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise PolicyError(where, f"cannot read {path!r} as a UTF-8 JSON calibration file: {e}") from None
    if not isinstance(art, dict) or art.get("format") != FORMAT:
        raise PolicyError(where, f"{path!r} is not a {FORMAT} file")
    if art.get("what") != what:
        raise IncompatiblePolicyError(f"{where}.what", f"{path!r} holds {art.get('what')!r} calibration; this op needs {what!r}")
    geo = model_geometry(model)
    if art.get("config_hash") != config_hash(geo):
        theirs = art.get("config") or {}
        diff = [k for k in GEOMETRY if theirs.get(k) != geo.get(k)]
        detail = ", ".join(f"text_config.{k}: {theirs.get(k)!r} in the file, {geo.get(k)!r} in the model" for k in diff)
        raise IncompatiblePolicyError(
            f"{where}.config_hash",
            f"{path!r} was calibrated on another model (config_hash {art.get('config_hash')} != {config_hash(geo)}"
            + (f"; {detail}" if detail else "") + f"); make one for this model with vlm_tokenprune.calibrate(model, batches, "
            f"what={what!r}, path=PATH) and pass calibration=PATH",
        )
    _check_contents(art, geo, path, what, where)
    return art


def _check_contents(art: dict, geo: Mapping, path: str, what: str, where: str) -> None:
    """The data behind a valid header: ``importance`` [layers] / ``ratios`` [samples][layers][heads] of numbers,
    exactly one entry per layer (and head) of the model, else a ``PolicyError`` naming the file."""
    layers, heads = geo.get("num_hidden_layers"), geo.get("num_attention_heads")
    if what == "sublayers":  # FinerCut: the greedy removal order, [["attn" | "ffn", layer], ...]
        order = art.get("order")
        ok = isinstance(order, list) and all(
            isinstance(p, list) and len(p) == 2 and p[0] in ("attn", "ffn") and isinstance(p[1], int)
            and not isinstance(p[1], bool) and 0 <= p[1] < layers for p in order)
        if not ok or len({(p[0], p[1]) for p in order}) != len(order):
            raise PolicyError(f"{where}.order", f"{path!r} holds no usable sublayer order (a list of distinct "
                              f"['attn' | 'ffn', layer < {layers}] pairs); make it again with vlm_tokenprune.calibrate("
                              "model, batches, what='sublayers', path=PATH)")
        return
    key, shape = ("importance", (layers,)) if what == "layers" else ("ratios", (None, layers, heads))
    try:
        t = torch.tensor(art[key], dtype=torch.float64)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise PolicyError(f"{where}.{key}", f"{path!r} has a valid header but no usable {key!r} ({type(e).__name__}: {e}); "
                          f"make it again with vlm_tokenprune.calibrate(model, batches, what={what!r}, path=PATH)") from None
    want = "x".join("S" if s is None else str(s) for s in shape)
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)) or t.numel() == 0:
        raise PolicyError(f"{where}.{key}", f"{path!r} holds {key} of shape {'x'.join(map(str, t.shape))}; this model needs "
                          f"{want} (one entry per layer{' and head' if what == 'heads' else ''})")
    if not bool(torch.isfinite(t).all()):
        raise PolicyError(f"{where}.{key}", f"{path!r} holds non-finite {key}; allowed: finite numbers")


def select_layers(art: dict, n_drop: int, protect: "int | tuple[int, ...]" = 0,
                  where: str = "layers_kept") -> tuple[int, ...]:
    """The ``n_drop`` least important layers (importance ascending), never layers ``<= protect`` (an int) or in
    ``protect`` (a tuple: ``structural.plan.mask_layers``)."""
    imp = art["importance"]
    kept = set(range(protect + 1)) if isinstance(protect, int) else set(protect)
    order = sorted((i for i in range(len(imp)) if i not in kept), key=lambda i: (imp[i], i))
    if n_drop > len(order):
        runs = f"<= {protect}" if isinstance(protect, int) else ", ".join(map(str, sorted(kept)))
        raise IncompatiblePolicyError(where, f"would skip {n_drop} layers; at most {len(order)} can be skipped "
                                      f"(layers {runs} always run)")
    return tuple(sorted(order[:n_drop]))


def select_heads(art: dict, threshold: float | None = None, top_n: int | None = None, keep_first: int = 2,
                 kept: float | None = None) -> tuple:
    """Pruned ``(layer, head)`` pairs: heads without a majority of samples voting to keep them.

    ``threshold``: a head is kept when at least half the samples have ``ratio > threshold``;
    ``top_n``: the n heads per layer with the most votes; ``kept``: the fraction ``kept`` of the
    (layer, head) pairs of layers >= ``keep_first`` with the highest vote score (the
    ``ceil(S/2)``-th largest ratio over samples: kept exactly when a majority vote at one global
    threshold would keep it; YOPO chooses that threshold for an average number of heads kept,
    so layers keep different numbers of heads, possibly none).
    """
    r = torch.tensor(art["ratios"], dtype=torch.float64)  # [S, layers, H]
    S, n_layers, H = r.shape
    if kept is not None:
        score = r.sort(0, descending=True).values[(S + 1) // 2 - 1]  # [layers, H]: majority vote at tau <=> score > tau
        score = score + 1e-9 * r.mean(0) / (r.mean(0).abs().max() + 1e-12)  # ties: mean ratio
        keep = torch.zeros(n_layers, H, dtype=torch.bool)
        cand = score[keep_first:].flatten()
        if cand.numel():
            n = max(1, min(cand.numel(), round(kept * cand.numel())))
            flat = torch.zeros(cand.numel(), dtype=torch.bool)
            flat[cand.topk(n).indices] = True
            keep[keep_first:] = flat.view(-1, H)
    elif threshold is not None:
        keep = (r > threshold).sum(0) * 2 >= S  # majority vote
    else:
        n = min(top_n, H)
        votes = torch.zeros(S, n_layers, H)
        votes.scatter_(2, r.topk(n, dim=2).indices, 1.0)
        rank = votes.sum(0) * 1e6 + r.mean(0) / (r.mean(0).max() + 1e-12)  # votes first, then mean ratio
        keep = torch.zeros(n_layers, H, dtype=torch.bool)
        keep.scatter_(1, rank.topk(n, dim=1).indices, True)
    keep[:keep_first] = True
    return tuple((int(layer), int(h)) for layer, h in (~keep).nonzero().tolist())
