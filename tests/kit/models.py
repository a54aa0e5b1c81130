"""One tiny-model factory for the whole test run: random-weight LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL
built from configs with the real transformers classes (``vlm_tokenprune.eval.tiny_models``), cached.

``tiny_llava`` / ``tiny_qwen`` return the SHARED model of a (backend, config, tweaks) key: a test must
not mutate it (patches are always undone; ``conftest.py`` checks after every test module that the
shared models are unchanged). A test that changes weights, dtype or the attention backend takes a
``fresh_*`` deep copy instead.
"""
from __future__ import annotations

import copy
import inspect
import json

import torch

from vlm_tokenprune.eval.tiny_models import build_tiny_llava, build_tiny_qwen2_vl, tiny_llava_config, tiny_qwen2_vl_config


def sharp_llm(model, factor: float = 16.0):
    """Scale the LLM's q_proj so attention logits are of order 1-10 (a trained model's), not ~0.03:
    on near-uniform attention, attention-ranking methods reduce to the causal prior "keep the earliest"."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
    return model


def random_norms(model):
    """Random LLM input-layernorm weights (all ones at init make normalised and raw hidden states
    cosine-equivalent; random weights tell which representation a method uses)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in model.model.language_model.named_modules():
            if name.endswith("input_layernorm"):
                mod.weight.copy_(0.75 + 0.5 * torch.rand(mod.weight.shape, generator=g))
    return model


def peaked_tower(model, factor: float = 6.0):
    """Scale the CLIP tower's q/k projections so the CLS attention is peaked (entropy-adaptive counts > 0)."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        for layer in tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


TWEAKS = {"sharp_llm": sharp_llm, "random_norms": random_norms, "peaked_tower": peaked_tower}


def _key(config: dict, *builders) -> tuple:
    """The cache key of ``config``: keywords equal to the builders' defaults dropped (``layers=4`` is the default model)."""
    defaults = {}
    for fn in builders:
        defaults.update({n: p.default for n, p in inspect.signature(fn).parameters.items()
                         if p.default is not inspect.Parameter.empty})
    return tuple(sorted((k, v) for k, v in config.items() if k not in defaults or defaults[k] != v))


def _tweaked(model, tweaks: tuple[str, ...]):
    unknown = [t for t in tweaks if t not in TWEAKS]
    if unknown:
        raise ValueError(f"tweaks: unknown {unknown}; allowed {sorted(TWEAKS)}")
    for t in tweaks:
        TWEAKS[t](model)
    return model


_SHARED: dict[tuple, object] = {}  # (family, attn, version, tweaks, config) -> model
_AS_BUILT: dict[tuple, dict] = {}  # key -> what the model looked like when built


def _looks(model, copy_weights: bool = True) -> dict:
    return {
        "state": {k: v.detach().clone() if copy_weights else v.detach() for k, v in model.state_dict().items()},
        "hooks": sorted(_foreign_hooks(model)),
        "attn": model.config._attn_implementation,
        "config": model.config.to_json_string(),
        "generation_config": model.generation_config.to_json_string(),
        "class": type(model),
        "training": model.training,
    }


def _foreign_hooks(model):
    """Forward (pre-)hooks other than transformers' own output-capturing ones, as (module, origin)."""
    for name, mod in model.named_modules():
        for hook in [*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()]:
            origin = getattr(getattr(hook, "func", hook), "__module__", "") or ""
            if not origin.startswith("transformers."):
                yield name, origin


def _shared(key: tuple, build):
    if key not in _SHARED:
        with torch.random.fork_rng(devices=[]):  # building (it seeds) leaves the test's random stream alone
            _SHARED[key] = _tweaked(build(), key[3])
        _AS_BUILT[key] = _looks(_SHARED[key])
    return _SHARED[key]


def _changed_fields(then: str, now: str, prefix: str = "") -> dict:
    """``{field: (before, after)}`` of two configs' JSON (nested fields dotted)."""
    a, b = (json.loads(x) if isinstance(x, str) else x for x in (then, now))
    out = {}
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out.update(_changed_fields(a[k], b[k], f"{prefix}{k}."))
        elif a.get(k) != b.get(k):
            out[prefix + k] = (a.get(k), b.get(k))
    return out


def changed_shared_models() -> list[str]:
    """What changed in the shared models since they were built (weights, hooks, backend, class, mode, configs);
    a changed model is dropped from the cache, so later tests get a new one."""
    out = []
    for key, model in list(_SHARED.items()):
        now, then = _looks(model, copy_weights=False), _AS_BUILT[key]
        n = len(out)
        if now["state"].keys() != then["state"].keys():
            out.append(f"{key}: its parameters / buffers were added or removed")
        else:
            bad = [k for k in then["state"] if now["state"][k].device != then["state"][k].device
                   or now["state"][k].dtype != then["state"][k].dtype or not torch.equal(now["state"][k], then["state"][k])]
            if bad:
                out.append(f"{key}: weights changed ({bad[:3]})")
        out += [f"{key}: {f} {then[f]!r} -> {now[f]!r}" for f in ("hooks", "attn", "class", "training") if now[f] != then[f]]
        out += [f"{key}: {f} {_changed_fields(then[f], now[f])}" for f in ("config", "generation_config") if now[f] != then[f]]
        if len(out) > n:
            del _SHARED[key], _AS_BUILT[key]
    return out


def tiny_llava(attn: str = "sdpa", *, tweaks: tuple[str, ...] = (), **config):
    """The shared tiny LLaVA (``next=True``: LLaVA-NeXT) for ``attn`` and ``tiny_llava_config`` / ``seed``
    keywords (default: 4 layers, hidden 64, 6 x 6 patch grid), with ``tweaks`` from ``TWEAKS`` applied."""
    key = ("llava", attn, None, tuple(tweaks), _key(config, build_tiny_llava, tiny_llava_config))
    return _shared(key, lambda: build_tiny_llava(attn, **config))


def tiny_qwen(attn: str = "sdpa", version: str = "2", *, tweaks: tuple[str, ...] = (), **config):
    """The shared tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``)."""
    key = ("qwen", attn, version, tuple(tweaks), _key(config, build_tiny_qwen2_vl, tiny_qwen2_vl_config))
    return _shared(key, lambda: build_tiny_qwen2_vl(attn, version, **config))


def fresh_llava(attn: str = "sdpa", **kw):
    """A private deep copy of ``tiny_llava(attn, **kw)``, free to mutate."""
    return copy.deepcopy(tiny_llava(attn, **kw))


def fresh_qwen(attn: str = "sdpa", version: str = "2", **kw):
    """A private deep copy of ``tiny_qwen(attn, version, **kw)``, free to mutate."""
    return copy.deepcopy(tiny_qwen(attn, version, **kw))
