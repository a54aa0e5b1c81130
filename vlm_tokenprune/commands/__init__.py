"""The ``vlm-tokenprune`` commands, one module per group (``cli.py`` holds the parser, the argument checks and
``main``): ``methods``, ``explain``, ``run`` (demo, bench, search, profile, viz, train), ``text`` (output helpers)."""
