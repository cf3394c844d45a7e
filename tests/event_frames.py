"""Hand-made events in the validated event frame's shape, for tests that reason about a few users."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

T0 = pd.Timestamp("2026-03-01T00:00:00Z")


def social_events(rows: Sequence[tuple[str, str, str, float, str | None, str | None]],
                  start: pd.Timestamp = T0) -> pd.DataFrame:
    """(user, item, type, day after `start`, share target, referrer) rows."""
    return pd.DataFrame(
        {
            "user_id": pd.Series([r[0] for r in rows], dtype="str"),
            "item_id": pd.Series([r[1] for r in rows], dtype="str"),
            "event_type": pd.Series([r[2] for r in rows], dtype="str"),
            "ts": pd.Series([start + pd.Timedelta(days=r[3]) for r in rows], dtype="datetime64[ns, UTC]"),
            "target_user_id": pd.Series([r[4] for r in rows], dtype="str"),
            "referrer_id": pd.Series([r[5] for r in rows], dtype="str"),
        }
    )
