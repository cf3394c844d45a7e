"""Id vocabularies: external ids (strings) to dense row indexes and back.

A vocabulary is built once per training run and travels inside the bundle; serving never rebuilds it,
so an index always means the row it meant when the factors were fitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

_DICT_LOOKUP_MAX = 10_000  # below this many ids, look each up in the dict


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """An ordered set of external ids; `index_of` and `ids` are inverse maps."""

    ids: np.ndarray  # object array of str, position = dense index
    _index: dict[str, int] = field(repr=False, compare=False)

    @classmethod
    def from_ids(cls, ids: Iterable[str]) -> Vocabulary:
        """Ids in order of first appearance; repeats are ignored."""
        ordered = pd.unique(pd.Series(list(ids) if not isinstance(ids, pd.Series) else ids, dtype="str"))
        array = np.asarray(ordered, dtype=object)
        return cls(array, {str(v): i for i, v in enumerate(array)})

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, external_id: object) -> bool:
        return external_id in self._index

    def index_of(self, external_id: str) -> int | None:
        return self._index.get(external_id)

    def indexes(self, external_ids: Sequence[str] | pd.Series) -> np.ndarray:
        """Dense indexes for many ids at once; -1 where an id is unknown."""
        if len(external_ids) <= _DICT_LOOKUP_MAX:  # a request's handful: no hash table of the whole vocabulary
            get = self._index.get
            return np.fromiter((-1 if v is None or v != v else get(str(v), -1) for v in external_ids),
                               dtype=np.int64, count=len(external_ids))
        series = pd.Series(external_ids, dtype="str")
        codes = pd.Index(self.ids).get_indexer(series)
        return np.asarray(codes, dtype=np.int64)

    def id_of(self, idx: int) -> str:
        return str(self.ids[idx])

    def save(self, path: Path) -> None:
        pq.write_table(pa.table({"id": pa.array(self.ids.tolist(), type=pa.string())}), path)

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        ids = pq.read_table(path).column("id").to_pylist()
        array = np.asarray(ids, dtype=object)
        return cls(array, {v: i for i, v in enumerate(ids)})
