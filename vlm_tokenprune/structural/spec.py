"""Structural operations as policy data: names, parameters, model-free validation.

Structural stages change the COMPUTATION of the language model instead of (or besides) its
token set. They take no criterion and no budget; each has its own parameters:

==================  =========================================================================
op                  parameters (defaults)
==================  =========================================================================
skip_layers         ``layers`` (list) | ``calibration`` (path of a ``what="layers"`` artifact)
                    with ``layers_kept`` (22) of ``of`` (32) layers, scaled to the model;
                    ``scope``: ``all`` (default) or ``visual``
prune_heads         ``heads`` (list of ``layer/head``) | ``calibration`` (a ``what="heads"``
                    artifact) with ``threshold``, ``top_n`` (heads kept per layer) or ``kept``
                    (fraction of the heads of layers >= keep_first kept, by majority vote at
                    one global threshold), ``keep_first`` (2: layers below it keep every
                    head); ``scope``: ``visual`` (YOPO, default) or ``all``
ffn_cut             ``ratio`` (2.0: visual tokens use the first ``m // ratio`` MLP channels),
                    ``layers`` (``all``)
neighbor_attention  ``window`` (5, odd: visual->visual attention within a w x w patch window),
                    ``layers`` (``all``)
visual_drop         ``layer`` (from this decoder layer on the visual tokens are removed)
skip_sublayers      FinerCut (arXiv 2405.18218): ``attn`` and / or ``ffn`` (lists of layers whose
                    self-attention / MLP sublayer is removed: the residual stream passes it
                    unchanged) | ``calibration`` (a ``what="sublayers"`` artifact) with
                    ``removed`` (16) of ``of`` (64) sublayers, scaled to the model; ``scope``:
                    ``all`` (default) or ``visual`` (visual tokens only: text tokens run the
                    sublayer and attend the visual keys / values of this layer)
==================  =========================================================================

List syntax (string grammar): items joined with ``;`` (``,`` separates keys, ``+`` stages),
e.g. ``skip_layers:layers=5;9,scope=visual``, ``prune_heads:heads=2/0;2/3;3/1,scope=all``
(``layer/head`` pairs). In dicts/JSON lists are lists and heads are ``{"2": [0, 3], "3": [1]}``.
``layers=all`` means every decoder layer.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from ..errors import PolicyError

TOKEN_OPS = ("prune", "visual_drop")  # ops that change the token set (ordered by layer, engine-driven)
STRUCTURAL_OPS = ("skip_layers", "prune_heads", "ffn_cut", "neighbor_attention", "visual_drop", "skip_sublayers")
SCOPES = {"skip_layers": ("all", "visual"), "prune_heads": ("visual", "all"), "skip_sublayers": ("all", "visual")}


def _int_list(value: Any, where: str, allow_all: bool = False) -> Any:
    if allow_all and value == "all":
        return "all"
    if isinstance(value, bool):
        raise PolicyError(where, f"must be a list of layer indices{' or all' if allow_all else ''}, got {value!r}")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        try:
            items = [int(x) for x in value.split(";") if x.strip()]
        except ValueError:
            raise PolicyError(where, f"must be integers joined with ';'{' or all' if allow_all else ''}, got {value!r}") from None
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise PolicyError(where, f"must be a list of layer indices{' or all' if allow_all else ''}, got {value!r}")
    if not items or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in items):
        raise PolicyError(where, f"must be a non-empty list of integers >= 0, got {value!r}")
    if len(set(items)) != len(items):
        raise PolicyError(where, f"has duplicates: {value!r}")
    return tuple(sorted(items))


def _heads(value: Any, where: str) -> tuple:
    pairs: list = []
    if isinstance(value, str):
        for item in filter(None, (x.strip() for x in value.split(";"))):
            a, slash, b = item.partition("/")
            try:
                pairs.append((int(a), int(b)))
            except ValueError:
                raise PolicyError(where, f"expected layer/head pairs joined with ';' (e.g. 2/0;2/3), got {item!r}") from None
            if not slash:
                raise PolicyError(where, f"expected layer/head pairs joined with ';' (e.g. 2/0;2/3), got {item!r}")
    elif isinstance(value, Mapping):
        for k, hs in value.items():
            try:
                layer = int(k)
            except (TypeError, ValueError):
                raise PolicyError(where, f"keys must be layer indices, got {k!r}") from None
            hs = _int_list(hs, f"{where}[{k}]")
            pairs.extend((layer, h) for h in hs)
    elif isinstance(value, (list, tuple)):
        for p in value:
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise PolicyError(where, f"expected (layer, head) pairs, got {p!r}")
            pairs.append((p[0], p[1]))
    else:
        raise PolicyError(where, f"expected layer/head pairs, got {value!r}")
    if not pairs or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for p in pairs for x in p):
        raise PolicyError(where, f"must be a non-empty list of (layer >= 0, head >= 0) pairs, got {value!r}")
    if len(set(pairs)) != len(pairs):
        raise PolicyError(where, f"has duplicate layer/head pairs: {value!r}")
    return tuple(sorted(pairs))


def _choice(allowed: tuple) -> Callable:
    def check(v, where):
        if v not in allowed:
            raise PolicyError(where, f"{v!r}; allowed: {', '.join(allowed)}")
        return v
    return check


def _pos_int(lo: int) -> Callable:
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise PolicyError(where, f"must be an integer >= {lo}, got {v!r}")
        return v
    return check


def _ratio(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 1:
        raise PolicyError(where, f"must be a number >= 1 (visual tokens keep the first m / ratio MLP channels), got {v!r}")
    return float(v)


def _threshold(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
        raise PolicyError(where, f"must be a number >= 0, got {v!r}")
    return float(v)


def _fraction(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 0 < v <= 1:
        raise PolicyError(where, f"must be a fraction in (0, 1] (of the heads kept), got {v!r}")
    return float(v)


def _path(v, where):
    if not isinstance(v, str) or not v:
        raise PolicyError(where, f"must be the path of a calibration file, got {v!r}")
    return v


def _window(v, where):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 2 == 0:
        raise PolicyError(where, f"must be an odd integer >= 1 (a w x w window centred on the query patch), got {v!r}")
    return v


# op -> {param: (default or REQUIRED/None, checker)}
_NONE = object()
PARAMS: dict[str, dict[str, tuple[Any, Callable]]] = {
    "skip_layers": {
        "layers": (_NONE, lambda v, w: _int_list(v, w)),
        "scope": ("all", _choice(SCOPES["skip_layers"])),
        "calibration": (_NONE, _path),
        "layers_kept": (_NONE, _pos_int(1)),
        "of": (_NONE, _pos_int(1)),
    },
    "prune_heads": {
        "heads": (_NONE, _heads),
        "scope": ("visual", _choice(SCOPES["prune_heads"])),
        "calibration": (_NONE, _path),
        "threshold": (_NONE, _threshold),
        "top_n": (_NONE, _pos_int(1)),
        "kept": (_NONE, _fraction),
        "keep_first": (_NONE, _pos_int(0)),
    },
    "ffn_cut": {"ratio": (2.0, _ratio), "layers": ("all", lambda v, w: _int_list(v, w, allow_all=True))},
    "neighbor_attention": {"window": (5, _window), "layers": ("all", lambda v, w: _int_list(v, w, allow_all=True))},
    "visual_drop": {},
    "skip_sublayers": {
        "attn": (_NONE, lambda v, w: _int_list(v, w)),
        "ffn": (_NONE, lambda v, w: _int_list(v, w)),
        "scope": ("all", _choice(SCOPES["skip_sublayers"])),
        "calibration": (_NONE, _path),
        "removed": (_NONE, _pos_int(1)),
        "of": (_NONE, _pos_int(1)),
    },
}


def check_structural(op: str, params: Mapping[str, Any], where: str) -> dict:
    """Validated, normalised parameters of structural op ``op`` (defaults filled in)."""
    spec = PARAMS[op]
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}", f"unknown parameter of {op}; allowed: {', '.join(spec) or '(none besides layer)'}")
    out: dict = {}
    for key, (default, check) in spec.items():
        if key in params and params[key] is not None:
            out[key] = check(params[key], f"{where}.{key}")
        elif default is not _NONE:
            out[key] = default
    if op == "skip_layers":
        if ("layers" in out) == ("calibration" in out):
            raise PolicyError(f"{where}.layers", "give exactly one of layers (a list) or calibration (a what='layers' artifact)")
        if "calibration" in out:
            if "layers_kept" not in out:
                raise PolicyError(f"{where}.layers_kept", "is required with calibration (how many layers remain)")
            out.setdefault("of", 32)
            if out["layers_kept"] > out["of"]:
                raise PolicyError(f"{where}.layers_kept", f"must be <= of ({out['of']}), got {out['layers_kept']}")
        else:
            for k in ("layers_kept", "of"):
                if k in out:
                    raise PolicyError(f"{where}.{k}", "only applies with calibration")
    if op == "skip_sublayers":
        listed = "attn" in out or "ffn" in out
        if listed == ("calibration" in out):
            raise PolicyError(f"{where}.attn", "give attn and / or ffn (lists of layers) or calibration (a what='sublayers' "
                              "artifact), not both")
        if "calibration" in out:
            if "removed" not in out:
                raise PolicyError(f"{where}.removed", "is required with calibration (how many sublayers are removed)")
            out.setdefault("of", 64)
            if out["removed"] > out["of"]:
                raise PolicyError(f"{where}.removed", f"must be <= of ({out['of']}), got {out['removed']}")
        else:
            for k in ("removed", "of"):
                if k in out:
                    raise PolicyError(f"{where}.{k}", "only applies with calibration")
    if op == "prune_heads":
        if ("heads" in out) == ("calibration" in out):
            raise PolicyError(f"{where}.heads", "give exactly one of heads (layer/head pairs) or calibration (a what='heads' artifact)")
        if "calibration" in out:
            if sum(k in out for k in ("threshold", "top_n", "kept")) != 1:
                raise PolicyError(f"{where}.threshold", "with calibration give exactly one of threshold, top_n or kept")
            out.setdefault("keep_first", 2)
        else:
            for k in ("threshold", "top_n", "kept", "keep_first"):
                if k in out:
                    raise PolicyError(f"{where}.{k}", "only applies with calibration")
    return out


def params_to_dict(op: str, params: Mapping[str, Any]) -> dict:
    """JSON-friendly parameters (tuples -> lists, heads -> {layer: [heads]})."""
    out: dict = {}
    for k, v in params.items():
        if k == "heads":
            d: dict = {}
            for layer, h in v:
                d.setdefault(str(layer), []).append(h)
            out[k] = d
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def params_to_string(op: str, params: Mapping[str, Any]) -> str:
    parts = []
    for k, v in sorted(params.items()):
        if k == "heads":
            v = ";".join(f"{a}/{b}" for a, b in v)
        elif isinstance(v, tuple):
            v = ";".join(str(x) for x in v)
        parts.append(f"{k}={v}")
    return ",".join(parts)
