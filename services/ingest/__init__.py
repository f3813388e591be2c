"""Ingest worker: ``photo.uploaded`` events -> face pipeline -> photo/face rows -> ``faces.indexed``."""
