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
    text_idx: torch.Tensor | None = None  # [B, T] instruction tokens: real text after the first visual token
    text_ok: torch.Tensor | None = None
    keys: torch.Tensor | None = None  # [B, L, H_kv*d] the scoring layer's own k_proj output, when captured
    values: torch.Tensor | None = None  # [B, L, H_kv*d] its v_proj output

    def attention(
        self,
        query: str | torch.Tensor = "last",
        *,
        query_ok: torch.Tensor | None = None,
        rope: bool = True,
        softmax_over: str = "row",
    ) -> torch.Tensor:
        """``[B, H, R, N]`` attention of query rows over the visual tokens at the scoring layer.

        ``query``: ``"last"`` (the last real token of each row), ``"text"`` (the instruction
        tokens ``text_idx``; padded rows are zero) or a ``[B, R]`` tensor of positions with
        ``query_ok`` ``[B, R]`` marking real rows.
        """
        if isinstance(query, str):
            if query == "last":
                query, query_ok = self.last_idx[:, None], None
            elif query == "text":
                query, query_ok = self.text_idx, self.text_ok
            else:
                raise ValueError(f"query must be 'last', 'text' or a [B, R] tensor, got {query!r}")
        probs = attention_rows(
            self.layer, self.hidden, self.position_embeddings, query, self.visual_idx, self.visual_ok, self.seq_valid,
            rope=rope, softmax_over=softmax_over, keys=self.keys,
        )
        return probs if query_ok is None else probs * query_ok[:, None, :, None]
