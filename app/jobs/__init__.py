"""Jobs: submit and cancel (service.py), the state machine and reaper (lifecycle.py), sweeps (sweeps.py), statuses
and priorities (states.py)."""
