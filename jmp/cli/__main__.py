"""``python -m jmp.cli ARGS``: the same as ``jmp ARGS`` (what ``jmp launch`` runs)."""

import sys

from jmp.cli import main

sys.exit(main())
