"""CoLa's layer chains (Li et al., "Skip a Layer or Loop it? Test-Time Depth Adaptation of Pretrained
LLMs", arXiv 2507.07996): run a pretrained model's decoder layers as a chain chosen per input, where
a layer may be skipped or repeated (e.g. ``[0, 1, 1, 3]`` runs layer 1 twice and skips layer 2).

``layer_chain(model, chain)`` swaps the text model's layer list for the chain (the same module objects,
repeats included) and its ``config.num_hidden_layers`` for the chain's length, for the duration of the
``with`` block, and puts both back exactly. Caching is refused inside (a repeated layer would write
its KV cache slot twice): forwards run with ``use_cache=False``. An analysis tool: which chain is
best is per input (``cola_mcts``), and serving it would need a predictor of the chain from the input,
which the paper does not give.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import InputError, UnsupportedModelError


def _text_model(model: nn.Module) -> nn.Module:
    from ..adapters import resolve_adapter
    from ..patching import is_patched

    if is_patched(model):
        raise UnsupportedModelError("model", "is patched; layer chains run on the unpatched model (unpatch first)")
    adapter = resolve_adapter(model)
    adapter.check(model)
    seams = adapter.seams(model)
    lm = seams.language_model
    layers = getattr(lm, "layers", None) if lm is not None else None
    if not isinstance(layers, nn.ModuleList) or tuple(layers) != tuple(seams.decoder_layers):
        raise UnsupportedModelError("model", "its text model has no `layers` ModuleList holding the decoder layers; "
                                    "layer chains need one")
    return lm


def check_chain(chain: Sequence[int], num_layers: int) -> tuple[int, ...]:
    if isinstance(chain, (str, bytes)) or not isinstance(chain, Sequence) or not chain:
        raise InputError("chain", f"must be a non-empty list of decoder layer indices, got {chain!r}")
    bad = [x for x in chain if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_layers]
    if bad:
        raise InputError("chain", f"layer {bad[0]!r} is not a decoder layer; allowed: 0..{num_layers - 1}")
    return tuple(chain)


@contextmanager
def layer_chain(model: nn.Module, chain: Sequence[int]) -> Iterator[None]:
    """Within the block the model's decoder layers run in the order ``chain`` (skips and repeats allowed)."""
    lm = _text_model(model)
    layers = lm._modules["layers"]
    chain = check_chain(chain, len(layers))
    cfg = lm.config
    old_n = cfg.num_hidden_layers
    lm._modules["layers"] = nn.ModuleList([layers[i] for i in chain])
    cfg.num_hidden_layers = len(chain)
    try:
        yield
    finally:
        lm._modules["layers"] = layers
        cfg.num_hidden_layers = old_n


@torch.no_grad()
def chain_logits(model: nn.Module, inputs: Mapping[str, Any], chain: Sequence[int]) -> torch.Tensor:
    """Logits of one cache-free forward of ``inputs`` through ``chain``."""
    if inputs.get("use_cache"):
        raise InputError("use_cache", "layer chains run without a KV cache (a repeated layer has one slot); allowed: False")
    with layer_chain(model, chain):
        return model(**{k: v for k, v in inputs.items() if k != "use_cache"}, use_cache=False).logits
