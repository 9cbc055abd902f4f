"""Teams: per-team limits and usage (limits.py)."""
