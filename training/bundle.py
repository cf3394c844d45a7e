"""The bundle: one versioned directory with everything serving needs to answer for a model.

Writing happens in a temporary directory that is renamed into place, so a reader never sees half a
bundle; loading checks the schema version and the checksum of every file and refuses on any mismatch.
This module and `features` are all of training that serving imports.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, ValidationError

from features.attribution import ITEM_COLUMNS as ITEM_SHARE_COLUMNS
from features.attribution import USER_COLUMNS as USER_INFLUENCE_COLUMNS
from features.candidates import CandidateModels
from features.popularity import ItemPopularity
from features.propensity import PropensityModel
from features.ranking import FEATURE_NAMES
from features.repurchase import RepurchasePolicy
from features.served import ItemWeights
from features.social import SocialGraph
from features.state import FeatureState, load_state, save_state
from features.vocab import Vocabulary

SCHEMA_VERSION = 5  # 4: social graph, user influence, item share stats; 5: the served pipeline and its item weights
MANIFEST = "manifest.json"
ITEM_META_COLUMNS = ("category", "brand", "title", "price", "in_stock", "created_at")


class BundleError(ValueError):
    """A bundle that must not be served: missing, tampered with, or of another schema."""


class DataWindow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    start: datetime
    end: datetime  # newest event seen
    now: datetime  # the moment time windows are measured back from


class HoldoutInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    cut: datetime | None
    note: str


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    factors: int
    regularization: float
    alpha: float
    confidence_scale: str
    index_kind: str
    ef_search: int


class ServedInfo(BaseModel):
    """The pipeline that answers feeds (features.served.Pipeline), chosen on validation, and its evidence."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pipeline: str
    candidate: str  # the setting that won, e.g. "ease_l200" or "als_linear"
    parts: list[str] = []  # fused: the pipelines blended, leading one first ...
    weights: list[float] = []  # ... and their weights
    exclude_seen: bool  # lists leave out items the user already interacted with (repeat buys aside)
    protocol: str  # the evaluation protocol it was chosen under: time, random or last
    note: str
    evidence: dict[str, float] = {}


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int
    bundle_version: str
    created_at: datetime
    params_digest: str
    feature_set_digest: str
    data_window: DataWindow
    holdout: HoldoutInfo
    windows: dict[str, str]  # T0..T3 of the two-stage evaluation (empty when no ranker was trained)
    categories: list[str]  # category codes of the feature state
    brands: list[str]
    candidates: dict[str, int]  # items each source proposes per user
    union_size: int  # candidates ranked per user
    feature_names: list[str] = list(FEATURE_NAMES)
    model: ModelInfo
    repurchase: RepurchasePolicy
    event_weights: dict[str, float]
    counts: dict[str, int]
    metrics: dict[str, float]
    mlflow_run_id: str | None
    files: dict[str, str]  # file name -> sha256
    social: dict[str, float] = {}  # attribution window and global share rates (the priors of features.attribution)
    # segments' propensity model per target kind (item, category, brand); a kind without one, and every bundle
    # written before it existed, is scored with the fixed formula (features.propensity.fixed_score)
    propensity: dict[str, PropensityModel] = {}
    served: ServedInfo


@dataclass(frozen=True, slots=True)
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    manifest: Manifest
    users: Vocabulary
    items: Vocabulary
    item_meta: pd.DataFrame  # one row per item idx, ITEM_META_COLUMNS
    user_factors: np.ndarray
    item_factors: np.ndarray
    item_gram: np.ndarray
    index: faiss.Index
    bought: sp.csr_matrix  # users x items, 1 where the user bought the item
    recent: sp.csr_matrix  # users x items, epoch seconds of the last positive event (latest items only)
    popularity: ItemPopularity
    models: CandidateModels
    state: FeatureState
    ranker_text: str | None  # LightGBM model; None when the data had no time order to train one
    bought_together: sp.csr_matrix  # items x items: each item's co-purchase companions (features.copurchase)
    social_graph: SocialGraph  # who reaches whom; its first len(users) ids are `users` in order (features.social)
    user_influence: pd.DataFrame  # by user_id: share funnel and influence (features.attribution.USER_COLUMNS)
    item_share_stats: pd.DataFrame  # by item_id: share rate, referral conversion, viral coefficient
    item_weights: ItemWeights | None  # the served neighbour / EASE pipeline's items x items weights

    @property
    def version(self) -> str:
        return self.manifest.bundle_version


@dataclass(frozen=True, slots=True)
class BundleContents:
    """What training hands over to be written."""

    users: Vocabulary
    items: Vocabulary
    item_meta: pd.DataFrame
    user_factors: np.ndarray
    item_factors: np.ndarray
    item_gram: np.ndarray
    index: faiss.Index
    bought: sp.csr_matrix
    recent: sp.csr_matrix
    popularity: ItemPopularity
    models: CandidateModels
    state: FeatureState
    ranker_text: str | None
    bought_together: sp.csr_matrix
    social_graph: SocialGraph
    user_influence: pd.DataFrame
    item_share_stats: pd.DataFrame
    item_weights: ItemWeights | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_items(path: Path, contents: BundleContents) -> None:
    meta = contents.item_meta.reset_index(drop=True)
    columns = {c: pa.Array.from_pandas(meta[c]) for c in ITEM_META_COLUMNS if c != "created_at"}
    # UTC instants as naive numpy values, typed back as UTC (the tz-aware .values path is deprecated).
    created = meta["created_at"].dt.tz_convert(None).to_numpy()
    columns["created_at"] = pa.array(created, type=pa.timestamp("ns", tz="UTC"), from_pandas=True)
    columns["popular"] = pa.array(contents.popularity.popular)
    columns["trending"] = pa.array(contents.popularity.trending)
    pq.write_table(pa.table(columns), path)


def _write_keyed(path: Path, frame: pd.DataFrame, key: str, columns: tuple[str, ...]) -> None:
    table = frame[list(columns)].rename_axis(key).reset_index()
    table[key] = table[key].astype("str")
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)


def _read_keyed(path: Path, key: str, columns: tuple[str, ...]) -> pd.DataFrame:
    frame: pd.DataFrame = pq.read_table(path).to_pandas().set_index(key)
    return frame[list(columns)]


def write_bundle(out: Path, contents: BundleContents, manifest: Manifest) -> Manifest:
    """Write the bundle to `out` (replacing what is there) and return the manifest with checksums."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        contents.users.save(tmp / "users.parquet")
        contents.items.save(tmp / "items.parquet")
        _write_items(tmp / "item_meta.parquet", contents)
        np.save(tmp / "user_factors.npy", contents.user_factors)
        np.save(tmp / "item_factors.npy", contents.item_factors)
        np.save(tmp / "item_gram.npy", contents.item_gram)
        faiss.write_index(contents.index, str(tmp / "items_ip.faiss"))
        sp.save_npz(tmp / "bought.npz", contents.bought.tocsr(), compressed=False)
        sp.save_npz(tmp / "recent.npz", contents.recent.tocsr(), compressed=False)
        np.save(tmp / "bpr_user_factors.npy", contents.models.bpr_users)
        np.save(tmp / "bpr_item_factors.npy", contents.models.bpr_items)
        sp.save_npz(tmp / "item_neighbours.npz", contents.models.item_neighbours.tocsr(), compressed=False)
        sp.save_npz(tmp / "bought_together.npz", contents.bought_together.tocsr(), compressed=False)
        save_state(contents.state, tmp)
        contents.social_graph.save(tmp)
        _write_keyed(tmp / "user_influence.parquet", contents.user_influence, "user_id", USER_INFLUENCE_COLUMNS)
        _write_keyed(tmp / "item_share_stats.parquet", contents.item_share_stats, "item_id", ITEM_SHARE_COLUMNS)
        if contents.ranker_text is not None:
            (tmp / "ranker.txt").write_text(contents.ranker_text)
        if contents.item_weights is not None:
            sp.save_npz(tmp / "item_weights.npz", contents.item_weights.weights.tocsr(), compressed=False)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        content_digest = hashlib.sha256("".join(f"{k}{v}" for k, v in files.items()).encode()).hexdigest()
        created = datetime.now(UTC)
        final = manifest.model_copy(
            update={
                "files": files,
                "created_at": created,
                "bundle_version": f"{created:%Y%m%dT%H%M%S}-{content_digest[:8]}",
            }
        )
        (tmp / MANIFEST).write_text(final.model_dump_json(indent=2))
        for path in tmp.iterdir():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: Path) -> Manifest:
    manifest_path = Path(path) / MANIFEST
    try:  # a path the file system refuses (name too long, no permission) is no bundle either
        if not manifest_path.is_file():
            raise BundleError(f"{str(path)[:200]} is not a bundle: no {MANIFEST}")
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{str(path)[:200]} cannot be read as a bundle: {exc.strerror or exc}") from exc
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise BundleError(f"{manifest_path} is not a valid manifest: {exc.error_count()} error(s)") from exc
    if manifest.schema_version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {manifest.schema_version} is not supported (expected {SCHEMA_VERSION})"
        )
    return manifest


def verify_bundle(path: Path) -> Manifest:
    """The manifest, after checking that every listed file is there with its checksum."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest.files.items():
        file = path / name
        try:
            if not file.is_file():
                raise BundleError(f"bundle {path} lacks {name}")
            digest = _sha256(file)
        except OSError as exc:
            raise BundleError(f"bundle {path}: cannot read {name}: {exc.strerror or exc}") from exc
        if digest != expected:
            raise BundleError(f"bundle {path}: checksum mismatch for {name}")
    return manifest


def load_bundle(path: Path) -> Bundle:
    """Load a bundle for serving, refusing it on any integrity problem."""
    path = Path(path)
    manifest = verify_bundle(path)
    if tuple(manifest.feature_names) != FEATURE_NAMES:
        # checked before the arrays are read: another feature list may also mean other arrays in the state
        missing = [name for name in FEATURE_NAMES if name not in manifest.feature_names]
        raise BundleError(f"bundle {path} was trained with another feature list ({len(manifest.feature_names)} "
                          f"columns, this version has {len(FEATURE_NAMES)}; missing: "
                          f"{', '.join(missing[:5]) or 'none'}): train it again with this version")
    try:
        items = Vocabulary.load(path / "items.parquet")
        meta = pq.read_table(path / "item_meta.parquet").to_pandas()
        # The ALS factors are the retrieval vectors and the als source's model: one copy serves both.
        user_factors = np.load(path / "user_factors.npy", allow_pickle=False)
        item_factors = np.load(path / "item_factors.npy", allow_pickle=False)
        bundle = Bundle(
            path=path,
            manifest=manifest,
            users=Vocabulary.load(path / "users.parquet"),
            items=items,
            item_meta=meta[list(ITEM_META_COLUMNS)],
            user_factors=user_factors,
            item_factors=item_factors,
            item_gram=np.load(path / "item_gram.npy", allow_pickle=False),
            index=faiss.read_index(str(path / "items_ip.faiss")),
            bought=sp.load_npz(path / "bought.npz").tocsr(),
            recent=sp.load_npz(path / "recent.npz").tocsr(),
            models=CandidateModels(
                als_users=user_factors,
                als_items=item_factors,
                bpr_users=np.load(path / "bpr_user_factors.npy", allow_pickle=False),
                bpr_items=np.load(path / "bpr_item_factors.npy", allow_pickle=False),
                item_neighbours=sp.load_npz(path / "item_neighbours.npz").tocsr(),
            ),
            state=load_state(path),
            ranker_text=(path / "ranker.txt").read_text() if (path / "ranker.txt").is_file() else None,
            bought_together=sp.load_npz(path / "bought_together.npz").tocsr(),
            social_graph=SocialGraph.load(path),
            user_influence=_read_keyed(path / "user_influence.parquet", "user_id", USER_INFLUENCE_COLUMNS),
            item_share_stats=_read_keyed(path / "item_share_stats.parquet", "item_id", ITEM_SHARE_COLUMNS),
            popularity=ItemPopularity(
                popular=meta["popular"].to_numpy(np.float32), trending=meta["trending"].to_numpy(np.float32)
            ),
            item_weights=(ItemWeights(sp.load_npz(path / "item_weights.npz").tocsr(),
                                      binary="ease" in (manifest.served.pipeline, *manifest.served.parts))
                          if (path / "item_weights.npz").is_file() else None),
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise BundleError(f"bundle {path} cannot be loaded: {exc}") from exc
    n_users, n_items = len(bundle.users), len(bundle.items)
    checks = {
        "user_factors rows": (bundle.user_factors.shape[0], n_users),
        "item_factors rows": (bundle.item_factors.shape[0], n_items),
        "item_meta rows": (len(bundle.item_meta), n_items),
        "index size": (bundle.index.ntotal, n_items),
        "bought shape": (bundle.bought.shape, (n_users, n_items)),
        "recent shape": (bundle.recent.shape, (n_users, n_items)),
        "state pairs shape": (bundle.state.pair_last.shape, (n_users, n_items)),
        "neighbours shape": (bundle.models.item_neighbours.shape, (n_items, n_items)),
        "bought_together shape": (bundle.bought_together.shape, (n_items, n_items)),
        "item weights": ((bundle.item_weights.weights.shape if bundle.item_weights is not None else None),
                         ((n_items, n_items) if {"item_knn", "ease"} & {manifest.served.pipeline,
                                                                        *manifest.served.parts} else None)),
        "social graph's leading users": (bool(np.array_equal(bundle.social_graph.users.ids[:n_users],
                                                             bundle.users.ids)), True),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise BundleError(f"bundle {path}: {what} is {got}, expected {want}")
    return bundle
