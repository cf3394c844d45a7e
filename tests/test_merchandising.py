"""Merchandising rules and diversity as pure functions over ranked lists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from serving.merchandising import PINNED, Rule, RuleBook, apply_rules, diversify, rule_errors

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
ITEMS = [f"p{i}" for i in range(10)]
SCORES = [float(10 - i) for i in range(10)]
SOURCES = ["als"] * 10
CATEGORY = {item: ("shoes" if i % 2 == 0 else "bags") for i, item in enumerate(ITEMS)} | {"x": "hats"}


def rule(**fields: Any) -> Rule:
    return Rule.model_validate({"id": fields.pop("id", "r1"), **fields})


def ranked_ids(rules: list[Rule], n: int = 10, now: datetime = NOW, **kwargs: Any) -> list[str]:
    return list(apply_rules(ITEMS, SCORES, SOURCES, CATEGORY, rules, n, now, **kwargs).items)


def test_no_rules_keeps_the_model_order_and_cuts_at_n() -> None:
    result = apply_rules(ITEMS, SCORES, SOURCES, CATEGORY, [], 4, NOW)
    assert result.items == ("p0", "p1", "p2", "p3")
    assert result.scores == (10.0, 9.0, 8.0, 7.0)
    assert result.sources == ("als",) * 4


def test_ban_by_item_and_by_category() -> None:
    assert ranked_ids([rule(action="ban", item_ids=["p0", "p3"])], n=3) == ["p1", "p2", "p4"]
    assert ranked_ids([rule(action="ban", categories=["shoes"])], n=10) == ["p1", "p3", "p5", "p7", "p9"]


def test_boost_and_bury_move_items_by_strength() -> None:
    assert ranked_ids([rule(action="boost", item_ids=["p9"], strength=1.0)])[0] == "p9"
    # 0.3 x 10 items = 3 places up, to p6's place; on a tie the model's order stands
    assert ranked_ids([rule(action="boost", item_ids=["p9"], strength=0.3)]).index("p9") == 7
    assert ranked_ids([rule(action="bury", item_ids=["p0"], strength=1.0)])[-1] == "p0"
    boosted = ranked_ids([rule(action="boost", categories=["bags"], strength=1.0)])
    assert boosted == ["p1", "p3", "p5", "p7", "p9", "p0", "p2", "p4", "p6", "p8"]  # model order among equals


def test_rules_add_up_and_cancel() -> None:
    rules = [rule(id="a", action="boost", item_ids=["p5"], strength=0.5),
             rule(id="b", action="bury", categories=["bags"], strength=0.5)]
    # p5 is a bag: its boost and the bags' bury cancel, so it keeps rank 5 while the other bags sink by 5
    assert ranked_ids(rules) == ["p0", "p2", "p4", "p5", "p1", "p6", "p3", "p8", "p7", "p9"]


def test_pins_take_their_slot_and_are_marked() -> None:
    result = apply_rules(ITEMS, SCORES, SOURCES, CATEGORY, [rule(action="pin", item_ids=["p7", "x"], position=2)],
                         5, NOW)
    assert result.items == ("p0", "p7", "x", "p1", "p2")
    assert result.sources == ("als", PINNED, PINNED, "als", "als")
    assert result.scores[1] == 3.0  # its own model score
    assert result.scores[2] == 9.0  # not proposed: the score of the item it displaced


def test_pins_beyond_a_short_list_follow_it_and_collisions_shift() -> None:
    short = apply_rules(["a", "b"], [2.0, 1.0], ["als", "als"], {}, [rule(action="pin", item_ids=["z"], position=9)],
                        5, NOW)
    assert short.items == ("a", "b", "z")
    rules = [rule(id="a", action="pin", item_ids=["x"], position=1), rule(id="b", action="pin", item_ids=["p5"],
                                                                            position=1)]
    assert ranked_ids(rules, n=3) == ["x", "p5", "p0"]


def test_a_banned_or_ineligible_item_is_not_pinned() -> None:
    rules = [rule(id="pin", action="pin", item_ids=["x"], position=1), rule(id="ban", action="ban", item_ids=["x"])]
    assert ranked_ids(rules, n=2) == ["p0", "p1"]
    pin = [rule(action="pin", item_ids=["x", "p3"], position=1)]
    assert ranked_ids(pin, n=3, eligible=lambda item_id: item_id != "x") == ["p3", "p0", "p1"]


def test_only_rules_active_now_apply() -> None:
    window = {"starts_at": NOW - timedelta(hours=1), "ends_at": NOW + timedelta(hours=1)}
    ban = rule(action="ban", item_ids=["p0"], **window)
    assert ranked_ids([ban], n=1) == ["p1"]
    assert ranked_ids([ban], n=1, now=NOW + timedelta(hours=1)) == ["p0"]  # ends_at is exclusive
    assert ranked_ids([ban], n=1, now=NOW - timedelta(hours=2)) == ["p0"]
    assert ranked_ids([rule(action="ban", item_ids=["p0"], starts_at=NOW)], n=1) == ["p1"]  # starts_at inclusive


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"action": "ban"}, "at least one target"),
        ({"action": "pin", "item_ids": ["a"]}, "needs a position"),
        ({"action": "pin", "categories": ["c"], "position": 1}, "not categories"),
        ({"action": "ban", "item_ids": ["a"], "position": 2}, "pin rules only"),
        ({"action": "ban", "item_ids": ["a"], "strength": 0.5}, "boost and bury rules only"),
        ({"action": "boost", "item_ids": ["a"], "strength": 2}, "less than or equal to 1"),
        ({"action": "boost", "item_ids": ["a"], "starts_at": "2026-01-02T00:00:00Z",
          "ends_at": "2026-01-01T00:00:00Z"}, "ends_at must be after starts_at"),
        ({"action": "boost", "item_ids": ["a"], "starts_at": "2026-01-02T00:00:00"}, "timezone"),
        ({"action": "feature", "item_ids": ["a"]}, "action"),
        ({"action": "ban", "item_ids": ["a"], "colour": "red"}, "colour"),
        ({"id": "has space", "action": "ban", "item_ids": ["a"]}, "id"),
    ],
)
def test_invalid_rules_say_why(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        rule(**fields)
    assert any(message in error for error in rule_errors(caught.value)), rule_errors(caught.value)


def test_diversify_caps_categories_in_the_head() -> None:
    categories = ["a", "a", "a", "b", "a", "c", None, None]
    order = diversify(list("01234567"), categories, max_per_category=2, first_n=5)
    head = [categories[i] for i in order[:5]]
    assert order[:5] == [0, 1, 3, 5, 6]
    assert head.count("a") == 2
    assert sorted(order) == list(range(8))  # nothing lost
    assert order[5:] == [2, 4, 7]  # the waiting ones come back first, in order


def test_diversify_fills_when_one_category_is_all_there_is() -> None:
    assert diversify(list("abcd"), ["x"] * 4, max_per_category=1, first_n=4) == [0, 1, 2, 3]


def test_diversify_keeps_locked_slots_and_counts_them() -> None:
    categories = ["a", "a", "a", "b", "b"]
    order = diversify(list("01234"), categories, max_per_category=1, first_n=3, locked=[False, True, False, False,
                                                                                          False])
    assert order[1] == 1
    assert order[:3] == [3, 1, 0]  # slot 0: 'a' is full through the pin, so the first 'b'


def test_rule_book_parses_once_per_version() -> None:
    class Store:
        def __init__(self) -> None:
            self.version, self.calls = 1, 0
            self.stored: dict[str, dict[str, object]] = {
                "good": {"action": "ban", "item_ids": ["p0"]},
                "bad": {"action": "pin", "item_ids": ["p0"]},
            }

        def rules(self) -> tuple[int, dict[str, dict[str, object]]]:
            self.calls += 1
            return self.version, self.stored

    store, book = Store(), RuleBook()
    first = book.refresh(store)
    assert [r.id for r in first] == ["good"]
    assert "bad" in book.invalid
    assert book.refresh(store) is first
    store.version, store.stored = 2, {}
    assert book.refresh(store) == ()
