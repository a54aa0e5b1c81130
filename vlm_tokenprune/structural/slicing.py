"""Weight slicing for structural ops: sliced copies of attention projections (``prune_heads scope=all``:
``sliced_attention``, ``SlicedLinear``) and cached row / column slices of a projection's weight
(``Rows``: visual rows of YOPO head pruning skip the pruned heads' columns)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

class Rows:
    """Output rows ``idx`` of a linear layer's weight (and bias), sliced once per weight tensor
    (re-sliced if the model moves or the weight is replaced); ``cols=True``: input columns."""

    def __init__(self, lin: nn.Linear, idx: torch.Tensor, cols: bool = False):
        self.lin, self.idx, self.cols, self._key, self._w = lin, idx, cols, None, None

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.lin.weight, self.lin.bias
        key = (w.data_ptr(), w.device, w.dtype, w._version)
        if key != self._key:
            idx = self.idx.to(w.device)
            self._w = (w.detach().index_select(1 if self.cols else 0, idx).contiguous(),
                       None if b is None else (b.detach() if self.cols else b.detach().index_select(0, idx)).contiguous())
            self._key = key
        return self._w


def _linear(src: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> nn.Linear:
    w = src.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    b = src.bias.detach() if src.bias is not None else None
    if b is not None and rows is not None:
        b = b[rows]
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    out.weight = nn.Parameter(w.contiguous().clone(), requires_grad=False)
    if b is not None:
        out.bias = nn.Parameter(b.contiguous().clone(), requires_grad=False)
    return out.train(src.training)


class SlicedLinear:
    """The ``forward`` of an ``nn.Linear`` that computes only ``rows`` (output features) or ``cols`` (input
    features) of the module's OWN current weight (``prune_heads`` scope=all). The module, its parameters and
    ``state_dict`` stay the model's (``save_pretrained``, ``load_state_dict`` and ``.to(dtype)`` act on them as
    on the unpatched model); the slice is taken again whenever the weight's storage, version, dtype or device
    changed, so a loaded or converted weight is what runs."""

    def __init__(self, lin: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None):
        self.lin, self.rows, self.cols = lin, rows, cols
        self.size_attr = "out_features" if cols is None else "in_features"
        self.width = len(rows) if rows is not None else len(cols)
        self._key = None
        self._w = self._b = None

    def _sliced(self):
        w, b = self.lin.weight, self.lin.bias
        key = (w.data_ptr(), w._version, w.dtype, w.device, None if b is None else (b.data_ptr(), b._version, b.dtype))
        if key != self._key:
            ws, bs = w.detach(), None if b is None else b.detach()
            if self.rows is not None:
                idx = torch.tensor(self.rows, device=w.device)
                ws = ws.index_select(0, idx)
                bs = None if bs is None else bs.index_select(0, idx)
            if self.cols is not None:
                ws = ws.index_select(1, torch.tensor(self.cols, device=w.device))
            self._w, self._b, self._key = ws.contiguous(), bs, key
        return self._w, self._b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._sliced()
        return F.linear(x, w, b)


def sliced_attention(attn: nn.Module, pruned: set[int]):
    """Sliced forwards of q/k/v/o_proj keeping only the heads not in ``pruned``, and the new GQA group size.

    When every KV group keeps the same number c of query heads, the groups with none left are
    dropped from k/v_proj and the group size is c (exact, fewer FLOPs everywhere). Otherwise
    each kept query head gets its own copy of its KV head (group size 1): exact, but k/v_proj
    then produce one KV head per kept query head.
    """
    d = attn.head_dim
    H = attn.q_proj.out_features // d
    Hkv = attn.k_proj.out_features // d
    g = H // Hkv
    kept = [h for h in range(H) if h not in pruned]
    per = {kv: [h for h in kept if h // g == kv] for kv in range(Hkv)}
    counts = {len(v) for v in per.values() if v}
    if len(counts) == 1:
        kv_heads = [kv for kv, v in per.items() if v]
        groups = counts.pop()
    else:
        kv_heads = [h // g for h in kept]
        groups = 1
    rows = lambda heads: [h * d + i for h in heads for i in range(d)]  # noqa: E731
    q = SlicedLinear(attn.q_proj, rows=rows(kept))
    k = SlicedLinear(attn.k_proj, rows=rows(kv_heads))
    v = SlicedLinear(attn.v_proj, rows=rows(kv_heads))
    o = SlicedLinear(attn.o_proj, cols=rows(kept))
    return q, k, v, o, groups
