"""The input data contract: table names, columns, event types and the id types.

Everything that reads or writes sharefeed's data agrees on the names defined here, so a column is
spelled once in the code base.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NewType

UserId = NewType("UserId", str)
ItemId = NewType("ItemId", str)


class EventType(StrEnum):
    VIEW = "view"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    SHARE = "share"
    LIKE = "like"
    IMPRESSION = "impression"
    REFUND = "refund"


class Table(StrEnum):
    EVENTS = "events"
    ITEMS = "items"
    USERS = "users"
    SOCIAL = "social"


# Event columns: the required ones, then the optional ones in the order they are written.
EVENT_REQUIRED = ("user_id", "item_id", "event_type", "timestamp")
EVENT_OPTIONAL_STR = ("event_id", "target_user_id", "referrer_id", "session_id", "request_id")
EVENT_OPTIONAL_NUM = ("quantity", "price")
EVENT_COLUMNS = EVENT_REQUIRED + EVENT_OPTIONAL_STR + EVENT_OPTIONAL_NUM

ITEM_STR = ("item_id", "category", "brand", "title")
ITEM_NUM = ("price",)
ITEM_BOOL = ("in_stock",)
ITEM_TIME = ("created_at",)
ITEM_COLUMNS = ITEM_STR + ITEM_NUM + ITEM_BOOL + ITEM_TIME

SOCIAL_COLUMNS = ("user_id", "friend_id", "kind")
SOCIAL_KINDS = ("friend", "follow")

# Epoch numbers beyond this are rejected: they are almost surely milliseconds (DESIGN: "after 2100").
MAX_EPOCH_SECONDS = 4_102_444_800  # 2100-01-01T00:00:00Z
