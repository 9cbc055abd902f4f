"""A job's statuses and priority scale: plain values shared by the tables, the wire schemas and the queue."""

# Job priority, 0 (lowest) to 9 (highest); app/queue/broker.py turns it into the broker's own scale.
DEFAULT_PRIORITY = 5
MAX_PRIORITY = 9
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceling", "canceled")
TERMINAL_STATUSES = ("succeeded", "failed", "canceled")
