"""MLflow bookkeeping for a training run: params, metrics, the rejects and the bundle as artifacts.

The experiment is created with an artifact root next to the tracking store, so artifacts do not land in
whatever directory the command happened to run from.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.settings import TrainingSettings


@contextmanager
def tracked_run(settings: TrainingSettings, run_name: str) -> Iterator[str]:
    """Open an MLflow run in the configured store; yields its id."""
    import mlflow

    settings.home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(settings.mlflow_experiment, artifact_location=settings.artifact_root)
    )
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        yield run.info.run_id


def log_params(params: dict[str, str]) -> None:
    import mlflow

    mlflow.log_params({k: v[:6000] for k, v in params.items()})


def log_metrics(metrics: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in metrics.items()})


def log_artifacts(path: Path, artifact_path: str) -> None:
    import mlflow

    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_metric_curves(curves: dict[str, dict[str, list[float]]], ks: tuple[int, ...]) -> None:
    """One figure per metric (value against K, a line per model), saved as run artifacts under plots/."""
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt
    import mlflow

    metrics = sorted({metric for per_model in curves.values() for metric in per_model})
    for metric in metrics:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for model, per_model in curves.items():
            axes.plot(ks, per_model[metric], marker="o", label=model)
        axes.set_xlabel("K")
        axes.set_ylabel(f"{metric}@K")
        axes.set_title(f"{metric}@K on the holdout")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        mlflow.log_figure(figure, f"plots/{metric}_at_k.png")
        plt.close(figure)
