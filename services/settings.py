"""Deployment settings of the services (where caches live, how the API listens), apart from the
library's own settings (``facecore.settings``); same ``FACECLUSTER_`` prefix and TOML file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from facecore.settings import _TomlSource


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACECLUSTER_", extra="ignore")

    thumbnail_cache: Path = Field(Path("var/thumbnails"), description="folder of cached face thumbnails (a "
                                  "cache: safe to delete; entries of deleted photos and users are removed)")
    api_host: str = Field("127.0.0.1", description="address `facecluster serve` listens on")
    api_port: int = Field(8000, ge=1, le=65535, description="port `facecluster serve` listens on")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _TomlSource(settings_cls), file_secret_settings)
