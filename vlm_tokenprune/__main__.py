"""``python -m vlm_tokenprune`` = the ``vlm-tokenprune`` console script."""
import sys

from .cli import main

sys.exit(main())
