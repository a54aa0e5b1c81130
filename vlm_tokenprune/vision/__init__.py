"""Vision-site stages: token reduction inside the vision encoder (CLIP tower of LLaVA / LLaVA-NeXT).

A vision-site stage (``site="vision"``) drops or fuses patch tokens between encoder layers, so
later encoder layers really run on fewer tokens. HF LLaVA checks that the number of image
features equals the number of image placeholders (``masked_scatter``), so the reduced
features are handed back in their full-size layout (kept / fused tokens at their original
patch slots, empty slots zero) and the language model's input pre-hook (the pre-LLM path)
drops the empty slots: the user's ``input_ids`` are never touched, positions follow the
stage's ``positions`` (``gaps`` or ``repack``), and ``last_trace()`` reports, per kept
visual token, the original prompt positions (patches) it stands for.

- ``state``: per-tower-call bookkeeping (which original token each current token is).
- ``base``: the interface of a vision criterion (``before_layer``).
- ``hooks``: installation, the per-layer hooks and the hand-over to the language model.
- ``groups``: towers whose LLM tokens pack groups of patches (InternVL's pixel shuffle): whole-group selection.
"""
from .base import VisionCriterion
from .state import VisionOutcome, VisionRun

__all__ = ["VisionCriterion", "VisionOutcome", "VisionRun"]
