"""How much of a demo-data test window social signals could explain at all (issue #5).

Re-runs the frozen generator (same configuration, same seed: the same events `sharefeed demo-data` writes)
with counters around two of its steps, without changing anything it draws. Every visit's expected purchases
(its cart odds times its buy odds) are summed by what caused the visit: organic browsing, a consumable
running out, an opened share (referral) or a friend's purchase noticed ("friends bought it"). For the two
social causes it also records whether the cause (the share, the friend's purchase) happened before the
holdout cut that `sharefeed train` / `evaluate` pick on the written events (`training.split.time_holdout`).

A purchase after the cut whose social cause is also after the cut cannot be predicted by any feature as of
the cut; only the other social purchases can move a static ablation. Request-time serving sees causes up to
the request, so the last column is what a feed computed at the moment of each visit could use.

    uv run python benchmarks/social_ceiling.py --users 20000 --items 5000
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

import features.synthetic as synthetic
from features.synthetic import DemoDataConfig, generate_demo_data
from features.synthetic_social import DAY_MS, VisitKind, Visits
from training.params import SplitParams
from training.split import time_holdout

CAUSES = {
    VisitKind.ORGANIC: "organic browsing",
    VisitKind.REBUY: "consumable running out",
    VisitKind.REFERRAL: "opened share (referral)",
    VisitKind.SOCIAL: "friend's purchase noticed",
}


class Counter:
    """Cause day of every socially caused visit, and expected purchases per (visit day, kind, cause day)."""

    def __init__(self, start_ms: int) -> None:
        self.start_ms = start_ms
        self.cause_day: dict[tuple[int, int, int], int] = {}
        self.expected: dict[tuple[int, int, int], float] = defaultdict(float)

    def caused(self, seen: Visits, out: Visits) -> None:
        if not len(seen.ts):
            return
        day = int((int(seen.ts.min()) - self.start_ms) // DAY_MS)  # the generator runs one day per batch
        for key in zip(out.user.tolist(), out.item.tolist(), out.ts.tolist(), strict=True):
            self.cause_day[key] = day

    def visited(self, v: Visits, buy_odds: np.ndarray) -> None:
        days = (v.ts - self.start_ms) // DAY_MS
        social = (v.kind == VisitKind.REFERRAL) | (v.kind == VisitKind.SOCIAL)
        cause = np.full(len(v.ts), -1, dtype=np.int64)
        for at in np.flatnonzero(social).tolist():
            cause[at] = self.cause_day.get((int(v.user[at]), int(v.item[at]), int(v.ts[at])), -2)
        frame = pd.DataFrame({"day": days, "kind": v.kind.astype(np.int64), "cause": cause, "p": buy_odds})
        for (day, kind, cause_day), p in frame.groupby(["day", "kind", "cause"])["p"].sum().items():
            self.expected[(int(day), int(kind), int(cause_day))] += float(p)


def instrument(counter: Counter) -> None:
    """Wrap the generator's spreading and odds steps; what they return is passed on untouched."""
    spread, odds = synthetic.spread_word, synthetic._Simulation._odds

    def counted_spread(rng, pop, seen, bought, ts_buy, item_cat, start_ms):  # type: ignore[no-untyped-def]
        shares, caused = spread(rng, pop, seen, bought, ts_buy, item_cat, start_ms)
        counter.caused(seen, caused)
        return shares, caused

    def counted_odds(self, v):  # type: ignore[no-untyped-def]
        fit, p_cart, p_buy = odds(self, v)
        counter.visited(v, np.minimum(p_cart, 0.95) * p_buy)
        return fit, p_cart, p_buy

    synthetic.spread_word = counted_spread  # type: ignore[assignment]
    synthetic._Simulation._odds = counted_odds  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    config = DemoDataConfig(users=args.users, items=args.items, days=args.days, seed=args.seed)
    start_ms = int(config.start.timestamp() * 1000)
    counter = Counter(start_ms)
    instrument(counter)
    with tempfile.TemporaryDirectory() as tmp:
        summary = generate_demo_data(Path(tmp), config)
        events = pd.read_parquet(Path(tmp) / "events.parquet", columns=["timestamp"])
    events = events.rename(columns={"timestamp": "ts"}).sort_values("ts")
    holdout = time_holdout(events, SplitParams())
    assert holdout.cut is not None
    cut_day = int((holdout.cut.value // 1_000_000 - start_ms) // DAY_MS)
    print(f"{summary.events:,} events, {args.users:,} users; holdout {holdout.note} (day {cut_day} of {args.days})")

    rows = []
    for kind, label in CAUSES.items():
        after = {k: p for k, p in counter.expected.items() if k[0] >= cut_day and k[1] == kind}
        total = sum(after.values())
        before_cut = sum(p for (_, _, cause), p in after.items() if 0 <= cause < cut_day)
        rows.append((label, total, before_cut))
    purchases = sum(total for _, total, _ in rows)
    print(f"\nexpected purchases in the test window: {purchases:,.0f}")
    print("| cause | expected purchases | share | cause before the cut (visible to features as of the cut) |")
    print("|---|---|---|---|")
    for label, total, before_cut in rows:
        social = label in (CAUSES[VisitKind.REFERRAL], CAUSES[VisitKind.SOCIAL])
        visible = f"{before_cut:,.0f} ({before_cut / purchases:.2%} of all)" if social else "-"
        print(f"| {label} | {total:,.0f} | {total / purchases:.2%} | {visible} |")
    social_total = sum(t for label, t, _ in rows[2:])
    social_visible = sum(b for _, _, b in rows[2:])
    print(f"\nsocially caused: {social_total / purchases:.2%} of test purchases; "
          f"caused before the cut: {social_visible / purchases:.2%}")


if __name__ == "__main__":
    main()
