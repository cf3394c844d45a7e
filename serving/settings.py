"""Deployment settings of the HTTP service: which bundle, where to listen. No model hyperparameters:
everything about the model comes from the bundle."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHAREFEED_", extra="ignore")

    bundle: Path | None = None
    model_alias: str | None = None  # or serve what an MLflow registered-model alias names (resolved by the CLI)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_n: int = Field(200, ge=1)  # the largest feed a caller may ask for
