"""Prompt layouts shared by the method tests (rows of segments for ``make_batch``: an int n = n random text
tokens, ``"img"`` = the next image). Each batch row differs in images and length, so it is left padded."""
from __future__ import annotations

SINGLE = [[5, "img", 7]]  # one image with text before and after
TWO_IMAGES = [[3, "img", 4, "img", 2]]
BATCHES = {
    "1img+2img": [[5, "img", 7], [2, "img", 3, "img", 4]],
    "2img+1img+text": [[1, "img", "img", 5], [20, "img", 1], [12]],  # the last row has no image
}
NEXT_BATCH = [[1, "img", "img", 5], [20, "img", 1], [12]]  # LLaVA-NeXT: pair with per-image image_sizes
