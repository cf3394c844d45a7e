"""The `sharefeed` console script. Each command parses its options and settings and calls one library
function; no logic lives here."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import click


def _echo(message: str) -> None:
    click.echo(message, err=True)


_PROTOCOL = click.option(
    "--protocol", type=click.Choice(["auto", "time", "random", "last"]), default=None,
    help="How the holdout is made, for evaluation, selection and the ranker's labels: time (a cut in time), "
         "random (each user's distinct items split at random), last (each user's newest item); auto (the "
         "default) picks time when time has order and its holdout has enough users, else random.")


def _with_protocol(params_file: Path | None, protocol: str | None):  # type: ignore[no-untyped-def]
    from training.params import load_params

    params = load_params(params_file)
    if protocol is None:
        return params
    return params.model_copy(update={"split": params.split.model_copy(update={"protocol": protocol})})


@click.group()
def main() -> None:
    """sharefeed: recommendations and audience segments for social e-commerce."""


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--rejects", type=click.Path(path_type=Path), default=Path("rejects.csv"), show_default=True,
              help="Where to write the refused rows with their row numbers and reasons.")
@click.option("--params", "params_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Training parameters YAML (for configured event types and the reject limit).")
def validate(data_dir: Path, rejects: Path, params_file: Path | None) -> None:
    """Check a data directory: print counts per table and write the rejects file."""
    from features.dataset import RejectLimitError, load_dataset
    from training.params import load_params

    params = load_params(params_file)
    data = load_dataset(data_dir, params.weights.keys())
    data.write_rejects(rejects)
    click.echo(data.summary().to_string(index=False))
    if not data.rejects.empty:
        click.echo("\nrejected rows by reason:")
        for check in data.checks:
            for reason, count in check.reasons().items():
                click.echo(f"  {check.table}: {reason}: {count}")
    click.echo(f"\nrejects written to {rejects}")
    try:
        data.enforce_reject_limit(params.max_reject_share, rejects)
    except RejectLimitError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("demo-data")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--users", default=5_000, show_default=True)
@click.option("--items", default=2_000, show_default=True)
@click.option("--categories", default=20, show_default=True)
@click.option("--days", default=60, show_default=True)
@click.option("--intensity", default=0.6, show_default=True, help="Average activity per user and day.")
@click.option("--seed", default=7, show_default=True)
def demo_data(out: Path, users: int, items: int, categories: int, days: int, intensity: float, seed: int) -> None:
    """Write a realistic synthetic social-commerce data set (deterministic for a seed)."""
    from features.synthetic import DemoDataConfig, generate_demo_data

    config = DemoDataConfig(users=users, items=items, categories=categories, days=days,
                            events_per_user_day=intensity, seed=seed)
    summary = generate_demo_data(out, config, progress=_echo)
    click.echo(f"wrote {summary.events:,} events, {summary.users:,} users, {summary.items:,} items, "
               f"{summary.social_edges:,} social edges, {summary.shares:,} shares to {out}")


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--params", "params_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Training parameters YAML (see docs/training.md).")
@click.option("--rejects", type=click.Path(path_type=Path), help="Default: BUNDLE.rejects.csv beside the bundle.")
@click.option("--now", type=click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"]),
              help="Pin 'now' for time windows (default: the newest event).")
@_PROTOCOL
def train(data_dir: Path, out: Path, params_file: Path | None, rejects: Path | None, now: datetime | None,
          protocol: str | None) -> None:
    """Train, choose the served pipeline on validation, log to MLflow and write the bundle."""
    from features.dataset import RejectLimitError
    from training.pipeline import train as run_training
    from training.settings import TrainingSettings

    settings = TrainingSettings()
    if now is not None:
        settings = settings.model_copy(update={"now": now})
    try:
        run_training(data_dir, out, _with_protocol(params_file, protocol), settings, rejects_path=rejects,
                     say=_echo)
    except RejectLimitError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--params", "params_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Training parameters YAML (see docs/training.md).")
@click.option("--rejects", type=click.Path(path_type=Path), default=Path("rejects.csv"), show_default=True)
@_PROTOCOL
def evaluate(data_dir: Path, params_file: Path | None, rejects: Path, protocol: str | None) -> None:
    """The holdout table (every pipeline on the same users), tracked in MLflow; writes no bundle."""
    from features.dataset import RejectLimitError
    from training.pipeline import evaluate as run_evaluation
    from training.settings import TrainingSettings

    try:
        _, run_id = run_evaluation(data_dir, _with_protocol(params_file, protocol), TrainingSettings(),
                                   rejects_path=rejects, say=_echo)
    except RejectLimitError as exc:
        raise click.ClickException(str(exc)) from exc
    _echo(f"MLflow run {run_id}")


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the best parameters (YAML for train --params).")
@click.option("--budget", "budget_seconds", default=600.0, show_default=True, help="Time budget in seconds.")
@click.option("--trials", "max_trials", type=int, help="Stop after this many trials (default: the budget decides).")
@click.option("--params", "params_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Starting parameters; the search overrides the tuned fields.")
def tune(data_dir: Path, out: Path, budget_seconds: float, max_trials: int | None, params_file: Path | None) -> None:
    """Search parameters with optuna on a validation window before the test cut; each trial is an MLflow run."""
    from training.params import load_params
    from training.settings import TrainingSettings
    from training.tune import tune as run_tuning

    run_tuning(data_dir, load_params(params_file), TrainingSettings(), out, budget_seconds=budget_seconds,
               max_trials=max_trials, say=_echo)


@main.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--users", "users_file", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("-n", "n", default=20, show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
def recommend(bundle: Path, users_file: Path, n: int, out: Path) -> None:
    """Batch feeds: one JSON line per user, {"user_id": ..., "items": [...best first...]}; users who withheld
    personalization or were erased (the event log says so) get the non-personal feed."""
    from serving.batch import read_user_ids, write_recommendations
    from serving.privacy import batch_privacy
    from serving.recommender import Recommender
    from serving.settings import ServingSettings
    from training.bundle import load_bundle

    settings = ServingSettings()
    privacy = batch_privacy(settings.redis_url, settings.redis_prefix, settings.event_log)
    written = write_recommendations(Recommender(load_bundle(bundle)), read_user_ids(users_file), n, out, privacy)
    _echo(f"wrote {written:,} feeds to {out}")


@main.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--kind", required=True, type=click.Choice(["propensity", "lookalike", "lifecycle", "social"]))
@click.option("--item", "item_id", help="propensity: the item; social friends_of_buyers: whose buyers' friends.")
@click.option("--category", help="propensity: any item of this category.")
@click.option("--brand", help="propensity: any item of this brand.")
@click.option("--seeds", "seeds_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="lookalike: a file of seed user ids, one a line.")
@click.option("--method", type=click.Choice(["centroid", "max"]), default="centroid", show_default=True)
@click.option("--group", "groups", multiple=True, help="lifecycle: champions, loyal, at_risk, hibernating, new, "
              "other (repeatable; default all buyers).")
@click.option("--signal", type=click.Choice(["top_sharers", "influencers", "friends_of_buyers", "community"]))
@click.option("--user", "user_id", help="social community: a member.")
@click.option("--top", "size", type=int, default=1000, show_default=True, help="Members at most (0: no limit).")
@click.option("--min-score", type=float, help="Only members scoring at least this.")
@click.option("--active-days", type=int, help="Only users with an event in the last N days.")
@click.option("--bought-category", "bought", multiple=True, help="Only users who bought in this category.")
@click.option("--never-bought-category", "never", multiple=True, help="Only users who never bought in it.")
@click.option("--exclude-buyers", is_flag=True, help="propensity: leave out users who already bought the target.")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="FILE.csv or FILE.parquet: user_id, score and the definition.")
def segment(bundle: Path, kind: str, item_id: str | None, category: str | None, brand: str | None,
            seeds_file: Path | None, method: str, groups: tuple[str, ...], signal: str | None, user_id: str | None,
            size: int, min_score: float | None, active_days: int | None, bought: tuple[str, ...],
            never: tuple[str, ...], exclude_buyers: bool, out: Path) -> None:
    """An audience segment to a file; users erased or opted out of marketing are left out."""
    from pydantic import ValidationError

    from serving.batch import read_user_ids
    from serving.privacy import batch_privacy
    from serving.segment_service import DEFINITION, write_segment
    from serving.segments import SegmentEngine, SegmentError
    from serving.settings import ServingSettings
    from training.bundle import load_bundle

    fields = {"kind": kind, "item_id": item_id, "category": category, "brand": brand, "method": method,
              "seed_user_ids": read_user_ids(seeds_file) if seeds_file else None, "groups": list(groups) or None,
              "signal": signal, "user_id": user_id, "size": size or None, "min_score": min_score,
              "filters": {"active_days": active_days, "bought_categories": list(bought) or None,
                          "never_bought_categories": list(never) or None, "exclude_current_buyers": exclude_buyers}}
    allowed = {"propensity": {"item_id", "category", "brand"}, "lookalike": {"seed_user_ids", "method"},
               "lifecycle": {"groups"}, "social": {"signal", "item_id", "user_id"}}[kind]
    given = {k: v for k, v in fields.items() if v is not None and (k in allowed or k in {"kind", "size", "min_score",
                                                                                           "filters"})}
    try:
        definition = DEFINITION.validate_python(given)
    except ValidationError as exc:
        raise click.UsageError("; ".join(str(e["msg"]) for e in exc.errors())) from exc
    settings = ServingSettings()
    privacy = batch_privacy(settings.redis_url, settings.redis_prefix, settings.event_log)
    try:
        written = write_segment(SegmentEngine(load_bundle(bundle)), definition, privacy, out)
    except SegmentError as exc:
        raise click.ClickException(str(exc)) from exc
    _echo(f"wrote {written:,} members to {out}")


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--model", "model_alias", help="Instead of --bundle: serve the version this MLflow registered-model "
              "alias names (e.g. champion), downloaded and verified.")
@click.option("--host")
@click.option("--port", type=int)
@click.option("--workers", type=int, help="Worker processes (more than one needs SHAREFEED_REDIS_URL).")
def serve(bundle: Path | None, model_alias: str | None, host: str | None, port: int | None,
          workers: int | None) -> None:
    """The HTTP service (OpenAPI at /docs)."""
    import os
    import tempfile

    import uvicorn

    from features.online import open_store
    from serving.metrics import MULTIPROC_ENV
    from serving.runtime import pointer_for
    from serving.server import HTTP_PROTOCOL
    from serving.settings import ServingSettings
    from training.bundle import verify_bundle

    if bundle is not None and model_alias is not None:
        raise click.UsageError("--bundle and --model are alternatives: pass one")
    overrides: dict[str, object] = {
        k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v is not None
    }
    if bundle is not None or model_alias is not None:
        # A source given on the command line replaces both SHAREFEED_BUNDLE and SHAREFEED_MODEL_ALIAS.
        overrides |= {"bundle": bundle, "model_alias": model_alias}
    settings = ServingSettings(**overrides)  # type: ignore[arg-type]
    if settings.bundle is not None and settings.model_alias is not None:
        raise click.UsageError("SHAREFEED_BUNDLE and SHAREFEED_MODEL_ALIAS are both set: serve one of them")
    if settings.model_alias is not None:
        settings = settings.model_copy(update={"bundle": _fetch_bundle(settings.model_alias)})
    if settings.bundle is None:
        raise click.UsageError("no bundle: pass --bundle or --model, or set SHAREFEED_BUNDLE or SHAREFEED_MODEL_ALIAS")
    if settings.workers > 1 and settings.redis_url is None:
        raise click.UsageError("several workers share their online state through Redis: set SHAREFEED_REDIS_URL "
                               "or run one worker")
    bundle_path = settings.bundle.resolve()
    # Every worker builds its settings from the environment; the bundle named here is the one to serve.
    os.environ.update({"SHAREFEED_BUNDLE": str(bundle_path), "SHAREFEED_WORKERS": str(settings.workers),
                       "SHAREFEED_EVENT_LOG": str(settings.event_log.resolve())})
    os.environ.pop("SHAREFEED_MODEL_ALIAS", None)
    if settings.workers > 1:
        version = verify_bundle(bundle_path).bundle_version
        open_store(settings.redis_url, settings.redis_prefix).set_bundle_pointer(pointer_for(bundle_path, version))
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="sharefeed-metrics-")
    uvicorn.run("serving.app:app_from_environment", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level="warning", access_log=False, http=HTTP_PROTOCOL,
                loop="uvloop")


@main.command()
@click.option("--log", "log_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="The event log directory (default: SHAREFEED_EVENT_LOG).")
@click.option("--bundle", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Read item categories from this bundle, for per-category trending.")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"]),
              help="Replay events from this time on (control rows are always replayed).")
def replay(log_dir: Path | None, bundle: Path | None, since: datetime | None) -> None:
    """Rebuild the online store (SHAREFEED_REDIS_URL) from the durable event log, after Redis lost its data.

    Running services do this by themselves when Redis comes back empty; this takes the same lock."""
    import os
    import socket

    from features.online import open_store
    from serving.recovery import rebuild
    from serving.settings import ServingSettings
    from training.bundle import load_bundle

    settings = ServingSettings()
    if settings.redis_url is None:
        raise click.UsageError("replay fills a Redis server: set SHAREFEED_REDIS_URL")
    directory = log_dir or settings.event_log
    category_of = None
    if bundle is not None:
        loaded = load_bundle(bundle)
        categories = dict(zip(loaded.items.ids.tolist(), loaded.item_meta["category"].tolist(), strict=True))

        def category_of(item_id: str) -> str | None:
            value = categories.get(item_id)
            return value if isinstance(value, str) else None
    start = since.replace(tzinfo=since.tzinfo or UTC).timestamp() if since is not None else None
    stats = rebuild(open_store(settings.redis_url, settings.redis_prefix), directory, start, force=True,
                    owner=f"replay:{socket.gethostname()}:{os.getpid()}", category_of=category_of)
    if stats is None:
        raise click.ClickException("a service is rebuilding the online store from the log now: nothing done")
    _echo(f"replayed {stats.events:,} events and {stats.control:,} consent/erasure rows from {directory} "
          f"({stats.skipped:,} rows left out)")


@main.command()
@click.option("--log", "log_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="The event log directory (default: SHAREFEED_EVENT_LOG).")
@click.option("--retention-days", type=click.FloatRange(min=0, min_open=True),
              help="The promise to check: an erased user's events leave the log within this many days (default: "
                   "SHAREFEED_ERASURE_RETENTION_HOURS). Files still held by a writer past it fail the command.")
def compact(log_dir: Path | None, retention_days: float | None) -> None:
    """Remove erased users' events from the event log's closed files (the service also does it on its own)."""
    import time

    from features.compaction import compact_log
    from serving.settings import ServingSettings

    settings = ServingSettings()
    directory = log_dir or settings.event_log
    retention = retention_days * 86_400 if retention_days is not None else settings.erasure_retention_hours * 3600
    report = compact_log(directory, now=time.time(), retention_seconds=retention)
    if report.skipped:
        raise click.ClickException("another compaction is running on this log; try again later")
    _echo(f"compacted {directory}: {report.files_rewritten:,} of {report.files_checked:,} files checked rewritten, "
          f"{report.rows_removed:,} events of erased users removed, {report.rows_redacted:,} events redacted, "
          f"{report.files_busy:,} files in use left for later")
    if report.files_overdue:
        raise click.ClickException(f"{report.files_overdue:,} files in use still hold erased users' events past "
                                   "the retention period")


def _fetch_bundle(alias: str) -> Path:
    from training.bundle import BundleError
    from training.registry import RegistryError, fetch_bundle
    from training.settings import TrainingSettings

    try:
        fetched = fetch_bundle(TrainingSettings(), alias)
    except (RegistryError, BundleError) as exc:
        raise click.ClickException(str(exc)) from exc
    _echo(f"serving {fetched.model}@{alias}: version {fetched.version}, bundle {fetched.bundle_version} "
          f"from {fetched.path}")
    return fetched.path


@main.group()
def keys() -> None:
    """API keys of the service: each with scopes (feed:read, events:write, segments:read, admin)."""


def _keys_file() -> Path:
    from serving.settings import ServingSettings

    return ServingSettings().keys_file


@keys.command("create")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["feed:read", "events:write", "segments:read", "admin"]))
@click.option("--name", default="", help="Who or what the key is for.")
def keys_create(scopes: tuple[str, ...], name: str) -> None:
    """Create a key; it is printed once, on the last line, and stored only as a hash."""
    from serving.auth import Scope, create_key

    path = _keys_file()
    entry, key = create_key(path, [Scope(s) for s in scopes], name)
    _echo(f"key {entry.id} ({', '.join(entry.scopes)}) stored as a hash in {path}; it is shown only now:")
    click.echo(key)


@keys.command("list")
def keys_list() -> None:
    """Keys by id, with name, scopes, creation time and whether revoked (never the key itself)."""
    from serving.auth import list_keys

    for entry in list_keys(_keys_file()):
        state = "revoked" if entry.revoked else "active"
        click.echo(f"{entry.id}  {state:7}  {','.join(entry.scopes):40}  {entry.created_at:%Y-%m-%d %H:%M}  "
                   f"{entry.name}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id; running services refuse it within a second."""
    from serving.auth import revoke_key

    if not revoke_key(_keys_file(), key_id):
        raise click.ClickException(f"no active key {key_id}")
    _echo(f"key {key_id} revoked")


@main.group()
def models() -> None:
    """The model registry: every `train` registers a version; an alias (champion) names the one to serve."""


@models.command("list")
def models_list() -> None:
    """Registered versions, newest first, with aliases, bundle version, headline metric and creation time."""
    from training.registry import RegistryError, versions_table
    from training.settings import TrainingSettings

    try:
        click.echo(versions_table(TrainingSettings()))
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc


@models.command()
@click.argument("version", type=click.IntRange(min=1))
@click.option("--alias", default="champion", show_default=True)
@click.option("--force", is_flag=True, help="Promote even when the candidate is worse than the alias holder or "
              "was measured on another holdout.")
def promote(version: int, alias: str, force: bool) -> None:
    """Point ALIAS at VERSION; refused when it is worse than the current holder on the same holdout."""
    from training.registry import RegistryError
    from training.registry import promote as promote_version
    from training.settings import TrainingSettings

    try:
        change = promote_version(TrainingSettings(), version, alias, force=force)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(change.message)


@models.command()
@click.option("--alias", default="champion", show_default=True)
def rollback(alias: str) -> None:
    """Point ALIAS back at the version it named before its last promotion."""
    from training.registry import RegistryError
    from training.registry import rollback as rollback_alias
    from training.settings import TrainingSettings

    try:
        change = rollback_alias(TrainingSettings(), alias)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(change.message)

if __name__ == "__main__":
    sys.exit(main())
