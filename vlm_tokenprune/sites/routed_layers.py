"""The text model's decoder-layer list while patched: which layers run library code on this call.

``patch()`` replaces the text model's ``layers`` (an ``nn.ModuleList``) with a ``RoutedLayers`` that holds
the same modules under the same names, so ``state_dict()``, ``.to()``, ``save_pretrained()`` and
``load_state_dict()`` see the model unchanged; ``unpatch()`` puts the original list back. The text model
iterates its layers once per forward (``for layer in self.layers[:n]``): inside a patched forward the
iteration yields, per layer, the layer itself or a ``LayerCall`` that first changes the layer's input
(``engine.layer_pre_hook``: drop tokens, shrink the mask and rotary tables) and then calls the layer.

- Outside a forward, or in a forward that changes nothing (``passthrough``): the layers themselves.
- Prefill, and decode steps that need each layer's own input: a ``LayerCall`` for every layer
  ``sites.llm.hooked_layers`` names, the layers themselves before.
- A gated decode step (``ForwardState.decode_gated``, ``engine``): the layers themselves, except each token
  stage's first layer (a gate), which changes the one mask tensor the text model hands to every layer, in
  place (undone when the forward ends). A decode step then runs library code once per token stage, however
  deep the model (issue reliability-2, item 8), where torch hooks would run once per layer.

Unlike torch hooks, nothing here runs unless the text model iterates the list inside a patched forward.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch import nn


class LayerCall:
    """One decoder layer as a patched forward calls it: ``before(layer, args, kwargs)`` (a forward pre-hook's
    signature: returns None or new ``(args, kwargs)``), then the layer. Attributes read through to the layer
    (``decoder_layer.attention_type`` etc.)."""

    __slots__ = ("layer", "before")

    def __init__(self, layer: nn.Module, before: Callable):
        self.layer, self.before = layer, before

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        changed = self.before(self.layer, args, kwargs)
        if changed is not None:
            args, kwargs = changed
        return self.layer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)


class RoutedLayers(nn.ModuleList):
    """The decoder layers of a patched text model (see the module docstring). ``calls``: layer index -> the
    function run before that layer; ``gates``: the layers a gated decode step calls through (each token stage's
    first layer)."""

    def __init__(self, layers: nn.ModuleList, handle: Any, calls: dict[int, Callable], gates: tuple[int, ...]):
        super().__init__(layers)
        self._handle = handle
        self._raw = tuple(layers)
        self._calls = tuple(LayerCall(layer, calls[j]) if j in calls else layer for j, layer in enumerate(layers))
        self._gates = tuple(sorted(gates))

    def _route(self) -> Iterator[nn.Module] | None:
        st = self._handle.state
        if st is None or st.phase == "passthrough":
            return None
        if st.phase == "decode" and st.decode_gated:
            return self._gated(st)
        return iter(self._calls)

    def _gated(self, st: Any) -> Iterator[nn.Module]:
        raw, calls, prev = self._raw, self._calls, 0
        for g in self._gates:
            yield from raw[prev:g]
            yield calls[g]
            if not st.decode_gated:  # the first gate found that this step needs every layer's own input
                yield from calls[g + 1:]
                return
            prev = g + 1
        yield from raw[prev:]

    def __iter__(self) -> Iterator[nn.Module]:
        routed = self._route()
        return iter(self._raw) if routed is None else routed

    def __getitem__(self, idx: Any) -> Any:
        if not isinstance(idx, slice):
            return super().__getitem__(idx)  # one layer: the module itself
        routed = self._route()
        if routed is None:
            return nn.ModuleList(self._raw[idx])
        if idx.indices(len(self._raw)) == (0, len(self._raw), 1):
            return routed  # the text model's ``self.layers[: num_hidden_layers]``
        st = self._handle.state
        st.decode_gated = False  # a partial slice: each layer its own input (never gated)
        return self._calls[idx]


__all__ = ["LayerCall", "RoutedLayers"]
