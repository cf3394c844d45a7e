"""Why a category's propensity segment loses to the baseline at the top 1%, on a demo-data set (it reads
the generator's truth.json): per category with 50 buyers after the cut, whether it is a consumable and its
true reorder cycle, the interval learnt from the data (features.propensity.pair_intervals), the share of
holdout buyers who bought the category before, the holdout buy rate of past buyers by days since their last
purchase over that interval, and how the model's top 1% and the baseline's differ.

The model is fitted as segment_eval.py does it (window A, labels in [T1, T2)); `--validation` runs one
window earlier, never reading the test part.

    OMP_NUM_THREADS=1 nice -n 10 uv run python benchmarks/segment_losses.py /tmp/pr/demo5k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from features.dataset import load_dataset
from features.propensity import PropensityContext
from features.state import DAY
from features.weights import CONVERSION_TYPES
from training.params import load_params
from training.pipeline import ITEM_META_COLUMNS
from training.propensity import fit_propensity
from training.split import time_holdout, validation_cut
from training.window import fit_window

RATIO_EDGES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def _label(ratio_bin: int) -> str:
    return f"<{RATIO_EDGES[ratio_bin]}" if ratio_bin < len(RATIO_EDGES) else f">={RATIO_EDGES[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--validation", action="store_true")
    args = parser.parse_args()
    truth = json.loads((args.data / "truth.json").read_text())["categories"]
    params = load_params(None)
    data = load_dataset(args.data, params.weights.keys())
    if data.items is None:
        raise SystemExit("needs the items' categories")
    events = data.events
    holdout = time_holdout(events, params.split)
    if args.validation:
        events = holdout.train
        holdout = time_holdout(events, params.split)
    if holdout.cut is None:
        raise SystemExit("needs time order")
    t2, t1 = holdout.cut, validation_cut(holdout, params.split)
    window_a = fit_window(events, data.items, params, t1, ITEM_META_COLUMNS, data.social)
    model = fit_propensity(window_a, events, t1, t2, params.propensity, say=lambda _: None)["category"]
    window = fit_window(events, data.items, params, t2, ITEM_META_COLUMNS, data.social)
    state, n = window.state, len(window.users)
    context = PropensityContext(state, window.models.als_users, window.models.als_items)
    bought = holdout.test.loc[holdout.test["event_type"].isin(CONVERSION_TYPES)]
    buyer = window.users.indexes(bought["user_id"])
    category_of = data.items.drop_duplicates("item_id").set_index("item_id")["category"].astype(str)
    bought_category = category_of.reindex(bought["item_id"]).to_numpy(dtype=object)
    codes = np.asarray(state.item_category)
    purchases, last_purchase = state.pair_purchases.tocsc(), state.pair_last_purchase.tocsc()
    activity = np.nan_to_num(np.asarray(state.user_last_seen, dtype=np.float64), nan=0.0)
    span = max(float(activity.max() - activity.min()), 1.0)
    k = max(1, round(n * 0.01))
    for category in pd.Series(bought_category[buyer >= 0]).value_counts().index:
        future = np.zeros(n, dtype=bool)
        future[buyer[(buyer >= 0) & (bought_category == category)]] = True
        if future.sum() < 50:
            continue
        items = np.flatnonzero(codes == window.categories.index(category))
        counts = np.asarray(purchases[:, items].sum(axis=1)).ravel()
        last = last_purchase[:, items].max(axis=1).toarray().ravel()
        baseline = np.where(counts > 0, 2.0 + counts + last / (last.max() + 1.0), (activity - activity.min()) / span)
        target = context.target(items)
        scores = model.probability(context.features(target, np.arange(n)))
        top_base, top_model = np.argsort(-baseline)[:k], np.argsort(-scores)[:k]
        past = counts > 0
        ratio = (context.reference - last) / DAY / target.interval_days
        ratio_bin = np.digitize(ratio, RATIO_EDGES)
        rates = ", ".join(f"{_label(b)} {future[past & (ratio_bin == b)].mean():.2f} "
                          f"({int((past & (ratio_bin == b)).sum())})"
                          for b in np.unique(ratio_bin[past & np.isfinite(ratio)]))
        truth_row = truth.get(category, {})
        print(f"{category}: consumable {truth_row.get('consumable')}, cycle {truth_row.get('rebuy_days')} days, "
              f"learnt interval {target.interval_days:.1f} days, repeat share {target.repeat_share:.2f}; "
              f"{int(future.sum())} holdout buyers, {future[past].sum() / future.sum():.0%} of them past buyers; "
              f"{int(past.sum())} past buyers buy at {future[past].mean():.3f}, the others at "
              f"{future[~past].mean():.4f}")
        print(f"  top 1% ({k} users): baseline {int(future[top_base].sum())} buyers ({int(past[top_base].sum())} "
              f"past buyers), model {int(future[top_model].sum())} ({int(past[top_model].sum())}); "
              f"{len(np.intersect1d(top_base, top_model))} users in both")
        if rates:
            print(f"  past buyers' buy rate by days since the last purchase / interval (users): {rates}")


if __name__ == "__main__":
    main()
