"""What a criterion sees: tensors about the current sequence, and attention rows on demand."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import attention_rows


@dataclass
class ScoringContext:
    """Inputs of ``Criterion.score`` for one stage.

    The scoring layer is decoder layer ``stage.layer - 1``; ``hidden`` enters it.
    ``visual_idx``/``visual_ok`` ``[B, N]``: positions of the current visual tokens in the
    current sequence (ascending, padded). ``row``/``col``/``segment``/``is_newline`` ``[B, N]``
    locate each on its patch grid (``coords_known`` False: unknown). ``orig_pos`` ``[B, N]``:
    positions in the original prompt. ``keep`` ``[B]``: how many visual tokens each row keeps.
    """

    layer: nn.Module
    hidden: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    seq_valid: torch.Tensor
    last_idx: torch.Tensor
    visual_idx: torch.Tensor
    visual_ok: torch.Tensor
    orig_pos: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    segment: torch.Tensor
    is_newline: torch.Tensor
    coords_known: bool
    keep: torch.Tensor
    keys: torch.Tensor | None = None  # [B, L, H_kv*d] the scoring layer's own k_proj output, when captured

    def attention(self, query: str | torch.Tensor = "last", *, rope: bool = True, softmax_over: str = "row") -> torch.Tensor:
        """``[B, H, R, N]`` attention of query rows over the visual tokens at the scoring layer.

        ``query``: ``"last"`` (the last real token of each row) or a ``[B, R]`` tensor of positions.
        """
        q = self.last_idx[:, None] if isinstance(query, str) and query == "last" else query
        if isinstance(q, str):
            raise ValueError(f"query must be 'last' or a [B, R] tensor, got {query!r}")
        return attention_rows(
            self.layer, self.hidden, self.position_embeddings, q, self.visual_idx, self.visual_ok, self.seq_valid,
            rope=rope, softmax_over=softmax_over, keys=self.keys,
        )
