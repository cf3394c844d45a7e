"""The model registry: each trained bundle is a version of an MLflow registered model, an alias names the one
to serve. Promotion compares candidate and alias holder on the same holdout, rollback walks the alias back, and
`fetch_bundle` turns an alias into a verified local bundle. mlflow is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from training.bundle import BundleError, HoldoutInfo, Manifest, load_bundle
from training.params import SplitParams
from training.settings import TrainingSettings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

# The metric promotion compares, first present wins: the served list's NDCG@20 on the holdout (the ranker's
# when the bundle has one, else the ALS retriever's). Higher is better.
HEADLINE_METRICS = ("ranker.ndcg_at_20", "als.ndcg_at_20", "validation.served.ndcg_at_20")
DEFAULT_ALIAS = "champion"
HISTORY_LENGTH = 50  # earlier holders kept per alias for rollback

TAG_BUNDLE_VERSION = "bundle_version"
TAG_PARAMS_DIGEST = "params_digest"
TAG_DATA_DIGEST = "data_digest"
TAG_HOLDOUT = "holdout"  # human-readable: kind and cut
TAG_HOLDOUT_SIGNATURE = "holdout_signature"
TAG_METRIC = "headline_metric"
TAG_METRIC_VALUE = "headline_value"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RegistryError(ValueError):
    """The registry cannot do what was asked: unknown model, version or alias, nothing to roll back to."""


class PromotionRefusedError(RegistryError):
    """The candidate must not replace the alias holder (worse, or not comparable); `--force` overrides."""


@dataclass(frozen=True, slots=True)
class AliasChange:
    """What a promotion or rollback did; `previous` is the version the alias named before (None: none)."""

    alias: str
    version: int
    previous: int | None
    message: str


@dataclass(frozen=True, slots=True)
class FetchedBundle:
    """A registered bundle, downloaded and verified, ready to serve from `path`."""

    path: Path
    model: str
    version: int
    bundle_version: str


# --- what a version is measured on ------------------------------------------------------------------------

def data_digest(events: pd.DataFrame) -> str:
    """A digest of the events' (user_id, item_id, event_type, ts), independent of row order.

    One 64-bit hash per row (pandas' vectorized hashing: about 0.4 s for 1M rows, where sha256 over
    formatted rows in Python takes minutes), sorted so that file order does not matter, then sha256.
    Times are hashed at one fixed unit, since pandas may hold them in seconds, micro- or nanoseconds.
    """
    frame = pd.DataFrame({
        "user_id": events["user_id"].astype("str"),
        "item_id": events["item_id"].astype("str"),
        "event_type": events["event_type"].astype("str"),
        "ts": events["ts"].dt.tz_convert("UTC").dt.as_unit("ns"),
    })
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)
    return hashlib.sha256(np.sort(rows).tobytes()).hexdigest()[:16]


def holdout_signature(holdout: HoldoutInfo, data: str, split: SplitParams) -> str:
    """Two versions with the same signature were measured on the same test events: their metrics compare.

    A time holdout is fixed by its kind, its cut and the data; the random per-user split also by its seed
    and test fraction.
    """
    cut = holdout.cut.astimezone(UTC).isoformat() if holdout.cut is not None else "none"
    parts = [holdout.kind, cut, data]
    if holdout.cut is None:
        parts += [str(split.random_seed), repr(split.test_fraction)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def headline_metric(metrics: dict[str, float]) -> tuple[str, float] | None:
    for key in HEADLINE_METRICS:
        if key in metrics:
            return key, float(metrics[key])
    return None


# --- MLflow plumbing ----------------------------------------------------------------------------------------

def _client(settings: TrainingSettings) -> MlflowClient:
    from mlflow import MlflowClient

    settings.home.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


@contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    """MLflow's errors as RegistryError, so the command line can print them as one clear line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"{what}: {exc.message}") from exc


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        try:
            client.create_registered_model(name, description="sharefeed bundles, one version per train run")
        except MlflowException as again:  # created meanwhile by a concurrent run
            if getattr(again, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise


def _aliases(client: MlflowClient, name: str) -> dict[str, int]:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _is_missing(exc):
            raise RegistryError(f"no registered model {name!r} yet: train a bundle first") from exc
        raise
    return {alias: int(version) for alias, version in model.aliases.items()}


def _version(client: MlflowClient, name: str, version: int) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _is_missing(exc):
            raise RegistryError(f"model {name!r} has no version {version}") from exc
        raise


def _history_tag(alias: str) -> str:
    return f"alias_history.{alias}"


def _history(client: MlflowClient, name: str, alias: str) -> list[int]:
    raw = client.get_registered_model(name).tags.get(_history_tag(alias))
    return [int(v) for v in json.loads(raw)] if raw else []


def _set_history(client: MlflowClient, name: str, alias: str, history: list[int]) -> None:
    client.set_registered_model_tag(name, _history_tag(alias), json.dumps(history[-HISTORY_LENGTH:]))


# --- registration -------------------------------------------------------------------------------------------

def register_bundle(settings: TrainingSettings, run_id: str, manifest: Manifest, events: pd.DataFrame,
                    split: SplitParams) -> int:
    """Register the bundle the run logged under "bundle" as a new version; returns the version number."""
    name = settings.registered_model
    client = _client(settings)
    digest = data_digest(events)
    cut = manifest.holdout.cut.astimezone(UTC).isoformat() if manifest.holdout.cut is not None else "none"
    tags = {
        TAG_BUNDLE_VERSION: manifest.bundle_version,
        TAG_PARAMS_DIGEST: manifest.params_digest,
        TAG_DATA_DIGEST: digest,
        TAG_HOLDOUT: f"{manifest.holdout.kind} @ {cut}",
        TAG_HOLDOUT_SIGNATURE: holdout_signature(manifest.holdout, digest, split),
    }
    headline = headline_metric(manifest.metrics)
    if headline is not None:
        tags[TAG_METRIC], tags[TAG_METRIC_VALUE] = headline[0], repr(headline[1])
    with _mlflow_errors(f"registering the bundle of run {run_id} as model {name!r}"):
        _ensure_registered_model(client, name)
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/bundle"
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        client.set_tag(run_id, "registered_model_version", f"{name}/{version.version}")
    return int(version.version)


# --- promotion and rollback ---------------------------------------------------------------------------------

def _refusal(candidate: ModelVersion, holder: ModelVersion) -> str | None:
    """Why `candidate` must not replace `holder`, or None when it may."""
    c_sig, h_sig = candidate.tags.get(TAG_HOLDOUT_SIGNATURE), holder.tags.get(TAG_HOLDOUT_SIGNATURE)
    if not c_sig or not h_sig:
        missing = candidate.version if not c_sig else holder.version
        return f"version {missing} has no holdout signature, so the two cannot be compared"
    if c_sig != h_sig:
        return (f"version {candidate.version} and version {holder.version} were measured on different holdouts "
                f"({candidate.tags.get(TAG_HOLDOUT, '?')} vs {holder.tags.get(TAG_HOLDOUT, '?')}; signatures "
                f"{c_sig} vs {h_sig}) and must be compared on the same data: retrain one on the other's data "
                f"and holdout")
    c_key, h_key = candidate.tags.get(TAG_METRIC), holder.tags.get(TAG_METRIC)
    if not c_key or not h_key:
        missing = candidate.version if not c_key else holder.version
        return f"version {missing} has no headline metric (one of {', '.join(HEADLINE_METRICS)})"
    c_value, h_value = float(candidate.tags[TAG_METRIC_VALUE]), float(holder.tags[TAG_METRIC_VALUE])
    if c_value < h_value:
        return (f"version {candidate.version} is worse than version {holder.version} on the same holdout: "
                f"{c_key} {c_value:.4f} < {h_key} {h_value:.4f}")
    return None


def promote(settings: TrainingSettings, version: int, alias: str = DEFAULT_ALIAS, *,
            force: bool = False) -> AliasChange:
    """Point `alias` at `version`, unless it is worse than the current holder or not comparable with it."""
    name = settings.registered_model
    client = _client(settings)
    with _mlflow_errors(f"promoting {name} version {version} to {alias!r}"):
        holder_version = _aliases(client, name).get(alias)
        candidate = _version(client, name, version)
        if holder_version == version:
            return AliasChange(alias, version, holder_version, f"{alias} already names version {version}")
        note = ""
        if holder_version is not None:
            refusal = _refusal(candidate, _version(client, name, holder_version))
            if refusal is not None and not force:
                raise PromotionRefusedError(f"promotion refused: {refusal}; {alias} stays on version "
                                       f"{holder_version} (--force overrides)")
            if refusal is not None:
                note = f" (forced: {refusal})"
            history = _history(client, name, alias)
            _set_history(client, name, alias, [*history, holder_version])
        client.set_registered_model_alias(name, alias, str(version))
    before = f"version {holder_version}" if holder_version is not None else "nothing"
    return AliasChange(alias, version, holder_version,
                       f"{name}@{alias}: version {version} (was {before}){note}")


def rollback(settings: TrainingSettings, alias: str = DEFAULT_ALIAS) -> AliasChange:
    """Point `alias` back at the version it named before its last promotion."""
    name = settings.registered_model
    client = _client(settings)
    with _mlflow_errors(f"rolling back {name}@{alias}"):
        current = _aliases(client, name).get(alias)
        history = _history(client, name, alias)
        if not history:
            raise RegistryError(f"{name}@{alias} has no earlier version to roll back to")
        previous = history[-1]
        _version(client, name, previous)  # refuse, with the history intact, when it was deleted
        client.set_registered_model_alias(name, alias, str(previous))
        _set_history(client, name, alias, history[:-1])
    was = f"version {current}" if current is not None else "nothing"
    return AliasChange(alias, previous, current, f"{name}@{alias}: rolled back to version {previous} (was {was})")


# --- listing --------------------------------------------------------------------------------------------------

def list_versions(settings: TrainingSettings) -> pd.DataFrame:
    """One row per registered version, newest first: aliases, bundle version, headline metric, created."""
    name = settings.registered_model
    client = _client(settings)
    with _mlflow_errors(f"listing the versions of {name}"):
        by_version: dict[int, list[str]] = {}
        for alias, version in _aliases(client, name).items():
            by_version.setdefault(version, []).append(alias)
        versions: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = client.search_model_versions(f"name = '{name}'", page_token=token)
            versions.extend(page)
            token = page.token
            if not token:
                break
    rows = [
        {
            "version": int(v.version),
            "aliases": ",".join(sorted(by_version.get(int(v.version), []))),
            "bundle_version": v.tags.get(TAG_BUNDLE_VERSION, ""),
            "metric": v.tags.get(TAG_METRIC, ""),
            "value": float(v.tags[TAG_METRIC_VALUE]) if TAG_METRIC_VALUE in v.tags else float("nan"),
            "holdout": v.tags.get(TAG_HOLDOUT_SIGNATURE, ""),
            "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"),
        }
        for v in versions
    ]
    columns = ["version", "aliases", "bundle_version", "metric", "value", "holdout", "created"]
    return pd.DataFrame(rows, columns=columns).sort_values("version", ascending=False, ignore_index=True)


def versions_table(settings: TrainingSettings) -> str:
    """`list_versions` as text for the terminal."""
    frame = list_versions(settings)
    if frame.empty:
        return f"no versions of {settings.registered_model} are registered yet"
    return frame.to_string(index=False, float_format=lambda x: f"{x:.4f}")


# --- serving from an alias -------------------------------------------------------------------------------------

def _checked(path: Path, bundle_version: str, what: str) -> None:
    """Refuse a bundle that fails `load_bundle` or is not the bundle the registry says it is."""
    try:
        loaded = load_bundle(path)
    except BundleError as exc:
        raise BundleError(f"{what} is corrupt and will not be served: {exc}") from exc
    if loaded.version != bundle_version:
        raise BundleError(f"{what} holds bundle {loaded.version}, but the registry says {bundle_version}; "
                          "it will not be served")


def fetch_bundle(settings: TrainingSettings, alias: str) -> FetchedBundle:
    """The bundle `alias` names, downloaded into `home/bundles/<bundle_version>` and verified.

    A cached copy that still verifies is reused; one that does not is replaced by a fresh download. The
    download goes to a temporary folder beside the cache and is renamed into place only once it verifies,
    so a corrupt bundle never enters the cache.
    """
    import mlflow

    name = settings.registered_model
    client = _client(settings)
    with _mlflow_errors(f"resolving {name}@{alias}"):
        version = client.get_model_version_by_alias(name, alias)
    bundle_version = version.tags.get(TAG_BUNDLE_VERSION, "")
    what = f"{name}@{alias} (version {version.version}, bundle {bundle_version or '?'})"
    if not _SAFE_NAME.match(bundle_version):
        raise RegistryError(f"{what} has no usable {TAG_BUNDLE_VERSION} tag: {bundle_version!r}")
    cache_root = settings.home / "bundles"
    cache = cache_root / bundle_version
    fetched = FetchedBundle(cache, name, int(version.version), bundle_version)
    if cache.is_dir():
        try:
            _checked(cache, bundle_version, f"the cached copy of {what} at {cache}")
            return fetched
        except BundleError:
            shutil.rmtree(cache)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_version}.", dir=cache_root))
    try:
        with _mlflow_errors(f"downloading {what} from {version.source}"):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp),
                                                             tracking_uri=settings.tracking_uri))
        _checked(local, bundle_version, f"the downloaded bundle of {what}")
        if not cache.exists():  # a concurrent fetch may have put the same bundle there first
            local.rename(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fetched
