"""``python -m ppl``: the command line (see ``ppl.cli``)."""
import sys

from .cli import main

sys.exit(main())
