"""Where a stage acts, as predicates: the one place that compares site names.

``Stage`` (``policy``) and ``StageTrace`` (``state``) carry a ``site`` string; code that branches on it asks
these properties (``st.is_vision``, ``st.reduces_input``) instead of comparing strings. Installing a
site's hooks is dispatched in ``sites/__init__`` (``INSTALL_ORDER``).
"""
from __future__ import annotations

SITES = ("llm", "pre_llm", "vision")  # vision: between vision-encoder layers (``vlm_tokenprune.vision``)
LLM, PRE_LLM, VISION = SITES
# sites whose stage shortens the language model's input before decoder layer 0 (every layer sees the kept tokens)
INPUT_SITES = (PRE_LLM, VISION)


class SiteKind:
    """Mixin for anything with a ``site`` attribute (one of ``SITES``)."""

    site: str

    @property
    def is_llm(self) -> bool:
        """Between decoder layers (scores on layer ``layer - 1``'s input, drops before ``layer``)."""
        return self.site == LLM

    @property
    def is_pre_llm(self) -> bool:
        """At the language model's input, after the projector."""
        return self.site == PRE_LLM

    @property
    def is_vision(self) -> bool:
        """Between vision-encoder layers (budget per crop)."""
        return self.site == VISION

    @property
    def reduces_input(self) -> bool:
        """A pre-LLM or vision stage: the language model's input is already shortened at layer 0."""
        return self.site in INPUT_SITES
