"""Cluster worker: ``faces.indexed`` events -> faces assigned to persons, new persons formed."""
