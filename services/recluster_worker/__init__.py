"""Recluster worker: ``python -m services.recluster_worker`` (see worker.py)."""
