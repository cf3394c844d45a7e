"""Id vocabularies, the fallback chain, the time holdout and the small feature tables built on them.

Property tests cover the invariants every caller relies on (ids round-trip, a feed never repeats or shows a
blocked item, a split never leaks the future); analytic fixtures with a known answer cover the rest.
"""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from features.feed import Candidates, Source, compose_feed
from features.interactions import user_items_matrix
from features.popularity import item_popularity, ranked
from features.repurchase import infer_repurchase_policy
from features.vocab import Vocabulary
from features.weights import DEFAULT_EVENT_WEIGHTS
from training.params import SplitParams
from training.split import time_holdout

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow],
)
WEIGHTS = {str(k): float(v) for k, v in DEFAULT_EVENT_WEIGHTS.items()}
T0 = pd.Timestamp("2024-03-01T00:00:00Z")

ids = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=10),
    st.from_regex(r"0[0-9]{0,5}", fullmatch=True),
    st.sampled_from(["nan", "None", "", " ", "7", "07", "007"]),
)


def events_frame(rows: list[tuple[str, str, str, pd.Timestamp]]) -> pd.DataFrame:
    users, items, kinds, times = zip(*rows, strict=True) if rows else ((), (), (), ())
    return pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype="str"),
            "item_id": pd.Series(items, dtype="str"),
            "event_type": pd.Series(kinds, dtype="str"),
            "ts": pd.Series(list(times), dtype="datetime64[ns, UTC]"),
        }
    )


# --- Vocabulary ----------------------------------------------------------------------------------------------


@PROPERTY
@given(st.lists(ids, max_size=30))
def test_vocabulary_round_trips_ids_and_indexes(external: list[str]) -> None:
    vocab = Vocabulary.from_ids(external)
    distinct = list(dict.fromkeys(external))

    assert len(vocab) == len(distinct)
    assert vocab.ids.tolist() == distinct  # order of first appearance
    for position, external_id in enumerate(distinct):
        assert vocab.index_of(external_id) == position
        assert vocab.id_of(position) == external_id
        assert external_id in vocab
    assert vocab.indexes(external).tolist() == [distinct.index(e) for e in external]
    assert [vocab.id_of(i) for i in vocab.indexes(external)] == external


@PROPERTY
@given(st.lists(ids, max_size=20), st.lists(ids, max_size=10))
def test_vocabulary_unknown_ids_give_minus_one(known: list[str], probes: list[str]) -> None:
    vocab = Vocabulary.from_ids(known)

    got = vocab.indexes(probes).tolist()

    distinct = list(dict.fromkeys(known))
    assert got == [distinct.index(p) if p in distinct else -1 for p in probes]
    for probe in probes:
        if probe not in known:
            assert vocab.index_of(probe) is None
            assert probe not in vocab


def test_vocabulary_unknown_id_examples() -> None:
    vocab = Vocabulary.from_ids(["007", "7", "a"])

    assert vocab.indexes(["7", "0007", "b", "007", "A"]).tolist() == [1, -1, -1, 0, -1]
    assert vocab.index_of("07") is None
    assert 7 not in vocab


def test_vocabulary_save_load_round_trip(tmp_path: Path) -> None:
    external = ["007", "7", "é-ü", "nan", "None", "0", "🙂 x", "a,b", "line\nbreak"]
    vocab = Vocabulary.from_ids(external)
    path = tmp_path / "users.parquet"

    vocab.save(path)
    loaded = Vocabulary.load(path)

    assert loaded.ids.tolist() == external
    assert all(isinstance(v, str) for v in loaded.ids)
    assert [loaded.index_of(e) for e in external] == list(range(len(external)))
    assert loaded.indexes(["nan", "missing"]).tolist() == [3, -1]


@PROPERTY
@given(st.lists(ids, max_size=25, unique=True))
def test_vocabulary_save_load_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory, external: list[str]
) -> None:
    path = tmp_path_factory.mktemp("vocab") / "items.parquet"

    Vocabulary.from_ids(external).save(path)
    loaded = Vocabulary.load(path)

    assert loaded.ids.tolist() == external
    assert loaded.indexes(external).tolist() == list(range(len(external)))


# --- compose_feed: the fallback chain -------------------------------------------------------------------------

CHAIN_ORDER = (Source.FOLD_IN, Source.NEIGHBOURS, Source.TRENDING_CATEGORY, Source.TRENDING, Source.POPULAR)


@st.composite
def chains(draw: st.DrawFn) -> tuple[int, list[Candidates], np.ndarray, int]:
    n_items = draw(st.integers(min_value=1, max_value=30))
    steps = draw(st.lists(st.sampled_from(CHAIN_ORDER), min_size=0, max_size=5, unique=True))
    steps.sort(key=CHAIN_ORDER.index)
    chain = []
    for source in steps:
        items = draw(st.lists(st.integers(min_value=0, max_value=n_items - 1), max_size=2 * n_items))
        scores = draw(st.lists(st.floats(-10, 10, width=32), min_size=len(items), max_size=len(items)))
        chain.append(Candidates(source, np.asarray(items, dtype=np.int64), np.asarray(scores, dtype=np.float32)))
    blocked = np.asarray(draw(st.lists(st.booleans(), min_size=n_items, max_size=n_items)), dtype=bool)
    n = draw(st.integers(min_value=0, max_value=n_items + 5))
    return n_items, chain, blocked, n


@PROPERTY
@given(chains())
def test_compose_feed_fills_in_chain_order_without_blocked_or_repeated_items(
    case: tuple[int, list[Candidates], np.ndarray, int],
) -> None:
    _, chain, blocked, n = case
    # the reference: first occurrence of each unblocked item walking the chain in order
    first_source: dict[int, tuple[Source, float]] = {}
    for candidates in chain:
        for idx, score in zip(candidates.items.tolist(), candidates.scores.tolist(), strict=True):
            if not blocked[idx] and idx not in first_source:
                first_source[idx] = (candidates.source, score)

    feed = compose_feed(chain, n, blocked)

    items = feed.items.tolist()
    assert len(items) == min(n, len(first_source))
    assert len(set(items)) == len(items)
    assert not blocked[feed.items].any()
    assert items == list(first_source)[: len(items)]
    assert list(feed.sources) == [first_source[i][0] for i in items]
    positions = [CHAIN_ORDER.index(s) for s in feed.sources]
    assert positions == sorted(positions)
    assert feed.scores.tolist() == pytest.approx([first_source[i][1] for i in items])
    assert feed.steps == feed.sources  # no ranked union here: each item's source is its step
    assert feed.step == (feed.sources[0] if items else None)


def test_a_ranked_union_answers_as_its_step_whatever_source_proposed_its_first_item() -> None:
    union = Candidates(Source.ALS, np.asarray([4, 2]), np.asarray([0.9, 0.5]),
                       item_sources=(Source.FRIENDS_TRENDING, Source.ITEM_KNN))
    trending = Candidates(Source.TRENDING, np.asarray([2, 7]), np.asarray([30.0, 20.0]))
    feed = compose_feed([union, trending], 3)
    assert feed.items.tolist() == [4, 2, 7]
    assert feed.sources == (Source.FRIENDS_TRENDING, Source.ITEM_KNN, Source.TRENDING)
    assert feed.steps == (Source.ALS, Source.ALS, Source.TRENDING)
    assert feed.step == Source.ALS


@PROPERTY
@given(
    st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=40), st.randoms(use_true_random=False)
)
def test_popular_fallback_always_fills_n_when_the_catalog_has_n_items(n_items: int, n: int, rng: random.Random) -> None:
    catalog = list(range(n_items))
    rng.shuffle(catalog)
    personal = Candidates(
        Source.FOLD_IN, np.asarray(catalog[: n_items // 3], dtype=np.int64), np.ones(n_items // 3, dtype=np.float32)
    )
    popular = Candidates(Source.POPULAR, np.arange(n_items, dtype=np.int64), np.zeros(n_items, dtype=np.float32))

    feed = compose_feed([personal, popular], n, np.zeros(n_items, dtype=bool))

    assert len(feed.items) == min(n, n_items)
    assert sorted(set(feed.items.tolist())) == sorted(feed.items.tolist())


def test_compose_feed_example() -> None:
    blocked = np.zeros(6, dtype=bool)
    blocked[2] = True
    chain = [
        Candidates(Source.FOLD_IN, np.array([2, 0]), np.array([0.9, 0.8], dtype=np.float32)),
        Candidates(Source.TRENDING, np.array([0, 3, 2, 4]), np.array([5.0, 4.0, 3.0, 2.0], dtype=np.float32)),
        Candidates(Source.POPULAR, np.array([5, 1]), np.array([9.0, 8.0], dtype=np.float32)),
    ]

    feed = compose_feed(chain, 4, blocked)

    assert feed.items.tolist() == [0, 3, 4, 5]
    assert feed.sources == (Source.FOLD_IN, Source.TRENDING, Source.TRENDING, Source.POPULAR)
    assert feed.scores.tolist() == pytest.approx([0.8, 4.0, 2.0, 9.0])
    assert feed.step is Source.FOLD_IN
    assert compose_feed([], 3).items.tolist() == []
    assert compose_feed([], 3).step is None


# --- time_holdout ----------------------------------------------------------------------------------------------


@st.composite
def timed_events(draw: st.DrawFn) -> pd.DataFrame:
    """Events sorted by `ts` (as `load_dataset` returns them) with at least two distinct times."""
    grain = draw(st.sampled_from(["min", "h", "D"]))
    offsets = draw(st.lists(st.integers(min_value=0, max_value=200), min_size=2, max_size=120))
    if len(set(offsets)) < 2:
        offsets = [*offsets, max(offsets) + 1]
    times = T0 + pd.to_timedelta(sorted(offsets), unit=grain)
    users = draw(st.lists(st.sampled_from(["u1", "u2", "u3", "u4"]), min_size=len(times), max_size=len(times)))
    return pd.DataFrame(
        {
            "user_id": users,
            "item_id": [f"i{k}" for k in range(len(times))],
            "ts": pd.Series(times, dtype="datetime64[ns, UTC]"),
        }
    )


split_params = st.builds(
    SplitParams,
    test_fraction=st.sampled_from([0.05, 0.1, 0.2, 0.5]),
    max_buckets=st.integers(min_value=2, max_value=60),
    test_buckets=st.integers(min_value=1, max_value=3),
)


@PROPERTY
@given(timed_events(), split_params)
def test_time_holdout_never_leaks_the_future(events: pd.DataFrame, params: SplitParams) -> None:
    holdout = time_holdout(events, params)

    assert holdout.kind in ("bucket", "day")
    assert len(holdout.train) > 0
    assert len(holdout.test) > 0
    assert holdout.train["ts"].max() < holdout.test["ts"].min()
    assert holdout.cut is not None
    assert (holdout.train["ts"] < holdout.cut).all()
    assert (holdout.test["ts"] >= holdout.cut).all()
    assert sorted(holdout.train["item_id"].tolist() + holdout.test["item_id"].tolist()) == sorted(events["item_id"])


@PROPERTY
@given(timed_events(), st.data())
def test_time_holdout_explicit_cut_puts_train_before_and_test_from_the_cut(
    events: pd.DataFrame, data: st.DataObject
) -> None:
    first, last = events["ts"].iloc[0], events["ts"].iloc[-1]
    cut_ns = data.draw(st.integers(min_value=first.value + 1, max_value=last.value))
    cut = pd.Timestamp(cut_ns, tz="UTC").floor("us")
    if cut <= first:
        cut = first + pd.Timedelta(microseconds=1)
    naive = data.draw(st.booleans())
    when = cut.tz_localize(None).to_pydatetime() if naive else cut.to_pydatetime()

    holdout = time_holdout(events, SplitParams(cut=when))

    assert holdout.kind == "explicit"
    assert holdout.cut == cut
    assert (holdout.train["ts"] < cut).all()
    assert (holdout.test["ts"] >= cut).all()
    assert len(holdout.train) + len(holdout.test) == len(events)


def test_time_holdout_explicit_cut_in_another_zone_is_converted_to_utc() -> None:
    events = events_frame([("u", f"i{h}", "view", T0 + pd.Timedelta(hours=h)) for h in range(10)])
    cut = datetime.fromisoformat("2024-03-01T13:00:00+08:00")  # 05:00 UTC

    holdout = time_holdout(events, SplitParams(cut=cut))

    assert holdout.cut == pd.Timestamp("2024-03-01T05:00:00Z")
    assert holdout.train["item_id"].tolist() == [f"i{h}" for h in range(5)]
    assert holdout.test["item_id"].tolist() == [f"i{h}" for h in range(5, 10)]


def test_time_holdout_bucketed_data_holds_out_exactly_the_last_bucket() -> None:
    rows = [(f"u{u}", f"i{d}{u}", "view", T0 + pd.Timedelta(days=7 * d)) for d in range(5) for u in range(4)]
    events = events_frame(rows)

    holdout = time_holdout(events, SplitParams())

    last = T0 + pd.Timedelta(days=28)
    assert holdout.kind == "bucket"
    assert holdout.cut == last
    assert set(holdout.test["ts"]) == {last}
    assert len(holdout.test) == 4
    assert len(holdout.train) == 16
    assert holdout.train["ts"].max() == T0 + pd.Timedelta(days=21)
    assert "5 distinct times" in holdout.note


def test_time_holdout_with_all_equal_times_splits_randomly_per_user_and_says_so() -> None:
    rows = [(f"u{k % 4}", f"i{k}", "view", T0) for k in range(20)] + [("solo", "i99", "view", T0)]
    events = events_frame(rows)

    holdout = time_holdout(events, SplitParams(test_fraction=0.3))

    assert holdout.kind == "random-per-user"
    assert holdout.cut is None
    assert "all timestamps are equal" in holdout.note
    assert "random per-user split" in holdout.note
    assert holdout.test.groupby("user_id").size().to_dict() == {"u0": 1, "u1": 1, "u2": 1, "u3": 1}
    assert "solo" in set(holdout.train["user_id"])
    assert set(holdout.train.index).isdisjoint(holdout.test.index)
    assert len(holdout.train) + len(holdout.test) == len(events)
    again = time_holdout(events, SplitParams(test_fraction=0.3))
    assert again.test.index.tolist() == holdout.test.index.tolist()


def test_time_holdout_day_cut_lands_on_midnight_utc() -> None:
    times = pd.date_range("2024-03-01T03:17:00Z", periods=100, freq="7h")
    events = events_frame([("u", f"i{k}", "view", t) for k, t in enumerate(times)])

    holdout = time_holdout(events, SplitParams(test_fraction=0.1))

    assert holdout.kind == "day"
    assert holdout.cut is not None
    assert holdout.cut == holdout.cut.floor("D")
    assert str(holdout.cut.tz) == "UTC"
    assert holdout.cut == pd.Timestamp("2024-03-27T00:00:00Z")
    assert holdout.train["ts"].max() < holdout.cut <= holdout.test["ts"].min()
    assert 0.05 <= len(holdout.test) / len(events) <= 0.2


def test_time_holdout_splits_when_most_events_share_the_first_time() -> None:
    # Twenty events at 05:00 and two later ones: a non-empty train and test exist (cut at 06:00).
    start = pd.Timestamp("2024-03-01T05:00:00Z")
    rows = [(f"u{k % 3}", f"i{k}", "view", start) for k in range(20)]
    rows += [
        ("u1", "late1", "view", start + pd.Timedelta(hours=1)),
        ("u2", "late2", "view", start + pd.Timedelta(hours=2)),
    ]
    events = events_frame(rows)

    holdout = time_holdout(events, SplitParams(max_buckets=2))

    assert len(holdout.train) > 0
    assert len(holdout.test) > 0
    assert holdout.train["ts"].max() < holdout.test["ts"].min()


# --- user_items_matrix -------------------------------------------------------------------------------------------


def test_user_items_matrix_sums_weights_and_a_refund_cancels_its_purchase() -> None:
    users = Vocabulary.from_ids(["u1", "u2"])
    items = Vocabulary.from_ids(["a", "b", "c"])
    events = events_frame(
        [
            ("u1", "a", "view", T0),
            ("u1", "a", "purchase", T0),
            ("u1", "a", "view", T0 + pd.Timedelta(hours=1)),  # a -> 1 + 5 + 1
            ("u1", "b", "purchase", T0),
            ("u1", "b", "refund", T0 + pd.Timedelta(days=2)),  # b -> 5 - 5: removed
            ("u2", "c", "refund", T0),  # a refund alone is not kept as a negative
            ("u2", "b", "like", T0),
            ("u2", "b", "impression", T0),  # weight 0
            ("u2", "zzz", "purchase", T0),  # unknown item: ignored
            ("ghost", "a", "purchase", T0),  # unknown user: ignored
        ]
    )

    matrix = user_items_matrix(events, users, items, WEIGHTS)

    assert matrix.shape == (2, 3)
    assert matrix.toarray().tolist() == [[7.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    stored = {(int(r), int(c)) for r, c in zip(*matrix.nonzero(), strict=True)}
    assert stored == {(0, 0), (1, 1)}
    assert matrix.nnz == 2  # the cancelled cell is removed, not kept as an explicit zero


# --- item_popularity ---------------------------------------------------------------------------------------------


def test_item_popularity_ignores_events_after_now_and_trending_decays_with_age() -> None:
    items = Vocabulary.from_ids(["fresh", "week", "future", "shown"])
    now = pd.Timestamp("2024-03-10T00:00:00Z")
    events = events_frame(
        [
            ("u1", "fresh", "view", now),
            ("u1", "fresh", "view", now),
            ("u2", "fresh", "view", now),
            ("u1", "week", "view", now - pd.Timedelta(days=7)),
            ("u1", "future", "purchase", now + pd.Timedelta(seconds=1)),
            ("u2", "future", "purchase", now + pd.Timedelta(days=3)),
            ("u3", "shown", "impression", now),
        ]
    )

    tables = item_popularity(events, items, WEIGHTS, now, half_life_days=7.0)

    assert tables.popular.tolist() == [2.0, 1.0, 0.0, 0.0]
    assert tables.trending.tolist() == pytest.approx([3.0, 0.5, 0.0, 0.0])
    assert ranked(tables.trending).tolist() == [0, 1]


def test_item_popularity_counts_a_future_event_once_now_passes_it() -> None:
    items = Vocabulary.from_ids(["x"])
    events = events_frame([("u1", "x", "purchase", T0 + pd.Timedelta(days=1))])

    before = item_popularity(events, items, WEIGHTS, T0, half_life_days=7.0)
    after = item_popularity(events, items, WEIGHTS, T0 + pd.Timedelta(days=15), half_life_days=7.0)

    assert before.trending.tolist() == [0.0]
    assert after.popular.tolist() == [1.0]
    assert after.trending.tolist() == pytest.approx([5.0 * 0.5**2])


# --- infer_repurchase_policy -------------------------------------------------------------------------------------


def test_infer_repurchase_policy_from_whether_buyers_rebuy() -> None:
    rows = []
    for buyer in range(25):
        rows.append((f"u{buyer}", f"food{buyer % 5}", "purchase", T0))
        rows.append((f"u{buyer}", f"food{buyer % 5}", "purchase", T0 + pd.Timedelta(days=10)))
        rows.append((f"u{buyer}", f"phone{buyer % 5}", "purchase", T0))
        rows.append((f"u{buyer}", f"phone{buyer % 5}", "view", T0 + pd.Timedelta(days=10)))
        # the same purchase recorded twice at the same moment is not a rebuy
        rows.append((f"u{buyer}", f"gift{buyer % 5}", "purchase", T0))
        rows.append((f"u{buyer}", f"gift{buyer % 5}", "purchase", T0))
    events = events_frame(rows)
    category = pd.Series({f"{c}{k}": c for c in ("food", "phone", "gift") for k in range(5)})

    policy = infer_repurchase_policy(events, category, threshold=0.1, min_pairs=20)

    assert policy.repeatable == {"food": True, "phone": False, "gift": False}
    assert policy.rates == {"food": 1.0, "phone": 0.0, "gift": 0.0}
    assert policy.is_repeatable("food") is True
    assert policy.is_repeatable("phone") is False
    assert policy.repeatable_mask(np.array(["food", "phone", "gift"], dtype=object)).tolist() == [True, False, False]


def test_infer_repurchase_policy_small_categories_take_the_overall_rate_and_overrides_win() -> None:
    rows = [(f"u{b}", "soap", "purchase", T0 + pd.Timedelta(days=d)) for b in range(30) for d in (0, 30)]
    rows += [("u1", "tv", "purchase", T0)]
    events = events_frame(rows)
    category = pd.Series({"soap": "home", "tv": "electronics"})

    policy = infer_repurchase_policy(events, category, threshold=0.5, min_pairs=20, overrides={"home": False})

    assert "electronics" not in policy.rates  # one buyer-item pair: too few to judge
    assert policy.is_repeatable("electronics") is True  # the whole data's rate (30 of 31) passes 0.5
    assert policy.is_repeatable("home") is False  # the override beats the observed rate of 1.0
    assert policy.rates["home"] == 1.0
