"""Co-purchase pairs from hand-made baskets: who is bought with whom, and why popular items do not win."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from features.copurchase import CopurchaseConfig, basket_items, bought_together, top_per_row
from features.vocab import Vocabulary

DAY = pd.Timestamp("2026-03-02T09:00:00Z")


def _events(rows: list[tuple[str, str, str, int]], session: list[str | None] | None = None) -> pd.DataFrame:
    """(user, item, event_type, day offset) rows; purchases at 09:00 UTC of that day."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "day"])
    frame["ts"] = DAY + pd.to_timedelta(frame.pop("day"), unit="D")
    if session is not None:
        frame["session_id"] = pd.Series(session, dtype="str")
    return frame


def _companions(matrix: sp.csr_matrix, items: Vocabulary, item: str) -> list[str]:
    row = matrix.getrow(items.index_of(item) or 0)
    order = np.lexsort((row.indices, -row.data))
    return [items.id_of(int(c)) for c in row.indices[order]]


def test_pairs_come_from_the_same_user_and_day() -> None:
    rows = []
    for u in range(3):  # three users buy a phone and its case on the same day
        rows += [(f"u{u}", "phone", "purchase", 0), (f"u{u}", "case", "add_to_cart", 0)]
    for u in range(3):  # the same pair bought on different days, or by different users, is no pair
        rows += [(f"v{u}", "shoes", "purchase", 0), (f"v{u}", "socks", "purchase", 1)]
        rows += [(f"w{u}", "shoes", "purchase", 0)]
        rows += [(f"x{u}", "socks", "purchase", 0)]
    rows += [("u0", "tv", "view", 0), ("u1", "tv", "view", 0)]  # views are not baskets
    events = _events(rows)
    items = Vocabulary.from_ids(events["item_id"])
    matrix = bought_together(events, items, CopurchaseConfig(min_support=2))
    assert _companions(matrix, items, "phone") == ["case"]
    assert _companions(matrix, items, "case") == ["phone"]
    assert _companions(matrix, items, "shoes") == []
    assert _companions(matrix, items, "tv") == []
    assert matrix.shape == (len(items), len(items))
    assert matrix.diagonal().sum() == 0


def test_min_support_drops_one_off_pairs() -> None:
    events = _events([("u0", "a", "purchase", 0), ("u0", "b", "purchase", 0), ("u1", "c", "purchase", 0)])
    items = Vocabulary.from_ids(events["item_id"])
    assert bought_together(events, items, CopurchaseConfig(min_support=2)).nnz == 0
    assert _companions(bought_together(events, items, CopurchaseConfig(min_support=1)), items, "a") == ["b"]


def test_sessions_are_baskets_when_asked() -> None:
    rows = [("u0", "a", "purchase", 0), ("u0", "b", "purchase", 0), ("u1", "a", "purchase", 0),
            ("u1", "b", "purchase", 0), ("u2", "c", "purchase", 0)]
    items = Vocabulary.from_ids(["a", "b", "c"])
    by_session = CopurchaseConfig(basket="session")
    same_day_other_sessions = _events(rows, ["s1", "s2", "s3", "s4", "s5"])
    assert bought_together(same_day_other_sessions, items, by_session).nnz == 0
    assert _companions(bought_together(same_day_other_sessions, items), items, "a") == ["b"]  # by day
    one_session = _events(rows, ["s1", "s1", "s3", "s3", "s5"])
    assert _companions(bought_together(one_session, items, by_session), items, "a") == ["b"]
    baskets = basket_items(_events(rows, ["s1", "s1", None, None, None]), items, "session")
    assert baskets.shape == (3, 3)  # u1 and u2 have no session: their day is the basket


def test_popular_items_do_not_dominate() -> None:
    """Bread is in most baskets, so it co-occurs with the phone often, but only by chance; the case is
    bought with the phone far more often than its own popularity explains."""
    rows: list[tuple[str, str, str, int]] = []
    for u in range(60):
        rows += [(f"b{u}", "bread", "purchase", 0), (f"b{u}", f"filler{u % 7}", "purchase", 0)]
    for u in range(10):  # phone buyers: all buy bread, five buy the case
        rows += [(f"p{u}", "phone", "purchase", 0), (f"p{u}", "bread", "purchase", 0)]
        if u < 5:
            rows.append((f"p{u}", "case", "purchase", 0))
    for u in range(3):
        rows += [(f"c{u}", "case", "purchase", 0), (f"c{u}", "charger", "purchase", 0)]
    events = _events(rows)
    items = Vocabulary.from_ids(events["item_id"])
    matrix = bought_together(events, items, CopurchaseConfig(min_support=2))
    # raw counts would say bread (10 co-baskets) before the case (5)
    assert _companions(matrix, items, "phone")[0] == "case"
    baskets = basket_items(events, items)
    together = (baskets.T @ baskets).toarray()
    phone, bread, case = (items.index_of(i) for i in ("phone", "bread", "case"))
    assert together[phone, bread] > together[phone, case]


def test_pairs_at_chance_level_are_dropped() -> None:
    """Two items bought together exactly as often as independent choices would give: lift 1, no pair."""
    rows: list[tuple[str, str, str, int]] = []
    for u, (first, second) in enumerate([("a", "b"), ("a", "c"), ("d", "b"), ("d", "c")] * 3):
        rows += [(f"u{u}", first, "purchase", 0), (f"u{u}", second, "purchase", 0)]
    events = _events(rows)
    items = Vocabulary.from_ids(events["item_id"])
    # a is in half the baskets and b in half; a+b in a quarter = chance
    assert bought_together(events, items, CopurchaseConfig(min_support=1)).nnz == 0


def test_top_k_per_row() -> None:
    dense = np.array([[0, 3, 1, 2], [5, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=np.float32)
    top = top_per_row(sp.csr_matrix(dense), 2).toarray()
    assert top.tolist() == [[0, 3, 0, 2], [5, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("columns", [["user_id", "item_id", "event_type", "ts"]])
def test_no_baskets_gives_an_empty_matrix(columns: list[str]) -> None:
    events = pd.DataFrame({c: pd.Series([], dtype="str") for c in columns})
    events["ts"] = pd.to_datetime(events["ts"], utc=True)
    items = Vocabulary.from_ids(["a", "b"])
    matrix = bought_together(events, items)
    assert matrix.shape == (2, 2)
    assert matrix.nnz == 0
