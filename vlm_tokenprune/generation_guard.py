"""Which ``generate()`` modes a patched model serves, checked before generating.

A policy that reduces visual tokens scores in the PREFILL: the forward that starts from an empty cache
is the prompt, and its last real token is the prompt's own last token. Plain greedy / sampling and
beam search keep that contract (beams: each expanded row is a copy of its prompt, so every beam of a
prompt holds the same kept set and reordering the cache among them changes nothing). The modes below
break it, and are refused by name before anything runs (never a silent difference):

- assisted / speculative decoding (``assistant_model``, ``prompt_lookup_num_tokens``,
  ``assistant_early_exit``, ``use_mtp``): the first verifying forward is prompt + candidate tokens, so a
  criterion would score with a candidate as the "last token" and treat candidates as instruction text;
- contrastive search (``penalty_alpha`` with ``top_k > 1``), DoLa (``dola_layers``), group beam search
  (``num_beam_groups > 1``), constrained beam search (``constraints`` / ``force_words_ids``), and any
  ``custom_generate``: transformers runs them from ``custom_generate`` code (a Hub repository or a
  callable) whose forward pattern this library cannot check.

Continuous batching (``generate_batch``, ``init_continuous_batching``): refused by name, whatever the policy
(its paged cache is not a ``DynamicCache``; transformers would log every request as failed).

Policies whose every stage is ``prune_heads`` with ``scope=all`` (the same weights for every token) do not
depend on which forward is the prompt: every ``generate()`` mode is allowed with them.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from .handle import PatchHandle

ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def weight_level_only(policy: Any) -> bool:
    """Every stage is ``prune_heads`` with ``scope=all``: the same weights for every token, so the prompt boundary
    does not matter (``skip_layers`` is weight-level too, but its skipped layers leave their cache empty, which
    assisted decoding's cache crop cannot handle on every transformers of the supported window)."""
    return all(s.op == "prune_heads" and s.params.get("scope") == "all" for s in policy.stages)


def check_generate(handle: "PatchHandle", kwargs: dict) -> None:
    """Raise an ``InputError`` naming the ``generate()`` argument of a mode the patched model cannot serve."""
    if weight_level_only(handle.policy):
        return
    cfg = kwargs.get("generation_config") or getattr(handle.model, "generation_config", None)

    def get(name: str) -> Any:
        return kwargs[name] if kwargs.get(name) is not None else getattr(cfg, name, None)

    why_assisted = ("assisted / speculative decoding verifies prompt + candidate tokens in its first forward, so the "
                    "policy would score with a candidate as the prompt's last token; allowed: plain greedy / sampling "
                    "/ beam search, or unpatch() first")
    for name in ASSISTED:
        value = get(name)
        if value not in (None, False):
            raise InputError(name, f"{why_assisted} (got {name}={type(value).__name__ if name == 'assistant_model' else value!r})")
    hub = "transformers runs it from custom_generate code whose forwards this library cannot check; allowed: plain " \
          "greedy / sampling / beam search, or unpatch() first"
    if kwargs.get("custom_generate") is not None:
        raise InputError("custom_generate", hub)
    top_k, alpha = get("top_k"), get("penalty_alpha")
    if alpha is not None and alpha > 0 and top_k is not None and top_k > 1 and not get("do_sample"):
        raise InputError("penalty_alpha", f"contrastive search: {hub}")
    if get("dola_layers") is not None:
        raise InputError("dola_layers", f"DoLa: {hub}")
    if (get("num_beam_groups") or 1) > 1:
        raise InputError("num_beam_groups", f"group beam search: {hub}")
    for name in ("constraints", "force_words_ids"):
        if get(name) is not None:
            raise InputError(name, f"constrained beam search: {hub}")


def guarded_generate(handle: "PatchHandle", generate: Any, *args: Any, **kwargs: Any) -> Any:
    if handle.active:
        check_generate(handle, kwargs)
    return generate(*args, **kwargs)


CONTINUOUS_BATCHING = ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager")


def refused_continuous_batching(name: str, *args: Any, **kwargs: Any) -> Any:
    raise InputError(name, "continuous batching runs the model on a paged cache (PagedAttentionCache) with the requests "
                     "packed into one sequence, which a patched model cannot serve (transformers would only log each "
                     "request as failed); allowed: generate(), or unpatch() first")


def install(handle: "PatchHandle", model: Any, swap: Any) -> None:
    """Wrap ``model.generate`` (an instance attribute, removed by ``unpatch()``) with ``check_generate``, and
    refuse transformers' continuous batching entry points by name. ``swap(obj, name, new)`` records each change
    on the handle."""
    generate = getattr(model, "generate", None)
    if generate is not None:
        swap(model, "generate", functools.wraps(generate)(functools.partial(guarded_generate, handle, generate)))
    for name in CONTINUOUS_BATCHING:
        if callable(getattr(model, name, None)):
            swap(model, name, functools.partial(refused_continuous_batching, name))
