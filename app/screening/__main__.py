"""`python -m app.screening KIND PATH MAX_UNPACKED_BYTES MAX_ENTRIES CPU_S`: the screening child (app/screening/child.py)."""

import sys

from app.screening.child import child_main

sys.exit(child_main(sys.argv[1:]))
