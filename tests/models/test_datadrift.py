"""Online data drift: window statistics recomputed directly, windows, streaks, references.

Every statistic the monitor reports is checked against an independent computation on the
same window: the reference and window values binned here with ``np.searchsorted`` /
``np.bincount`` (numeric) or a category map (categorical), JS from scipy, chi-square from
``scipy.stats.chisquare`` where scipy accepts the expected counts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import chisquare

from models.datadrift import (
    STATISTICS,
    DataDriftMonitor,
    DriftConfig,
    FeatureWindow,
    chi_square,
    js_distance,
    ks_distance,
    psi,
)
from models.events import class_key
from models.join import ModelRecord
from models.monitor import ModelState, VersionMonitor
from models.policy import PolicyBook, PolicyConfig, RetrainingPolicy
from models.reference import FeatureProfile, ReferenceProfile, build_profile
from models.simulation import WideScenario, simulate_wide

FLOOR = 1e-4
EXACT = 1e-9
COUNTRIES = [f"K{k:02d}" for k in range(25)]  # 25 categories: top 20 kept, 5 in "other"
COUNTRY_P = np.array([1.0 / (k + 1) for k in range(25)]) / sum(1.0 / (k + 1) for k in range(25))
CHANNELS = ["web", "app", "store"]
Reasons = list[dict[str, Any]]


# -- direct computations ---------------------------------------------------------------


def numeric_counts(edges: Sequence[float], values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right"),
                       minlength=len(edges) + 1)


def categorical_counts(categories: Sequence[str], values: Sequence[Any]) -> np.ndarray:
    index = {c: i for i, c in enumerate(categories)}
    bins = [index.get(class_key(v), len(categories)) for v in values]
    return np.bincount(np.asarray(bins, dtype=np.int64), minlength=len(categories) + 1)


def chi2_direct(p: np.ndarray, counts: np.ndarray) -> float:
    used = (p > 0) | (counts > 0)  # a bin empty in both adds nothing (scipy on the support)
    p, counts = p[used], counts[used]
    expected = np.maximum(p, FLOOR) * counts.sum()
    if math.isclose(expected.sum(), counts.sum(), rel_tol=1e-12):
        return float(chisquare(counts, f_exp=expected).statistic)
    # Flooring an empty reference bin ("other" when the reference had at most top_k
    # categories) adds 1e-4 * n to the expected total, and scipy.stats.chisquare refuses
    # expected counts whose sum differs from the observed (rtol 1.5e-8): Pearson's formula.
    return float(np.sum((counts - expected) ** 2 / expected))


def direct(p_counts: np.ndarray, q_counts: np.ndarray, kind: str) -> dict[str, float]:
    """Statistics of window counts ``q_counts`` against reference counts ``p_counts``."""
    p = p_counts / p_counts.sum()
    q = q_counts / q_counts.sum()
    pf, qf = np.maximum(p, FLOOR), np.maximum(q, FLOOR)
    out = {"psi": float(np.sum((qf - pf) * np.log(qf / pf))),
           "js": float(jensenshannon(p, q, base=2))}
    if kind == "numeric":
        out["ks"] = float(np.max(np.abs(np.cumsum(p) - np.cumsum(q))))
    else:
        out["chi2"] = chi2_direct(p, q_counts)
        out["unseen"] = float(q_counts[-1] / q_counts.sum()) if p_counts[-1] == 0 else 0.0
    return out


def assert_stats(reported: dict[str, float], expected: dict[str, float],
                 missing: float = 0.0) -> None:
    assert set(reported) == {*expected, "missing"}
    assert reported["missing"] == pytest.approx(missing, abs=EXACT)
    for name, value in expected.items():
        assert reported[name] == pytest.approx(value, abs=EXACT), name


def feed(monitor: DataDriftMonitor, rows: Sequence[dict[str, Any]],
         predictions: Sequence[Any] | None = None, ts0: float = 0.0,
         step: float = 1.0) -> list[tuple[int, Reasons]]:
    """Add ``rows`` at ``ts0, ts0 + step, ...``; the (1-based) rows that returned reasons."""
    fired = []
    for i, row in enumerate(rows):
        prediction = None if predictions is None else predictions[i]
        reasons = monitor.add_prediction(ts0 + i * step, row, prediction)
        if reasons:
            fired.append((i + 1, reasons))
    return fired


def rows_of(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.to_dict("records")


def reference_frame(seed: int = 20, n: int = 5000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "score": rng.normal(0.0, 1.0, n).round(1),  # rounded: many values sit on an edge
        "amount": rng.lognormal(3.0, 1.0, n),
        "visits": rng.poisson(2.0, n).astype(np.float64),  # coinciding quantiles
        "country": rng.choice(COUNTRIES, n, p=COUNTRY_P),
        "channel": rng.choice(CHANNELS, n, p=[0.5, 0.3, 0.2]),
        "pred": rng.integers(0, 2, n),
        "label": rng.integers(0, 2, n),
    })


def window_frame(rng: np.random.Generator, n: int, shift: float, unseen: float) -> pd.DataFrame:
    """A window whose numeric features move by ``shift`` and a share ``unseen`` is new."""
    blend = (1.0 - shift) * COUNTRY_P + shift * COUNTRY_P[::-1]
    channel = rng.choice(CHANNELS, n, p=[0.5 - shift / 4, 0.3, 0.2 + shift / 4])
    channel[rng.random(n) < unseen] = "kiosk"
    country = rng.choice(COUNTRIES, n, p=blend)
    country[rng.random(n) < unseen] = "ZZ"
    score = rng.normal(shift, 1.0 + shift, n).round(1)
    score[:3] = [-np.inf, np.inf, 99.0]  # beyond every edge: the end bins
    return pd.DataFrame({
        "score": score,
        "amount": rng.lognormal(3.0 + shift, 1.0, n),
        "visits": rng.poisson(2.0 + 2.0 * shift, n).astype(np.float64),
        "country": country,
        "channel": channel,
    })


def profile_2(counts: tuple[int, int, int] = (50, 50, 0), **kw: Any) -> ReferenceProfile:
    """A reference of categorical features over ("a", "b") with the given counts."""
    names = kw.pop("names", ("f",))
    feature = FeatureProfile("categorical", counts=counts, missing=0, categories=("a", "b"))
    return ReferenceProfile("m", "1", "data", sum(counts), dict.fromkeys(names, feature), **kw)


# -- the statistics, recomputed --------------------------------------------------------


def test_statistic_functions_match_scipy_and_the_formulas() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, q = rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))
        q[3] = 0.0
        q /= q.sum()
        pf, qf = np.maximum(p, FLOOR), np.maximum(q, FLOOR)
        assert psi(p, q) == pytest.approx(np.sum((qf - pf) * np.log(qf / pf)), abs=EXACT)
        assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=EXACT)
        assert ks_distance(p, q) == pytest.approx(
            np.max(np.abs(np.cumsum(p) - np.cumsum(q))), abs=EXACT)
        counts = rng.multinomial(1000, q)
        assert chi_square(p, counts) == pytest.approx(
            chisquare(counts, f_exp=p * 1000).statistic, abs=EXACT)
    same = np.array([0.2, 0.3, 0.5])
    assert (psi(same, same), js_distance(same, same), ks_distance(same, same)) == (0.0, 0.0, 0.0)
    # Fixed: a bin empty in both was floored into the expected counts, so a window equal
    # to its reference scored 1e-4 per prediction (0.1 at 1,000, 10 at 100,000).
    p, counts = np.array([0.5, 0.5, 0.0]), np.array([50_000, 50_000, 0])
    assert chi_square(p, counts) == chisquare(counts[:2], f_exp=p[:2] * 100_000).statistic == 0
    assert STATISTICS == {"numeric": ("psi", "js", "ks"),
                          "categorical": ("psi", "js", "chi2", "unseen")}


def test_numeric_categorical_and_prediction_statistics_equal_direct_computation() -> None:
    ref = reference_frame()
    profile = build_profile(ref, "m", "1", prediction="pred", label="label")
    # the reference binned here, from the raw values
    score_edges = np.unique(np.quantile(ref["score"], np.arange(1, 10) / 10))
    amount_edges = np.unique(np.quantile(ref["amount"], np.arange(1, 10) / 10))
    visits_edges = np.unique(np.quantile(ref["visits"], np.arange(1, 10) / 10))
    assert profile.features["score"].edges == tuple(score_edges.tolist())
    assert profile.features["amount"].edges == tuple(amount_edges.tolist())
    assert profile.features["visits"].edges == tuple(visits_edges.tolist())
    assert np.isin(score_edges, ref["score"]).all()  # rounded: values sit on the edges
    assert visits_edges.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # coinciding deciles: 6 bins
    ranked = sorted(Counter(ref["country"]).items(), key=lambda kv: (-kv[1], kv[0]))
    countries = [k for k, _ in ranked[:20]]
    assert list(profile.features["country"].categories) == countries
    channels = list(profile.features["channel"].categories)
    p = {
        "score": numeric_counts(score_edges, ref["score"]),
        "amount": numeric_counts(amount_edges, ref["amount"]),
        "visits": numeric_counts(visits_edges, ref["visits"]),
        "country": categorical_counts(countries, ref["country"]),
        "channel": categorical_counts(channels, ref["channel"]),
        "prediction": categorical_counts(["0", "1"], ref["pred"]),
    }
    assert p["country"][-1] > 0 and p["channel"][-1] == 0  # chi2: scipy, then the formula
    edges = {"score": score_edges, "amount": amount_edges, "visits": visits_edges}

    monitor = DataDriftMonitor(DriftConfig(window=2000), reference=profile)
    rng = np.random.default_rng(21)
    for w, (shift, unseen) in enumerate([(0.0, 0.0), (0.25, 0.05), (1.0, 0.3)]):
        window = window_frame(rng, 2000, shift, unseen)
        predictions = rng.choice([0, 1, 2], 2000, p=[0.5 - shift / 3, 0.5, shift / 3])
        feed(monitor, rows_of(window), predictions.tolist(), ts0=w * 2000.0)
        assert monitor.windows == w + 1
        reported = monitor.last["features"]
        assert list(reported) == ["amount", "channel", "country", "score", "visits"]
        for name in ("score", "amount", "visits"):
            q = numeric_counts(edges[name], window[name])
            assert_stats(reported[name], direct(p[name], q, "numeric"))
        for name, categories in (("country", countries), ("channel", channels)):
            q = categorical_counts(categories, window[name])
            assert_stats(reported[name], direct(p[name], q, "categorical"))
        q = categorical_counts(["0", "1"], predictions)
        assert_stats(monitor.last["prediction"], direct(p["prediction"], q, "categorical"))
        assert "label" not in monitor.last  # no labels came
    last = monitor.last["features"]
    assert last["channel"]["unseen"] == pytest.approx(0.3, abs=0.02)
    assert last["country"]["unseen"] == 0.0  # "ZZ" hides in the non-empty "other" bin
    assert monitor.last["prediction"]["unseen"] > 0.3  # class 2 was never predicted before


def test_missing_values_are_reported_apart_and_left_out_of_the_proportions() -> None:
    ref = reference_frame()
    ref.loc[::10, "score"] = np.nan
    ref.loc[::7, "channel"] = None
    profile = build_profile(ref, "m", "1", features=["score", "channel"])
    assert (profile.features["score"].missing, profile.features["channel"].missing) == (500, 715)
    edges = profile.features["score"].edges
    channels = profile.features["channel"].categories
    p_score = numeric_counts(edges, ref["score"].dropna())
    p_channel = categorical_counts(channels, ref["channel"].dropna())

    rng = np.random.default_rng(5)
    window = window_frame(rng, 400, 0.5, 0.1)
    scores: list[Any] = window["score"].tolist()
    channel: list[Any] = window["channel"].tolist()
    absent = [None, float("nan"), "n/a", True, "1.5"]  # strings and bools are not numbers
    for i in range(0, 400, 8):
        scores[i] = absent[i % 5]
    for i in range(0, 400, 5):
        channel[i] = [None, float("nan")][i % 2]
    rows = [{"score": s, "channel": c} for s, c in zip(scores, channel, strict=True)]
    rows[399] = {}  # a feature absent from the event is missing too
    monitor = DataDriftMonitor(DriftConfig(window=400), reference=profile)
    feed(monitor, rows)

    present_scores = [s for s, row in zip(scores, rows, strict=True)
                      if "score" in row and isinstance(s, float) and not math.isnan(s)]
    present_channels = [c for c, row in zip(channel, rows, strict=True)
                        if "channel" in row and isinstance(c, str)]
    assert (len(present_scores), len(present_channels)) == (349, 319)
    reported = monitor.last["features"]
    assert_stats(reported["score"],
                 direct(p_score, numeric_counts(edges, present_scores), "numeric"),
                 missing=51 / 400)
    assert_stats(reported["channel"],
                 direct(p_channel, categorical_counts(channels, present_channels),
                        "categorical"),
                 missing=81 / 400)


def test_a_window_with_every_value_missing_reports_only_the_missing_rate() -> None:
    monitor = DataDriftMonitor(DriftConfig(window=3, consecutive=1), reference=profile_2())
    assert feed(monitor, [{"f": None}, {"f": float("nan")}, {"g": "a"}]) == []
    assert monitor.last == {"features": {"f": {"missing": 1.0}}}


def test_unseen_is_the_window_share_in_other_only_when_the_reference_other_bin_is_empty() -> None:
    rows = [{"f": v} for v in ["a"] * 5 + ["b"] * 2 + ["new"] * 3 + [None] * 2]
    empty_other = DataDriftMonitor(DriftConfig(window=12), reference=profile_2((50, 50, 0)))
    feed(empty_other, rows)
    stats = empty_other.last["features"]["f"]
    assert stats["unseen"] == pytest.approx(3 / 10, abs=EXACT)  # of the present values
    assert stats["missing"] == pytest.approx(2 / 12, abs=EXACT)
    assert_stats(stats, direct(np.array([50, 50, 0]), np.array([5, 2, 3]), "categorical"),
                 missing=2 / 12)
    # A reference whose "other" bin holds rare categories cannot tell them from new ones:
    # unseen is 0 (the module docstring's "share of the window outside the reference's top
    # categories" would be 0.3 here; the code and README's "unseen-category rate" say 0).
    rare_other = DataDriftMonitor(DriftConfig(window=12), reference=profile_2((45, 45, 10)))
    feed(rare_other, rows)
    assert rare_other.last["features"]["f"]["unseen"] == 0.0
    assert rare_other.last["features"]["f"]["chi2"] == pytest.approx(
        chisquare([5, 2, 3], f_exp=[4.5, 4.5, 1.0]).statistic, abs=EXACT)


def test_features_outside_the_reference_are_ignored() -> None:
    monitor = DataDriftMonitor(DriftConfig(window=2), reference=profile_2())
    feed(monitor, [{"f": "a", "extra": 1.0}, {"f": "b", "other": "x"}])
    assert list(monitor.last["features"]) == ["f"]


# Fixed (models/datadrift.py, FeatureWindow.evaluate): a feature with no values in the
# reference (a column empty in the training data) was compared with all-zero proportions:
# ordinary live values then drifted at once (psi 9.2, js 1.0, ks 1.0), every window.
def test_a_feature_with_no_reference_values_reports_its_missing_rate_and_never_drifts() -> None:
    empty = FeatureProfile("numeric", counts=(0,), missing=100, edges=())
    profile = ReferenceProfile("m", "1", "data", 100, {"x": empty})
    monitor = DataDriftMonitor(DriftConfig(window=4, consecutive=1), reference=profile)
    assert feed(monitor, [{"x": 1.0}, {"x": 2.0}, {"x": 3.0}, {"x": None}] * 3) == []
    assert monitor.last == {"features": {"x": {"missing": 0.25}}}
    frame = pd.DataFrame({"x": [float("nan")] * 10, "y": [1.0, 2.0] * 5})
    assert build_profile(frame, "m", "1").features["x"].counts == (0,)


# Fixed (models/datadrift.py, DataDriftMonitor._apply): drift_max_features capped only a
# bootstrapped reference; a published profile of 3,000 columns was tracked whole.
def test_a_published_profile_is_tracked_up_to_max_features_by_name() -> None:
    names = ("zeta", "alpha", "mid", "beta")
    published = ReferenceProfile.from_json(profile_2(names=names).to_json())
    for reference in (profile_2(names=names), published):  # as built, as a worker reads it
        monitor = DataDriftMonitor(DriftConfig(window=2, max_features=2), reference=reference)
        feed(monitor, [dict.fromkeys(names, "a"), dict.fromkeys(names, "b")])
        assert list(monitor.features) == ["alpha", "beta"]
        assert list(monitor.last["features"]) == ["alpha", "beta"]
        assert monitor.untracked == 4  # two features of two predictions


# -- prediction and label ----------------------------------------------------------------


def test_label_is_judged_only_once_a_window_has_min_labels_labels() -> None:
    ref = reference_frame()
    profile = build_profile(ref, "m", "1", prediction="pred", label="label",
                            features=["channel"])
    p_label = categorical_counts(["0", "1"], ref["label"])
    config = DriftConfig(window=100, min_labels=150, consecutive=1)
    monitor = DataDriftMonitor(config, reference=profile)
    rng = np.random.default_rng(8)
    labels = rng.choice([0, 1], 300, p=[0.2, 0.8]).tolist()
    rows = [{"channel": "web"}] * 100

    fired = []
    for w in range(3):
        for label in labels[w * 100:(w + 1) * 100]:
            monitor.add_label(label)
        fired.append(feed(monitor, rows, [0] * 100, ts0=w * 100.0))
        if w == 0:
            assert "label" not in monitor.last  # 100 labels: counted into the next window
            assert monitor.label is not None and monitor.label.n == 100
    # judged at the second window, on all 200 labels; the third has 100: not judged, and
    # the second's statistics stay the last (driftwarden_label_drift holds them)
    assert monitor.label is not None and monitor.label.n == 100
    second = fired[1][-1][1]
    label_reason = next(r for r in second if r["kind"] == "label_drift")
    expected = direct(p_label, categorical_counts(["0", "1"], labels[:200]), "categorical")
    assert label_reason["value"] == pytest.approx(expected["psi"], abs=EXACT)
    assert_stats(monitor.last["label"], expected)
    assert [r for _, rs in fired[0] + fired[2] for r in rs if r["kind"] == "label_drift"] == []


def test_label_statistics_equal_direct_computation() -> None:
    ref = reference_frame()
    profile = build_profile(ref, "m", "1", prediction="pred", label="label",
                            features=["channel"])
    monitor = DataDriftMonitor(DriftConfig(window=250, min_labels=200), reference=profile)
    labels = np.random.default_rng(9).choice([0, 1, 7], 250, p=[0.4, 0.5, 0.1]).tolist()
    for label in labels:
        monitor.add_label(label)
    feed(monitor, [{"channel": "app"}] * 250, [1] * 250)
    p_label = categorical_counts(["0", "1"], ref["label"])
    assert_stats(monitor.last["label"],
                 direct(p_label, categorical_counts(["0", "1"], labels), "categorical"))
    assert monitor.last["label"]["unseen"] == pytest.approx(labels.count(7) / 250, abs=EXACT)


# -- windows -------------------------------------------------------------------------------


def test_a_window_closes_after_window_predictions() -> None:
    monitor = DataDriftMonitor(DriftConfig(window=5), reference=profile_2())
    for i in range(12):
        monitor.add_prediction(float(i), {"f": "a"}, None)
        assert monitor.windows == (i + 1) // 5
    assert monitor.window_n == 2


def test_a_window_closes_after_window_seconds_of_event_time_including_that_event() -> None:
    monitor = DataDriftMonitor(DriftConfig(window=1000, window_seconds=10.0),
                               reference=profile_2())
    # ts 0..9 are "a"; the event at ts 10 closes the window and is in it
    for ts in range(10):
        monitor.add_prediction(float(ts), {"f": "a"}, None)
    assert monitor.windows == 0
    monitor.add_prediction(10.0, {"f": "b"}, None)
    assert monitor.windows == 1
    assert_stats(monitor.last["features"]["f"],
                 direct(np.array([50, 50, 0]), np.array([10, 1, 0]), "categorical"))
    # the next window starts at its first event (ts 30) and a gap closes it at once
    monitor.add_prediction(30.0, {"f": "b"}, None)
    monitor.add_prediction(35.0, {"f": "b"}, None)
    assert monitor.windows == 1
    monitor.add_prediction(500.0, {"f": "a"}, None)
    assert monitor.windows == 2
    assert_stats(monitor.last["features"]["f"],
                 direct(np.array([50, 50, 0]), np.array([1, 2, 0]), "categorical"))


def test_count_or_time_whichever_comes_first() -> None:
    config = PolicyConfig(drift_window=4, drift_window_seconds=2.5).drift_config()
    monitor = DataDriftMonitor(config, reference=profile_2())
    closes = []
    for i, ts in enumerate([0, 0.5, 1, 1.5, 2, 2.1, 4.6, 4.7, 4.8, 4.9, 5.0]):
        monitor.add_prediction(float(ts), {"f": "a"}, None)
        if monitor.window_n == 0:
            closes.append(i + 1)
    assert closes == [4, 7, 11]  # by count, by time (4.6 - 2.0 >= 2.5), by count


# -- decisions -----------------------------------------------------------------------------

DRIFTING = [{"f": "a"}] * 10  # psi of (1, 0) against (0.5, 0.5): 4.26
CALM = [{"f": "a"}] * 5 + [{"f": "b"}] * 5  # psi 0


@pytest.mark.parametrize(("consecutive", "fires"), [
    (1, [1, 5, 7]),
    (2, [2, 8]),
    (3, [3]),
])
def test_consecutive_windows_latch_and_rearm(consecutive: int, fires: list[int]) -> None:
    monitor = DataDriftMonitor(DriftConfig(window=10, consecutive=consecutive),
                               reference=profile_2())
    pattern = "DDDCDCDD"
    fired = []
    for w, kind in enumerate(pattern, start=1):
        reasons = feed(monitor, DRIFTING if kind == "D" else CALM, ts0=w * 10.0)
        if reasons:
            fired.append(w)
    assert fired == fires
    assert monitor.features["f"].streak == 2 and monitor.features["f"].latched == (
        consecutive <= 2)


def test_feature_window_judge_directly() -> None:
    window = FeatureWindow(profile_2().features["f"])
    config = DriftConfig(threshold=0.1, consecutive=2)
    assert window.judge({"psi": 0.2}, config) is None
    assert window.judge({"psi": 0.3}, config) == {"statistic": "psi", "value": 0.3,
                                                  "threshold": 0.1}
    assert window.judge({"psi": 0.5}, config) is None  # latched
    assert window.judge({"psi": 0.1}, config) is None  # at the threshold: still drifting
    assert window.judge({"psi": 0.0999}, config) is None  # under: re-arms
    assert (window.streak, window.latched) == (0, False)
    assert window.judge({"js": 0.9}, config) is None  # no psi: nothing to judge


def test_the_configured_statistic_decides() -> None:
    # (0.7, 0.3) against (0.5, 0.5): psi 0.1695, js 0.1741
    rows = [{"f": "a"}] * 7 + [{"f": "b"}] * 3
    for statistic, threshold, fires in (("psi", 0.17, False), ("psi", 0.16, True),
                                        ("js", 0.18, False), ("js", 0.17, True)):
        config = DriftConfig(window=10, consecutive=1, statistic=statistic, threshold=threshold)
        monitor = DataDriftMonitor(config, reference=profile_2())
        reasons = feed(monitor, rows)
        assert bool(reasons) == fires, (statistic, threshold)
        if fires:
            value = monitor.last["features"]["f"][statistic]
            assert reasons[0][1] == [{"kind": "feature_drift", "feature": "f",
                                      "statistic": statistic, "value": value,
                                      "threshold": threshold}]


def test_ks_decides_numeric_features_only() -> None:
    numeric = FeatureProfile("numeric", counts=(50, 50), missing=0, edges=(0.0,))
    categorical = profile_2().features["f"]
    profile = ReferenceProfile("m", "1", "data", 100, {"x": numeric, "f": categorical})
    config = DriftConfig(window=10, consecutive=1, statistic="ks", threshold=0.3)
    monitor = DataDriftMonitor(config, reference=profile)
    fired = feed(monitor, [{"x": -1.0, "f": "a"}] * 10)
    assert [(r["feature"], r["value"]) for r in fired[0][1]] == [("x", 0.5)]


def test_reasons_come_strongest_first_with_the_contract_keys() -> None:
    profile = profile_2(names=("a_mild", "b_none", "c_strong", "d_medium"),
                        prediction=FeatureProfile("categorical", (50, 50, 0), 0,
                                                  categories=("0", "1")))
    monitor = DataDriftMonitor(DriftConfig(window=10, consecutive=1), reference=profile)
    share = {"a_mild": 7, "b_none": 5, "c_strong": 10, "d_medium": 9}  # "a"s of 10
    rows = [{name: "a" if i < k else "b" for name, k in share.items()} for i in range(10)]
    fired = feed(monitor, rows, ["0"] * 8 + ["1"] * 2)
    reasons = fired[0][1]
    assert [(r["kind"], r.get("feature")) for r in reasons] == [
        ("feature_drift", "c_strong"), ("feature_drift", "d_medium"),
        ("prediction_drift", None), ("feature_drift", "a_mild")]
    values = [r["value"] for r in reasons]
    assert values == sorted(values, reverse=True)
    for r in reasons:
        assert r["statistic"] == "psi" and r["threshold"] == 0.1
        if r["kind"] == "feature_drift":
            assert set(r) == {"kind", "feature", "statistic", "value", "threshold"}
            assert r["value"] == monitor.last["features"][r["feature"]]["psi"]
    expected = direct(np.array([50, 50, 0]), np.array([8, 2, 0]), "categorical")["psi"]
    assert reasons[2]["value"] == pytest.approx(expected, abs=EXACT)


def test_prediction_and_label_reasons_name_what_drifted() -> None:
    # The kind names the distribution; only feature_drift reasons carry "feature".
    labels = FeatureProfile("categorical", (50, 50, 0), 0, categories=("0", "1"))
    profile = profile_2(prediction=labels, label=labels)
    monitor = DataDriftMonitor(DriftConfig(window=10, consecutive=1, min_labels=10),
                               reference=profile)
    for _ in range(10):
        monitor.add_label("1")
    reasons = feed(monitor, CALM, ["0"] * 10)[0][1]
    assert sorted(r["kind"] for r in reasons) == ["label_drift", "prediction_drift"]
    for r in reasons:
        assert set(r) == {"kind", "statistic", "value", "threshold"}, r


def test_a_bootstrap_feature_always_missing_is_not_judged_once_it_shows_up() -> None:
    # A feature that was always missing in the bootstrap rows gets an empty profile (see
    # ProfileBuilder). Once it shows up it used to drift at once (psi 9.2, ks 1.0, js 1.0:
    # any values against none); like a feature the reference lacks, it is not judged, and
    # its missing rate is reported. No warning either (scipy's jensenshannon gives 0/0).
    monitor = DataDriftMonitor(DriftConfig(window=3, reference_size=5, consecutive=1),
                               model="m", version="1")
    feed(monitor, [{"x": None, "y": 1.0}] * 5)
    assert monitor.reference is not None
    assert monitor.reference.features["x"] == FeatureProfile("numeric", (0,), 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert feed(monitor, [{"x": 1.0, "y": 1.0}] * 3) == []
    assert monitor.last["features"]["x"] == {"missing": 0.0}
    assert [str(w.message) for w in caught] == []


# -- references: bootstrap and use() -----------------------------------------------------


def bootstrap_rows(n: int, seed: int = 3) -> tuple[list[dict[str, Any]], list[int]]:
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {
            "x": None if i % 9 == 0 else float(rng.normal(2.0, 1.0)),
            "c": None if i % 11 == 0 else str(rng.choice(["p", "q", "r", "s", "t"],
                                                          p=[0.4, 0.3, 0.15, 0.1, 0.05])),
            "flag": bool(rng.random() < 0.3),
        }
        if i >= 50:
            row["late"] = int(rng.integers(0, 100))  # first seen at row 50: missing before
        rows.append(row)
    return rows, rng.integers(0, 2, n).tolist()


def test_bootstrap_the_first_reference_size_predictions_become_the_reference() -> None:
    config = DriftConfig(window=100, reference_size=300, bins=5, top_k=3)
    monitor = DataDriftMonitor(config, model="m", version="1")
    rows, predictions = bootstrap_rows(500)
    assert feed(monitor, rows[:299], predictions[:299]) == []
    assert (monitor.source, monitor.reference, monitor.windows, monitor.last) == (
        None, None, 0, {})
    feed(monitor, rows[299:300], predictions[299:300], ts0=299.0)
    frame = pd.DataFrame(rows[:300])
    frame["prediction"] = predictions[:300]
    expected = build_profile(frame, "m", "1", prediction="prediction", bins=5, top_k=3,
                             source="bootstrap")
    assert monitor.source == "bootstrap"
    assert monitor.reference == expected
    assert sorted(expected.features) == ["c", "flag", "late", "x"]
    assert expected.features["late"].missing == 50
    assert expected.features["flag"].categories == ("false", "true")
    assert (expected.n, expected.label, expected.baseline) == (300, None, {})
    assert (monitor.windows, monitor.window_n) == (0, 0)
    # the 400th prediction closes the first window: rows 300..399 against the reference
    feed(monitor, rows[300:399], predictions[300:399], ts0=300.0)
    assert monitor.windows == 0
    feed(monitor, rows[399:400], predictions[399:400], ts0=399.0)
    assert monitor.windows == 1
    x = expected.features["x"]
    window_x = [r["x"] for r in rows[300:400] if r["x"] is not None]
    assert_stats(monitor.last["features"]["x"],
                 direct(np.asarray(x.counts), numeric_counts(x.edges, window_x), "numeric"),
                 missing=11 / 100)
    c = expected.features["c"]
    window_c = [r["c"] for r in rows[300:400] if r["c"] is not None]
    assert_stats(monitor.last["features"]["c"],
                 direct(np.asarray(c.counts), categorical_counts(c.categories, window_c),
                        "categorical"),
                 missing=(100 - len(window_c)) / 100)


def test_use_while_bootstrapping_applies_at_once() -> None:
    config = DriftConfig(window=10, reference_size=300)
    monitor = DataDriftMonitor(config, model="m", version="1")
    feed(monitor, [{"f": "b"}] * 50)
    published = profile_2()
    monitor.use(published)
    assert monitor.reference is published and monitor.source == "data"
    feed(monitor, [{"f": "a"}] * 10, ts0=50.0)  # the 50 buffered rows are not in it
    assert monitor.windows == 1
    assert_stats(monitor.last["features"]["f"],
                 direct(np.array([50, 50, 0]), np.array([10, 0, 0]), "categorical"))


def test_use_after_the_reference_applies_from_the_next_window() -> None:
    old = profile_2((50, 50, 0))
    new = profile_2((90, 10, 0))
    monitor = DataDriftMonitor(DriftConfig(window=10, consecutive=1), reference=old)
    rows = [{"f": "a"}] * 9 + [{"f": "b"}]
    feed(monitor, rows[:6])
    monitor.use(new)
    assert monitor.reference is old
    fired = feed(monitor, rows[6:], ts0=6.0)  # the open window is judged against the old
    assert_stats(monitor.last["features"]["f"],
                 direct(np.array([50, 50, 0]), np.array([9, 1, 0]), "categorical"))
    assert fired and fired[0][1][0]["feature"] == "f"
    assert monitor.reference is new and monitor.window_n == 0
    assert feed(monitor, rows, ts0=10.0) == []  # (0.9, 0.1) is the new reference itself
    assert monitor.last["features"]["f"]["psi"] == pytest.approx(0.0, abs=EXACT)


# -- policy and version monitor ----------------------------------------------------------

REASON = {"kind": "feature_drift", "feature": "amount", "statistic": "psi", "value": 0.4,
          "threshold": 0.1}


def test_data_drift_fires_without_outcomes_and_respects_the_cooldown() -> None:
    policy = RetrainingPolicy(PolicyConfig(min_outcomes=1000, cooldown_seconds=100.0),
                              "m", "1")
    kw: dict[str, Any] = {"outcomes_seen": 0, "predictions_seen": 12_000, "accuracy": None,
                          "metrics": dict}
    assert policy.data_drift(ts=5.0, reasons=[], **kw) is None
    event = policy.data_drift(ts=10.0, reasons=[REASON], **kw)
    assert event == {
        "id": "m:1:000001", "model": "m", "version": "1", "ts": 10.0, "severity": "warning",
        "reasons": [REASON],
        "evidence": {"predictions_seen": 12_000, "outcomes_seen": 0,
                     "window": {"start": 5.0, "end": 10.0}},
        "metrics": {"accuracy": None, "accuracy_reference": None},
    }
    assert policy.data_drift(ts=109.0, reasons=[REASON], **kw) is None
    assert policy.suppressed == 1
    second = policy.data_drift(ts=110.0, reasons=[REASON, REASON], **kw)
    assert second is not None
    assert (second["id"], second["severity"]) == ("m:1:000002", "critical")
    assert policy.suppressed == 1


def test_data_drift_event_ids_continue_the_version_sequence() -> None:
    policy = RetrainingPolicy(PolicyConfig(min_outcomes=1, cooldown_seconds=10.0), "m", "7")
    kw: dict[str, Any] = {"outcomes_seen": 5, "predictions_seen": 5, "drift": None,
                          "metrics": dict}
    assert policy.update(ts=0.0, accuracy=0.9, **kw) is None
    first = policy.update(ts=1.0, accuracy=0.5, **kw)
    assert first is not None and first["id"] == "m:7:000001"
    drift_kw: dict[str, Any] = {"outcomes_seen": 5, "predictions_seen": 9, "accuracy": 0.5,
                                "metrics": lambda: {"rolling_accuracy": 0.5}}
    assert policy.data_drift(ts=5.0, reasons=[REASON], **drift_kw) is None  # shared cooldown
    event = policy.data_drift(ts=11.0, reasons=[REASON], **drift_kw)
    assert event is not None and event["id"] == "m:7:000002"
    assert event["metrics"]["accuracy"] == 0.5 and event["severity"] == "critical"  # 44% drop
    assert policy.seq == 2 and policy.suppressed == 1


def test_policy_drift_keys_make_the_drift_config() -> None:
    assert PolicyConfig().drift_config() == DriftConfig()
    assert DriftConfig() == DriftConfig(
        window=2000, window_seconds=3600.0, statistic="psi", threshold=0.1, consecutive=2,
        reference_size=10_000, bins=10, top_k=20, max_features=100, min_labels=200,
        task="classification")
    config = PolicyConfig(task="regression", reference_size=500, drift_window=50,
                          drift_window_seconds=30, drift_statistic="ks", drift_threshold=0.2,
                          drift_consecutive=3, drift_bins=4, drift_top_k=5,
                          drift_max_features=7, drift_min_labels=9)
    assert config.drift_config() == DriftConfig(
        window=50, window_seconds=30.0, statistic="ks", threshold=0.2, consecutive=3,
        reference_size=500, bins=4, top_k=5, max_features=7, min_labels=9, task="regression")


def test_version_monitor_use_reference_sets_the_policy_reference_to_the_baseline() -> None:
    ref = reference_frame()
    profile = build_profile(ref, "m", "1", prediction="pred", label="label",
                            features=["channel"])
    accuracy = float(np.mean(ref["pred"] == ref["label"]))
    assert profile.baseline == {"accuracy": accuracy}
    state = ModelState("m", PolicyBook())
    assert state.use_reference(profile) is True
    assert state.use_reference(profile) is False  # already in use
    version = state.versions["1"]
    assert version.policy.reference == accuracy
    assert version.data.reference is profile  # still bootstrapping: at once
    # a regression baseline has no accuracy: the policy keeps its reference
    monitor = VersionMonitor("m", "1", PolicyConfig())
    monitor.policy.reference = 0.8
    monitor.use_reference(dataclasses.replace(profile, baseline={"mae": 1.0, "rmse": 2.0}))
    assert monitor.policy.reference == 0.8


def test_version_monitor_turns_drifting_windows_into_an_event() -> None:
    config = PolicyConfig(drift_window=10, drift_consecutive=2, cooldown_seconds=1000.0)
    monitor = VersionMonitor("m", "1", config)
    monitor.use_reference(profile_2(baseline={"accuracy": 0.9}))
    events = []
    for i in range(60):
        event = monitor.add_prediction(float(i), {"f": "a"}, "0", 0.8)
        if event is not None:
            events.append(event)
    assert len(events) == 1  # latched after the 20th prediction
    event = events[0]
    assert (event["id"], event["evidence"]["predictions_seen"]) == ("m:1:000001", 20)
    assert event["evidence"]["outcomes_seen"] == 0
    assert event["metrics"]["accuracy_reference"] == 0.9
    assert event["metrics"]["estimated_accuracy"] == pytest.approx(0.8)
    assert [r["feature"] for r in event["reasons"]] == ["f"]
    assert monitor.events_emitted == 1 and monitor.policy.suppressed == 0


@pytest.mark.parametrize(("outcomes", "accuracy", "severity"),
                         [(5, None, "warning"), (10, 0.6, "critical")])
def test_a_data_drift_event_judges_accuracy_only_over_a_full_window(
        outcomes: int, accuracy: float | None, severity: str) -> None:
    # README, "Event contract": metrics.accuracy is null until a window of outcomes; a
    # handful of labels must not make a feature-drift event critical (0.6 vs 0.92 is a
    # 35% drop, past critical_drop's 20%).
    config = PolicyConfig(window=10, drift_window=10, drift_consecutive=1)
    monitor = VersionMonitor("m", "1", config)
    monitor.use_reference(profile_2(baseline={"accuracy": 0.92}))
    for i in range(outcomes):
        monitor.add_outcome(float(i), "a", "a" if i % 5 < 3 else "b", None, 0.0)
    events = [e for i in range(10) if (e := monitor.add_prediction(10.0 + i, {"f": "a"}, "a",
                                                                   None)) is not None]
    assert len(events) == 1
    assert events[0]["metrics"]["accuracy"] == accuracy
    assert events[0]["metrics"]["rolling_accuracy"] == pytest.approx(0.6)
    assert events[0]["severity"] == severity


# -- seeded streams ------------------------------------------------------------------------


def run_wide(scenario: WideScenario) -> tuple[ModelState, list[tuple[int, dict[str, Any]]],
                                              list[dict[str, Any]]]:
    """Stream the scenario through ModelState: the state, the events, each window's stats."""
    state = ModelState(scenario.model, PolicyBook())
    events, windows = [], []
    for i, ev in enumerate(simulate_wide(scenario)):
        v = ev.value
        record = ModelRecord("p", v["model"], v["version"], "p0", (i, 0),
                             [ev.ts, v["features"], v["prediction"], None])
        event = state.absorb(record)
        if event is not None:
            events.append((i + 1, event))
        data = state.versions[scenario.version].data
        if data.windows > len(windows):
            windows.append(data.last)
    return state, events, windows


def test_stationary_wide_stream_raises_no_false_alarm() -> None:
    state, events, windows = run_wide(WideScenario(n=100_000, seed=11))
    version = state.versions["1"]
    assert events == [] and version.policy.suppressed == 0
    assert version.data.source == "bootstrap"
    assert len(windows) == 45  # (100,000 - 10,000 bootstrap) / 2,000
    assert all(len(w["features"]) == 20 for w in windows)
    worst = max(max(s["psi"] for s in w["features"].values()) for w in windows)
    assert 0.0 < worst < 0.03
    assert max(w["prediction"]["psi"] for w in windows) < 0.03
    streaks = [fw.streak for fw in version.data.features.values()]
    assert max(streaks) == 0


@pytest.mark.parametrize(("feature", "fires_at", "psi_at_fire", "psis"), [
    # the half-shifted window (24,001-26,000) stays under 0.1: two full ones are needed
    ("n3", 30_000, 0.2501, [0.0065, 0.078, 0.2507, 0.2501]),
    # the category swap is strong enough that the half-shifted window already counts
    ("c1", 28_000, 0.4833, [0.0014, 0.1658, 0.4833, 0.5474]),
])
def test_seeded_shift_fires_at_a_pinned_prediction(feature: str, fires_at: int,
                                                   psi_at_fire: float,
                                                   psis: list[float]) -> None:
    scenario = WideScenario(n=30_000, seed=5, numeric=4, categorical=2,
                            shift_feature=feature, shift_at=25_000, shift_sd=0.5)
    _, events, windows = run_wide(scenario)
    assert [(at, e["id"]) for at, e in events] == [(fires_at, "wide:1:000001")]
    event = events[0][1]
    assert event["evidence"]["predictions_seen"] == fires_at
    assert [(r["kind"], r["feature"], r["statistic"]) for r in event["reasons"]] == [
        ("feature_drift", feature, "psi")]
    assert round(event["reasons"][0]["value"], 4) == psi_at_fire
    # windows close at 12,000, 14,000, ..., 30,000: psi of the shifted feature from 24,000 on
    assert [round(w["features"][feature]["psi"], 4) for w in windows[6:]] == psis
    assert all(s["psi"] < 0.1 for w in windows for name, s in w["features"].items()
               if name != feature)


def test_values_of_features_the_reference_does_not_track_are_counted() -> None:
    monitor = DataDriftMonitor(DriftConfig(window=100), reference=profile_2())
    feed(monitor, [{"f": "a", "new": 1.0, "other": None}, {"f": None}, {"g": "x"}])
    # "new" and "other" on the first row, "g" on the third; a missing "f" is not extra.
    assert monitor.untracked == 3
    assert monitor.features["f"].missing == 2


# -- bulk adds ---------------------------------------------------------------------------


def mixed_rows(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """Rows of window_frame (infinities included) spiked with what bin_counts must route to
    bin_index: nulls, absent and untracked features, bools, strings and ints in numeric
    features, numbers and bools in categorical ones, a NaN."""
    rows = rows_of(window_frame(rng, n, shift=0.3, unseen=0.05))
    odd: list[Any] = [None, True, "7.5", 3, float("nan"), 0]
    for i, row in enumerate(rows):
        if rng.random() < 0.05:
            row[str(rng.choice(["score", "amount", "country"]))] = odd[i % len(odd)]
        if rng.random() < 0.03:
            del row[str(rng.choice(["visits", "channel"]))]
        if rng.random() < 0.02:
            row["extra"] = 1.0
    return rows


def drift_state(monitor: DataDriftMonitor) -> dict[str, Any]:
    return {"windows": monitor.windows, "window_n": monitor.window_n,
            "window_start": monitor.window_start, "untracked": monitor.untracked,
            "last": monitor.last, "reference": monitor.reference,
            "features": {name: (w.counts, w.missing, w.streak, w.latched)
                         for name, w in monitor.features.items()},
            "prediction": (monitor.prediction.counts, monitor.prediction.missing)
            if monitor.prediction else None}


def test_bulk_adds_equal_one_call_per_prediction() -> None:
    """add_predictions in chunks of every size (1 to 3,000) gives the per-prediction
    result exactly: windows closed by count and by event time, the same reasons at the
    same predictions, counts, missing and untracked values, and a reference adopted in
    the middle of a chunk."""
    ref = build_profile(reference_frame(), "m", "1", prediction="pred", label="label")
    later = build_profile(reference_frame(seed=21), "m", "1", prediction="pred", label="label")
    rng = np.random.default_rng(31)
    rows = mixed_rows(rng, 12_000)
    predictions = [class_key(p) for p in rng.integers(0, 2, len(rows))]
    predictions[5] = None
    # Event time mostly 1 s apart, with gaps that close a window by time before its count.
    ts = np.cumsum(np.where(rng.random(len(rows)) < 0.002, 400.0, 1.0)).tolist()
    config = DriftConfig(window=700, window_seconds=750.0, consecutive=1, threshold=0.05)
    one, bulk = (DataDriftMonitor(config, reference=ref) for _ in range(2))
    expected = []
    for i in range(len(rows)):
        if i == 5_000:
            one.use(later)
        reasons = one.add_prediction(ts[i], rows[i], predictions[i])
        if reasons:
            expected.append((i, reasons))
    got, i = [], 0
    for size in itertools.cycle([1, 3, 250, 699, 700, 701, 3_000, 17]):
        if i >= len(rows):
            break
        if i <= 5_000 < i + size:  # adopt the later reference where the loop above did
            got += [(i + j, r) for j, r in bulk.add_predictions(
                ts[i:5_000], rows[i:5_000], predictions[i:5_000])]
            bulk.use(later)
            size, i = i + size - 5_000, 5_000
        got += [(i + j, r) for j, r in bulk.add_predictions(
            ts[i:i + size], rows[i:i + size], predictions[i:i + size])]
        i += size
    assert got == expected
    assert len(expected) >= 3 and one.windows == 28  # 6 closed by count, 22 by event time
    assert drift_state(bulk) == drift_state(one)
    assert one.untracked > 0 and one.features["visits"].missing > 0


def test_bin_counts_equal_bin_index_for_every_mix_of_types() -> None:
    numeric = FeatureProfile("numeric", counts=(1, 1, 1), missing=0, edges=(0.5, 2.0))
    colour = FeatureProfile("categorical", counts=(1, 1, 1), missing=0,
                            categories=("red", "1"))
    for values in ([0.5, 2.0, -np.inf, np.inf, 1, None], [True, "x", 2.0, float("nan")],
                   ["red", "blue", "1"], ["red", 1, 1.0, True, None, float("nan")],
                   [1, 1.0, None, float("nan"), float("nan"), "red", 2, 1],
                   [np.True_, 1, np.float64(1.0), np.int64(1)], []):
        for profile in (numeric, colour):
            counts = [0, 0, 0]
            for v in values:
                if (b := profile.bin_index(v)) is not None:
                    counts[b] += 1
            assert profile.bin_counts(values) == (counts, len(values) - sum(counts))
