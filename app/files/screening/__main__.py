"""`python -m app.files.screening KIND PATH MAX_UNPACKED_BYTES MAX_ENTRIES CPU_S MEMORY_BYTES`: the screening child
(app/files/screening/child.py)."""

import sys

from app.files.screening.child import child_main

sys.exit(child_main(sys.argv[1:]))
