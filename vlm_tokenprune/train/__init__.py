"""Trainers of learned token selectors, one module per method (``vlm-tokenprune train <name> ...``).

Each module ``vlm_tokenprune.train.<name>`` exposes ``main(argv) -> int`` (the command line) and a
Python entry point; :mod:`vlm_tokenprune.train.common` holds seeding, progress and checkpoints.
Importing this package imports no trainer.
"""
