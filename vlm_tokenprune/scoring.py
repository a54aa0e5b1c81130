"""What a criterion sees: tensors about the current sequence, and attention rows on demand."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import attention_rows
from .ops import Ops


@dataclass
class ScoringContext:
    """Inputs of ``Criterion.score`` for one stage.

    The scoring layer is decoder layer ``stage.layer - 1``; ``hidden`` enters it.
    ``visual_idx``/``visual_ok`` ``[B, N]``: positions of the current visual tokens in the
    current sequence (ascending, padded). ``row``/``col``/``segment``/``is_newline`` ``[B, N]``
    locate each on its patch grid (``coords_known`` False: unknown). ``orig_pos`` ``[B, N]``:
    positions in the original prompt. ``keep`` ``[B]``: how many visual tokens each row keeps.
    ``ops``: the hot ops on the patch's backend (``ctx.ops.topk(...)``, ``ctx.ops.gather_tokens(...)``).
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
    image: torch.Tensor | None = None  # [B, N] image index of each visual token within its row (None: unknown)
    output: torch.Tensor | None = None  # [B, L, D] the scoring layer's output (= the stage layer's input; LLM site)
    # LLM site: the hidden states entering decoder layer 0 ([B, L0, D], the language model's input after any pre_llm
    # stage), its visual tokens and real tokens ([B, L0]), and the layer-0 position of each current token ([B, M])
    embeds: torch.Tensor | None = None
    embeds_visual: torch.Tensor | None = None
    embeds_valid: torch.Tensor | None = None
    cur_pos: torch.Tensor | None = None
    ops: Ops = field(default_factory=lambda: Ops("torch"))  # the patch's backend (handle.ops)
    # the scoring layer's own attention mask over the current tokens ([B, M, M] bool, True = query row may attend key
    # column), for a family whose masks are not causal (Gemma 3: sliding window of original positions, bidirectional
    # image block; ``Adapter.scoring_reads_layer_mask``); None: causal over ``seq_valid``
    layer_mask: torch.Tensor | None = None

    def _key_valid(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(seq_valid [B, M], row_keys [B, R, M] or None)``: the keys of each query row, as the scoring layer's
        own mask gives them (``layer_mask``), so attention rows are the layer's own rows. Rows that see no key
        after themselves and a single row: its keys restrict ``seq_valid`` (the causal rule then holds, any
        backend); several rows, or keys after the query (an image block): per-row key sets (``row_keys``)."""
        if self.layer_mask is None:
            return self.seq_valid, None
        M = self.seq_valid.shape[1]
        rows = torch.gather(self.layer_mask, 1, query[:, :, None].expand(-1, -1, M)) & self.seq_valid[:, None, :]
        after = torch.arange(M, device=query.device)[None, None, :] > query[:, :, None]
        if query.shape[1] == 1 and not bool((rows & after).any()):
            return rows[:, 0], None
        return self.seq_valid, rows

    def _queries(self, query, query_ok):
        if isinstance(query, str):
            if query == "last":
                return self.last_idx[:, None], None
            if query == "text":
                return self.text_idx, self.text_ok
            raise ValueError(f"query must be 'last', 'text' or a [B, R] tensor, got {query!r}")
        return query, query_ok

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
        query, query_ok = self._queries(query, query_ok)
        key_valid, row_keys = self._key_valid(query)
        probs = attention_rows(
            self.layer, self.hidden, self.position_embeddings, query, self.visual_idx, self.visual_ok, key_valid,
            rope=rope, softmax_over=softmax_over, keys=self.keys, row_keys=row_keys, backend=self.ops.backend,
        )
        return probs if query_ok is None else probs * query_ok[:, None, :, None]

    def attention_scores(
        self,
        query: str | torch.Tensor = "last",
        *,
        query_ok: torch.Tensor | None = None,
        rope: bool = True,
        softmax_over: str = "row",
        reduce: str = "mean",
    ) -> torch.Tensor:
        """``[B, N]`` attention the visual tokens receive, reduced over heads and query rows.

        ``reduce``: ``"mean"`` (over heads and the real query rows; equals
        ``attention(...).mean(dim=1)`` averaged over the real rows) or ``"max"``. Queries as in
        ``attention``. On the Triton backend the ``[B, H, R, N]`` probabilities are never
        materialised (memory O(B * H * R + B * N), plus the ``[B, R, M]`` per-row key sets read from
        ``layer_mask`` when several rows need them).
        """
        query, query_ok = self._queries(query, query_ok)
        key_valid, row_keys = self._key_valid(query)
        return attention_rows(
            self.layer, self.hidden, self.position_embeddings, query, self.visual_idx, self.visual_ok, key_valid,
            rope=rope, softmax_over=softmax_over, keys=self.keys, reduce=reduce, query_ok=query_ok,
            row_keys=row_keys, backend=self.ops.backend,
        )

    def topk(self, scores: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k[b]`` (default ``keep``) valid visual tokens by ``scores`` ``[B, N]``: ``(idx, ok)`` ascending, ties to the lower index."""
        return self.ops.topk(scores, self.visual_ok, self.keep if k is None else k)
