"""Event types and the confidence weight each adds to a user-item interaction.

The defaults say how much a signal means (a purchase more than a view; a refund takes it back); a shop
may add its own event types with a weight, and only configured types are accepted at ingestion.
"""

from __future__ import annotations

from features.schema import EventType

DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    EventType.VIEW: 1.0,
    EventType.ADD_TO_CART: 3.0,
    EventType.PURCHASE: 5.0,
    EventType.SHARE: 4.0,
    EventType.LIKE: 2.0,
    EventType.IMPRESSION: 0.0,  # shown, not chosen: kept for labels, not a positive signal
    EventType.REFUND: -5.0,
}

# Event types that count as a conversion: the targets of evaluation and the "bought" set of a user.
CONVERSION_TYPES = frozenset({EventType.PURCHASE.value})


def merged_weights(overrides: dict[str, float] | None) -> dict[str, float]:
    """Defaults updated with a shop's own weights (new types allowed, names lower-cased)."""
    weights = {str(k): float(v) for k, v in DEFAULT_EVENT_WEIGHTS.items()}
    for name, weight in (overrides or {}).items():
        weights[name.strip().lower()] = float(weight)
    return weights
