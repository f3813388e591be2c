"""Deployment settings of the services (where caches live, how the API listens), apart from the
library's own settings (``facecore.settings``); same ``FACECLUSTER_`` prefix and TOML file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from facecore.settings import FaceclusterSettings


class ServiceSettings(FaceclusterSettings):
    thumbnail_cache: Path = Field(Path("var/thumbnails"), description="folder of cached face thumbnails (a "
                                  "cache: safe to delete; entries of deleted photos and users are removed)")
    api_host: str = Field("127.0.0.1", description="address `facecluster serve` listens on")
    api_port: int = Field(8000, ge=1, le=65535, description="port `facecluster serve` listens on")


class ClusterWorkerSettings(FaceclusterSettings):
    """What the cluster worker reads beyond the library's settings."""

    cluster_cache_mb: int = Field(1024, ge=1, description="memory the cluster worker's copies of its users may "
                                  "hold, in MB (faces, persons, unassigned pool); least recently used users are "
                                  "dropped and read again from the database when they next have new faces")
