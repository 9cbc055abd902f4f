"""Uploaded files (models and datasets): receiving the stream (receive.py), recording and deleting rows
(service.py), static screening by format in a child process (screening/)."""
