"""Share chains and attribution: sharer -> recipient -> view -> cart -> purchase, and who drove which sale.

A purchase is credited to one sharer: the `referrer_id` it carries, else the latest share of that item to
the buyer within the attribution window before it. From the chains come per-user funnels and an influence
score (smoothed conversions per recipient times reach: conversions, not degree) and per-item share stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.schema import EventType

FOLLOW_UPS = (EventType.VIEW, EventType.ADD_TO_CART, EventType.PURCHASE)
USER_COLUMNS = ("shares_sent", "recipients_reached", "shares_opened", "conversions", "revenue",
                "open_rate", "conversion_per_open", "influence")
ITEM_COLUMNS = ("views", "shares", "share_rate", "referred_views", "referred_purchases",
                "referral_conversion_rate", "share_chains", "viral_coefficient")


@dataclass(frozen=True, slots=True)
class AttributionParams:
    window_days: float = 7.0  # a purchase this long after a share can still be credited to it
    prior_strength: float = 5.0  # pseudo-observations at the global rate when smoothing a user's rates
    hop_weight: float = 0.5  # share of a converted buyer's own influence passed back to whoever converted them


@dataclass(frozen=True, slots=True)
class Attribution:
    """Everything attributed as of a cut-off; `users` and `items` are indexed by external id."""

    chains: pd.DataFrame  # one row per share with a recipient: sharer, recipient, item_id, ts, opened, carted, bought
    purchases: pd.DataFrame  # attributed purchases: user_id, item_id, ts, sharer, via, revenue
    users: pd.DataFrame  # USER_COLUMNS, only users who shared or were credited
    items: pd.DataFrame  # ITEM_COLUMNS, items viewed or shared
    rates: dict[str, float]  # global open rate and conversions per open: the priors for smoothing


def _smoothed(hits: pd.Series, trials: pd.Series, prior: float, strength: float) -> pd.Series:
    return (hits + strength * prior) / (trials + strength)


def share_chains(events: pd.DataFrame, window: pd.Timedelta) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each share with its recipient's follow-ups of the item inside the window.

    Returns the chains (one row per share) and the matched (share, follow-up) pairs.
    """
    shares = events.loc[(events["event_type"] == EventType.SHARE) & events["target_user_id"].notna()]
    shares = (shares[["user_id", "target_user_id", "item_id", "ts"]]
              .rename(columns={"user_id": "sharer", "target_user_id": "recipient"})
              .reset_index(names="share_row"))
    follow = events.loc[events["event_type"].isin(FOLLOW_UPS), ["user_id", "item_id", "event_type", "ts"]]
    follow = follow.rename(columns={"user_id": "recipient", "ts": "ts_event"}).reset_index(names="event_row")
    pairs = shares.merge(follow, on=["recipient", "item_id"], how="inner")
    delay = pairs["ts_event"] - pairs["ts"]
    pairs = pairs.loc[(delay > pd.Timedelta(0)) & (delay <= window)]
    steps = pd.crosstab(pairs["share_row"], pairs["event_type"]).reindex(columns=list(FOLLOW_UPS), fill_value=0)
    flags = np.asarray(steps.reindex(shares["share_row"], fill_value=0).to_numpy() > 0, dtype=bool).reshape(-1, 3)
    chains = shares.assign(opened=np.any(flags, axis=1), carted=flags[:, 1] | flags[:, 2], bought=flags[:, 2])
    return chains, pairs


def _attributed_purchases(events: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Purchases credited to a sharer: by `referrer_id`, else the latest share in the window (last touch)."""
    buys = events.loc[events["event_type"] == EventType.PURCHASE]
    by_share = pairs.loc[pairs["event_type"] == EventType.PURCHASE].sort_values("ts", kind="stable")
    last_touch = by_share.groupby("event_row", sort=False)["sharer"].last()
    referrer = buys["referrer_id"] if "referrer_id" in buys.columns else pd.Series(index=buys.index, dtype="str")
    sharer = referrer.where(referrer.notna(), last_touch.reindex(buys.index))
    credited = buys.loc[sharer.notna()]
    price = credited["price"] if "price" in credited.columns else pd.Series(np.nan, index=credited.index)
    quantity = credited["quantity"] if "quantity" in credited.columns else pd.Series(1.0, index=credited.index)
    return pd.DataFrame({
        "user_id": credited["user_id"], "item_id": credited["item_id"], "ts": credited["ts"],
        "sharer": sharer.loc[credited.index],
        "via": np.where(referrer.loc[credited.index].notna(), "referrer", "share"),
        "revenue": (price.astype(float) * quantity.fillna(1.0).astype(float)).fillna(0.0),
    })


def _influence(users: pd.DataFrame, purchases: pd.DataFrame, params: AttributionParams) -> pd.Series:
    """Smoothed conversions per recipient times reach, plus a share of the influence of the buyers converted."""
    trials = users["recipients_reached"].clip(lower=1).astype(float)
    prior = float(users["conversions"].sum() / max(trials.sum(), 1.0))
    direct = _smoothed(users["conversions"].astype(float), trials, prior, params.prior_strength) * trials
    if params.hop_weight <= 0 or purchases.empty:
        return direct
    # One hop back along attributed conversions: a sharer whose buyers go on to convert others counts more.
    converted = purchases[["sharer", "user_id"]].drop_duplicates()
    passed = direct.reindex(converted["user_id"]).fillna(0.0).to_numpy()
    upstream = pd.Series(passed, index=converted["sharer"].to_numpy()).groupby(level=0).sum()
    return direct + params.hop_weight * upstream.reindex(users.index).fillna(0.0)


def attribute(events: pd.DataFrame, cut: pd.Timestamp | None = None,
              params: AttributionParams | None = None) -> Attribution:
    """Chains, credited purchases, per-user funnels with influence, and per-item stats from events before `cut`."""
    params = params or AttributionParams()
    if cut is not None:
        events = events.loc[events["ts"] < cut]
    events = events.reset_index(drop=True)  # rows are named by position below
    if "target_user_id" not in events.columns:
        events = events.assign(target_user_id=pd.Series(index=events.index, dtype="str"))
    chains, pairs = share_chains(events, pd.Timedelta(days=params.window_days))
    purchases = _attributed_purchases(events, pairs)

    shares = events.loc[events["event_type"] == EventType.SHARE]
    per_chain = chains.groupby("sharer")[["opened", "bought"]].sum()
    users = pd.DataFrame({
        "shares_sent": shares.groupby("user_id").size(),
        "recipients_reached": shares.groupby("user_id")["target_user_id"].nunique(),
        "shares_to_recipients": chains.groupby("sharer").size(),
        "shares_opened": per_chain["opened"],
        "conversions": purchases.groupby("sharer").size(),
        "revenue": purchases.groupby("sharer")["revenue"].sum(),
    }).fillna(0.0)
    users.index.name = "user_id"
    opened_total = float(users["shares_opened"].sum())
    rates = {
        "open_rate": opened_total / max(float(users["shares_to_recipients"].sum()), 1.0),
        "conversion_per_open": float(users["conversions"].sum()) / max(opened_total, 1.0),
        "window_days": params.window_days,
    }
    users["open_rate"] = _smoothed(users["shares_opened"], users["shares_to_recipients"], rates["open_rate"],
                                   params.prior_strength)
    users["conversion_per_open"] = _smoothed(users["conversions"], users["shares_opened"],
                                             rates["conversion_per_open"], params.prior_strength)
    users["influence"] = _influence(users, purchases, params)
    for column in ("shares_sent", "recipients_reached", "shares_opened", "conversions"):
        users[column] = users[column].astype(np.int64)

    views = events.loc[events["event_type"] == EventType.VIEW]
    referred = views["referrer_id"].notna() if "referrer_id" in views.columns else pd.Series(False, index=views.index)
    from_share = views.index.isin(pairs.loc[pairs["event_type"] == EventType.VIEW, "event_row"])
    referred_views = views.loc[referred.to_numpy() | from_share]
    items = pd.DataFrame({
        "views": views.groupby("item_id").size(),
        "shares": shares.groupby("item_id").size(),
        "referred_views": referred_views.groupby("item_id").size(),
        "referred_purchases": purchases.groupby("item_id").size(),
        "share_chains": shares.groupby("item_id")["user_id"].nunique(),
    }).fillna(0).astype(np.int64)
    items.index.name = "item_id"
    items["share_rate"] = items["shares"] / items["views"].clip(lower=1)
    items["referral_conversion_rate"] = items["referred_purchases"] / items["referred_views"].clip(lower=1)
    items["viral_coefficient"] = items["referred_purchases"] / items["share_chains"].clip(lower=1)
    return Attribution(chains=chains.drop(columns="share_row").reset_index(drop=True),
                       purchases=purchases.reset_index(drop=True),
                       users=users[list(USER_COLUMNS)], items=items[list(ITEM_COLUMNS)], rates=rates)
