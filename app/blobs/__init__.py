"""Content-addressed blobs: the stores (store.py: local disk, S3) and who refers to a blob (references.py: lock,
in use, release)."""
