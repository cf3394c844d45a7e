"""Where training writes: the MLflow tracking store and the local home of the embedded defaults.

Built once in the command-line entry point and passed down; nothing else in training reads the
environment.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHAREFEED_", extra="ignore")

    home: Path = Path.home() / ".sharefeed"  # embedded MLflow store and artifacts live here
    mlflow_uri: str | None = None  # default: SQLite file in `home`, so runs never scatter by directory
    mlflow_experiment: str = "sharefeed"
    registered_model: str = "sharefeed"  # every train run registers its bundle as a version of this model
    now: datetime | None = None  # pin "now" for time windows; default: the newest event seen

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> str:
        return (self.home / "mlartifacts").resolve().as_uri()
