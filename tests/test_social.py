"""The social graph from a hand-made table and events: directions, behavioural ties, the cut-off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.social import EdgeKind, GraphWeights, SocialGraph, build_social_graph
from features.vocab import Vocabulary
from tests.event_frames import T0, social_events

_events = social_events


SOCIAL = pd.DataFrame(
    {
        "user_id": ["alice", "carol", "bob"],
        "friend_id": ["bob", "alice", "alice"],  # bob-alice is listed twice: one friendship
        "kind": ["friend", "follow", "friend"],  # carol follows alice
    }
)
EVENTS = _events(
    [
        ("dave", "p1", "share", 1, "erin", None),
        ("dave", "p2", "share", 2, "erin", None),
        ("erin", "p1", "view", 1, None, "dave"),
        ("frank", "p3", "purchase", 3, None, "alice"),
        ("gina", "p4", "share", 10, "hank", None),  # at the cut: left out
        ("hank", "p4", "view", 11, None, "gina"),  # after the cut: left out
    ]
)
CUT = T0 + pd.Timedelta(days=10)


def _edges(graph: SocialGraph) -> dict[tuple[str, str], tuple[float, int, int]]:
    out = {}
    for u in range(graph.n_users):
        row = slice(graph.indptr[u], graph.indptr[u + 1])
        for v, w, ts, kind in zip(graph.indices[row], graph.weight[row], graph.last_seen[row], graph.kinds[row],
                                  strict=True):
            out[graph.users.id_of(u), graph.users.id_of(int(v))] = (float(w), int(ts), int(kind))
    return out


@pytest.fixture(scope="module")
def graph() -> SocialGraph:
    return build_social_graph(SOCIAL, EVENTS, CUT, weights=GraphWeights(half_life_days=1e9))


def test_friendship_is_symmetric_and_counted_once(graph: SocialGraph) -> None:
    edges = _edges(graph)
    assert edges["alice", "bob"] == (1.0, 0, EdgeKind.FRIEND)
    assert edges["bob", "alice"] == (1.0, 0, EdgeKind.FRIEND)


def test_follow_is_directed_from_the_followed_to_the_fan(graph: SocialGraph) -> None:
    edges = _edges(graph)
    assert edges["alice", "carol"] == (0.5, 0, EdgeKind.FOLLOW)  # carol sees alice's activity
    assert ("carol", "alice") not in edges
    assert sorted(graph.reach_of("alice")) == ["bob", "carol", "frank"]
    assert graph.reach_of("carol") == []


def test_shares_and_referrals_add_weighted_timed_edges(graph: SocialGraph) -> None:
    edges = _edges(graph)
    weight, last, kind = edges["dave", "erin"]
    assert weight == pytest.approx(2 * 1.0 + 2.0)  # two shares and one referred view
    assert last == int((T0 + pd.Timedelta(days=2)).timestamp())
    assert kind == EdgeKind.SHARE | EdgeKind.REFERRAL
    assert edges["alice", "frank"] == (2.0, int((T0 + pd.Timedelta(days=3)).timestamp()), EdgeKind.REFERRAL)


def test_nothing_at_or_after_the_cut(graph: SocialGraph) -> None:
    edges = _edges(graph)
    assert ("gina", "hank") not in edges
    assert "gina" not in graph.users
    assert "hank" not in graph.users
    later = build_social_graph(SOCIAL, EVENTS, CUT + pd.Timedelta(days=2))
    assert ("gina", "hank") in _edges(later)


def test_behavioural_weights_decay_with_age() -> None:
    events = _events([("dave", "p1", "share", 0, "erin", None)])
    weights = GraphWeights(share=1.0, half_life_days=5.0)
    graph = build_social_graph(None, events, T0 + pd.Timedelta(days=10), weights=weights)
    assert _edges(graph)["dave", "erin"][0] == pytest.approx(0.25)


def test_degree_counts_distinct_neighbours_either_way(graph: SocialGraph) -> None:
    degree = dict(zip(graph.users.ids, graph.degree(), strict=True))
    assert degree["alice"] == 3  # bob (both ways, once), carol, frank
    assert degree["carol"] == 1
    friends_only = dict(zip(graph.users.ids, graph.degree(EdgeKind.FRIEND), strict=True))
    assert friends_only["alice"] == 1
    assert graph.out_degree().sum() == graph.n_edges == graph.in_degree().sum()


def test_vocabulary_starts_with_the_given_users(graph: SocialGraph) -> None:
    users = Vocabulary.from_ids(["zoe", "bob", "alice"])
    built = build_social_graph(SOCIAL, EVENTS, CUT, users=users)
    assert list(built.users.ids[:3]) == ["zoe", "bob", "alice"]
    assert built.reach(0)[0].size == 0
    assert set(built.users.ids) == set(graph.users.ids) | {"zoe"}


def test_save_and_load_round_trip(graph: SocialGraph, tmp_path: Path) -> None:
    graph.save(tmp_path)
    loaded = SocialGraph.load(tmp_path)
    assert list(loaded.users.ids) == list(graph.users.ids)
    for name in ("indptr", "indices", "weight", "last_seen", "kinds"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(graph, name))


def test_missing_kind_column_means_friends() -> None:
    graph = build_social_graph(SOCIAL[["user_id", "friend_id"]], EVENTS.iloc[:0], CUT)
    edges = _edges(graph)
    assert edges["alice", "carol"][2] == EdgeKind.FRIEND
    assert edges["carol", "alice"][2] == EdgeKind.FRIEND
