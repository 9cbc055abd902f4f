"""The job queue: enqueue by task name and the Celery settings (broker.py), the embedded filesystem broker
(broker_files.py)."""
