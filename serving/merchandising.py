"""Merchandising rules and diversity: what a shop says about a ranked list after the model has spoken.

A rule pins items at a position, boosts or buries items or categories, or bans them, optionally within
a time range. Rules live in the online store (shared by every worker); `RuleBook` keeps a parsed copy per
process and re-reads it only when the store's rules version moves. Everything else here is a pure function
over lists, so `Recommender.feed` (and any other ranked list) can call it after ranking.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

PINNED = "pinned"  # the source of an item a pin placed
DEFAULT_STRENGTH = 0.5
MAX_RULE_TARGETS = 1000

RuleId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
TargetId = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class RuleAction(StrEnum):
    PIN = "pin"  # put the items at `position` (1 = first), in the order given
    BOOST = "boost"  # move matching items up by `strength` x the list's length
    BURY = "bury"  # move them down the same way
    BAN = "ban"  # never show them


class RuleSpec(BaseModel):
    """A rule as a caller writes it (the id comes from the URL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: RuleAction
    item_ids: list[TargetId] = Field(default_factory=list, max_length=MAX_RULE_TARGETS)
    categories: list[TargetId] = Field(default_factory=list, max_length=MAX_RULE_TARGETS)
    position: int | None = Field(None, ge=1, le=10_000, description="pin only: 1 is the first slot")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="boost/bury only: share of the list to move")
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    note: str | None = Field(None, max_length=1000)

    @model_validator(mode="after")
    def _consistent(self) -> RuleSpec:
        if not self.item_ids and not self.categories:
            raise ValueError("a rule needs at least one target: item_ids or categories")
        if self.action is RuleAction.PIN:
            if self.position is None:
                raise ValueError("a pin needs a position (1 = first slot)")
            if self.categories:
                raise ValueError("a pin names item_ids, not categories")
        elif self.position is not None:
            raise ValueError(f"position applies to pin rules only, not {self.action.value}")
        if self.strength is not None and self.action not in (RuleAction.BOOST, RuleAction.BURY):
            raise ValueError(f"strength applies to boost and bury rules only, not {self.action.value}")
        if self.starts_at is not None and self.ends_at is not None and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class Rule(RuleSpec):
    """A stored rule: the spec plus its id."""

    id: RuleId

    def active(self, now: datetime) -> bool:
        return (self.starts_at is None or self.starts_at <= now) and (self.ends_at is None or now < self.ends_at)

    @property
    def shift(self) -> float:
        """Signed share of the list a boost (+) or bury (-) moves an item by."""
        strength = self.strength if self.strength is not None else DEFAULT_STRENGTH
        return strength if self.action is RuleAction.BOOST else -strength if self.action is RuleAction.BURY else 0.0


def rule_errors(exc: ValidationError) -> list[str]:
    """Validation errors as short sentences ("position: ...") for an API response."""
    out = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        out.append(f"{where}: {message}" if where else message)
    return out


@dataclass(frozen=True, slots=True)
class Ranked:
    """A ranked list: ids best first, each with its score and source."""

    items: tuple[str, ...]
    scores: tuple[float, ...]
    sources: tuple[str, ...]

    def reorder(self, order: Sequence[int]) -> Ranked:
        return Ranked(tuple(self.items[i] for i in order), tuple(self.scores[i] for i in order),
                      tuple(self.sources[i] for i in order))


CategoryOf = Callable[[str], str | None] | Mapping[str, str | None]


def _category_getter(categories_of: CategoryOf) -> Callable[[str], str | None]:
    if isinstance(categories_of, Mapping):
        return categories_of.get
    return categories_of


def _matches(rule: Rule, item_id: str, category: str | None) -> bool:
    return item_id in rule.item_ids or (category is not None and category in rule.categories)


def apply_rules(
    items: Sequence[str],
    scores: Sequence[float],
    sources: Sequence[str],
    categories_of: CategoryOf,
    rules: Iterable[Rule],
    n: int,
    now: datetime,
    *,
    eligible: Callable[[str], bool] | None = None,
) -> Ranked:
    """The first `n` items after the rules active at `now`: bans removed, boosts up, buries down, pins placed.

    Boost/bury move an item by `strength` x the list's length (several rules add up), keeping the model's
    order among equals. A pinned item leaves its organic place and takes its slot, with source "pinned"
    (and the score of the item it displaced when the model had not proposed it); pins past the end of a short
    list follow it. `eligible` says whether a pinned item the model did not propose may be shown at all
    (in stock, not excluded, in the requested category); without it every pinned item may.
    """
    if not len(items) == len(scores) == len(sources):
        raise ValueError("items, scores and sources must have the same length")
    category = _category_getter(categories_of)
    active = [rule for rule in rules if rule.active(now)]
    bans = [r for r in active if r.action is RuleAction.BAN]
    moves = [r for r in active if r.action in (RuleAction.BOOST, RuleAction.BURY)]
    pins = sorted((r for r in active if r.action is RuleAction.PIN), key=lambda r: (r.position or 0, r.id))

    def banned(item_id: str) -> bool:
        return any(_matches(rule, item_id, category(item_id)) for rule in bans)

    kept = [i for i, item_id in enumerate(items) if not banned(item_id)]
    length = len(kept)
    keys = []
    for rank, i in enumerate(kept):
        shift = sum(rule.shift for rule in moves if _matches(rule, items[i], category(items[i])))
        keys.append((rank - shift * length, rank))
    organic = [kept[rank] for _, rank in sorted(keys)]

    wanted: list[tuple[int, str]] = []  # (slot, item) for each pin, first rule wins an item
    proposed = {items[i]: i for i in organic}
    placed: set[str] = set()
    for rule in pins:
        slot = (rule.position or 1) - 1
        for item_id in rule.item_ids:
            if item_id in placed or banned(item_id):
                continue
            if item_id not in proposed and eligible is not None and not eligible(item_id):
                continue
            placed.add(item_id)
            wanted.append((slot, item_id))
            slot += 1
    rest = [i for i in organic if items[i] not in placed]

    out_items: list[str] = []
    out_scores: list[float] = []
    out_sources: list[str] = []
    pending = sorted(wanted, key=lambda pin: pin[0])  # stable: the earlier rule first on a tie
    slot = 0
    while len(out_items) < n and (pending or rest):
        if pending and (pending[0][0] <= slot or not rest):
            _, item_id = pending.pop(0)
            at = proposed.get(item_id)
            displaced = rest[0] if rest else None
            score = scores[at] if at is not None else scores[displaced] if displaced is not None else 0.0
            out_items.append(item_id)
            out_scores.append(float(score))
            out_sources.append(PINNED)
        else:
            i = rest.pop(0)
            out_items.append(items[i])
            out_scores.append(float(scores[i]))
            out_sources.append(sources[i])
        slot += 1
    return Ranked(tuple(out_items), tuple(out_scores), tuple(out_sources))


def diversify(
    items: Sequence[str],
    categories: Sequence[str | None],
    max_per_category: int,
    first_n: int,
    *,
    locked: Sequence[bool] | None = None,
) -> list[int]:
    """An order (positions into `items`) with at most `max_per_category` items of one category among the
    first `first_n`, otherwise as close to the given order as possible.

    Items that would exceed the cap wait and fill the slots after `first_n`, in their order; when nothing
    within the cap is left the best waiting item is taken anyway, so the list never gets shorter. Items
    without a category are never capped. `locked` positions (pins) keep their slot and count to their cap.
    """
    if max_per_category < 1:
        raise ValueError("max_per_category must be at least 1")
    if len(categories) != len(items):
        raise ValueError("items and categories must have the same length")
    pinned = [bool(locked[i]) if locked is not None else False for i in range(len(items))]
    head = range(min(first_n, len(items)))
    counts = Counter(c for i in head if pinned[i] and (c := categories[i]) is not None)
    queue = [i for i in range(len(items)) if not pinned[i]]  # what is left, in the given order
    order: list[int] = []
    for slot in range(len(items)):
        if pinned[slot]:
            order.append(slot)
            continue
        pick = 0
        if slot < first_n:
            within = (k for k, i in enumerate(queue)
                      if (c := categories[i]) is None or counts[c] < max_per_category)
            pick = next(within, 0)
            if (category := categories[queue[pick]]) is not None:
                counts[category] += 1
        order.append(queue.pop(pick))
    return order


class RuleSource(Protocol):
    def rules(self) -> tuple[int, dict[str, dict[str, object]]]: ...


class RuleBook:
    """The rules of the online store, parsed once per rules version (one instance per process)."""

    def __init__(self) -> None:
        self.version = -1
        self.rules: tuple[Rule, ...] = ()
        self.invalid: dict[str, list[str]] = {}  # rule id -> why a stored rule was skipped

    def refresh(self, store: RuleSource) -> tuple[Rule, ...]:
        version, stored = store.rules()
        if version != self.version:
            parsed, invalid = [], {}
            for rule_id, body in sorted(stored.items()):
                try:
                    parsed.append(Rule.model_validate({**body, "id": rule_id}))
                except ValidationError as exc:
                    invalid[rule_id] = rule_errors(exc)
            self.version, self.rules, self.invalid = version, tuple(parsed), invalid
        return self.rules

    def active(self, now: datetime) -> list[Rule]:
        return [rule for rule in self.rules if rule.active(now)]
