"""What tests/ and bench/ share (docs/architecture.md): real stacks of API, workers and services (stack.py), the
model zoo (modelzoo.py), a local S3 server (s3.py), a webhook receiver (webhook_receiver.py) and a fleet of
workers on one bucket (fleet.py). Nothing here is a test; tests/ and bench/ import it, never each other."""
