"""Reference profiles: exact bins, counts, baselines and JSON form on tiny and seeded frames."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from models import codec
from models.errors import ConfigError
from models.reference import (
    FeatureProfile,
    ProfileBuilder,
    ReferenceProfile,
    build_profile,
    numbers_in_categoricals,
    read_frame,
)


def profile_of(values: list[Any] | np.ndarray | pd.Series, **kw: Any) -> FeatureProfile:
    """The profile of a single feature column ``x``."""
    return build_profile(pd.DataFrame({"x": values}), "m", "1", **kw).features["x"]


def independent_counts(values: np.ndarray, edges: tuple[float, ...]) -> list[int]:
    """Bin counts by explicit interval masks, lo <= x < hi, without searchsorted."""
    bounds = [-math.inf, *edges, math.inf]
    return [int(((values >= lo) & (values < hi)).sum()) for lo, hi in itertools.pairwise(bounds)]


# -- numeric --------------------------------------------------------------------------


def test_numeric_edges_are_the_quantiles_and_counts_match_interval_counts() -> None:
    values = np.random.default_rng(42).normal(10.0, 3.0, 5000)
    profile = profile_of(values, bins=10)
    expected = np.unique(np.quantile(values, np.arange(1, 10) / 10))
    assert profile.kind == "numeric"
    assert profile.edges == tuple(expected.tolist())
    assert len(profile.edges) == 9
    assert profile.counts == tuple(independent_counts(values, profile.edges))
    assert sum(profile.counts) == 5000 and profile.missing == 0 and profile.n == 5000
    assert profile.categories == ()


def test_numeric_hand_computed_bins() -> None:
    # quantiles 0.25/0.5/0.75 of 1..8 (linear): positions 1.75, 3.5, 5.25
    profile = profile_of([1, 2, 3, 4, 5, 6, 7, 8], bins=4)
    assert profile.edges == (2.75, 4.5, 6.25)
    assert profile.counts == (2, 2, 2, 2)
    # a value equal to an edge falls in the bin to its right
    median = profile_of([1, 2, 3, 4, 5], bins=2)
    assert median.edges == (3.0,)
    assert median.counts == (2, 3)


def test_repeated_quantiles_collapse_to_strictly_increasing_edges() -> None:
    profile = profile_of([0, 0, 0, 0, 0, 0, 1, 2], bins=4)
    # quantiles 0.25 and 0.5 are both 0; 0.75 sits at position 5.25: 0 + 0.25 * (1 - 0)
    assert profile.edges == (0.0, 0.25)
    assert profile.counts == (0, 6, 2)


def test_constant_and_all_missing_columns() -> None:
    constant = profile_of([5.0, 5.0, 5.0], bins=10)
    assert constant.edges == (5.0,)
    assert constant.counts == (0, 3)
    empty = profile_of([np.nan, np.nan], bins=10)
    assert empty.kind == "numeric"
    assert (empty.edges, empty.counts, empty.missing, empty.n) == ((), (0,), 2, 2)
    assert empty.proportions().tolist() == [0.0]


def test_numeric_missing_none_and_nan() -> None:
    profile = profile_of(pd.Series([1.0, None, 3.0, np.nan, 2.0]), bins=2)
    assert profile.missing == 2
    assert profile.edges == (2.0,)
    assert profile.counts == (1, 2)
    nullable = profile_of(pd.array([1, None, 3, 2], dtype="Int64"), bins=2)
    assert (nullable.kind, nullable.missing, nullable.counts) == ("numeric", 1, (1, 2))


def test_infinite_values_fall_in_the_end_bins_and_do_not_become_edges() -> None:
    profile = profile_of([-np.inf, 1.0, 2.0, 3.0, np.inf], bins=2)
    assert profile.edges == (2.0,)
    assert profile.counts == (2, 3)


def test_values_near_the_float_limits_get_finite_edges_a_worker_accepts() -> None:
    # Linear interpolation between -1e308 and 1e308 overflows to inf and nan (and, under
    # filterwarnings = error, raises); the edges are then the values themselves.
    profile = profile_of([-1e308, 1e308, -1e308, 1e308, 0.0], bins=4)
    assert profile.edges == (-1e308, 0.0, 1e308)
    assert profile.counts == (0, 2, 1, 2)
    whole = ReferenceProfile("m", "1", "data", 5, {"x": profile})
    assert ReferenceProfile.from_json(whole.to_json()) == whole


def test_non_numeric_values_of_a_regression_column_count_as_missing() -> None:
    frame = pd.DataFrame({"p": pd.Series([1.5, "x", True, None, 2], dtype=object)})
    profile = build_profile(frame, "m", "1", prediction="p", task="regression", bins=2)
    assert profile.prediction is not None
    assert profile.prediction.kind == "numeric"
    assert profile.prediction.missing == 3
    assert profile.prediction.edges == (1.75,)
    assert profile.prediction.counts == (1, 1)


def test_a_regression_column_without_a_number_is_refused_naming_it() -> None:
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "pred": ["cat", None, "dog"],
                          "y": [1.0, 2.0, 3.0]})
    with pytest.raises(ConfigError) as raised:
        build_profile(frame, "m", "1", prediction="pred", label="y", task="regression")
    assert str(raised.value) == ("prediction column 'pred' holds no numbers, which a "
                                 "regression needs; its first value is 'cat'")
    # As a classification the same column is a set of classes.
    assert build_profile(frame, "m", "1", prediction="pred", label="y").prediction is not None


# -- categorical ----------------------------------------------------------------------


def test_categorical_top_k_other_and_ties_by_key() -> None:
    profile = profile_of(["b", "a", "c", "a", "b", "d", "e", "e", None], top_k=2)
    # a, b and e appear twice: the tie is broken by key, so e goes to "other"
    assert profile.kind == "categorical"
    assert profile.categories == ("a", "b")
    assert profile.counts == (2, 2, 4)
    assert profile.missing == 1
    assert profile.edges == ()
    everything = profile_of(["b", "a", "c", "a", "b", "d", "e", "e", None], top_k=20)
    assert everything.categories == ("a", "b", "e", "c", "d")
    assert everything.counts == (2, 2, 2, 1, 1, 0)


def test_categorical_missing_none_and_nan() -> None:
    profile = profile_of(pd.Series(["a", None, np.nan, "b", "a"], dtype=object))
    assert profile.categories == ("a", "b")
    assert profile.counts == (2, 1, 0)
    assert profile.missing == 2


def test_bool_and_mixed_values_are_keyed_with_class_key() -> None:
    flags = profile_of([True, False, True])
    assert flags.kind == "categorical"
    assert flags.categories == ("true", "false")
    assert flags.counts == (2, 1, 0)
    # pandas would merge 1, 1.0 and True when counting raw objects; class keys keep True apart
    mixed = profile_of(pd.Series([1, 1.0, "1", True, "DE"], dtype=object))
    assert mixed.categories == ("1", "DE", "true")
    assert mixed.counts == (3, 1, 1, 0)


def test_category_dtype_ignores_unused_categories() -> None:
    values = pd.Categorical(["x", "y", "x", None], categories=["x", "y", "z"])
    profile = profile_of(values)
    assert profile.categories == ("x", "y")
    assert (profile.counts, profile.missing) == ((2, 1, 0), 1)


# -- prediction, label, baseline ------------------------------------------------------


def test_prediction_and_label_kinds_follow_the_task() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "pred": [1, 0, 1, 1], "y": [1, 1, 1, 0]})
    cls = build_profile(frame, "m", "1", prediction="pred", label="y")
    assert sorted(cls.features) == ["a"]
    assert cls.prediction == FeatureProfile("categorical", (3, 1, 0), 0, categories=("1", "0"))
    assert cls.label == FeatureProfile("categorical", (3, 1, 0), 0, categories=("1", "0"))
    assert cls.baseline == {"accuracy": 0.5}
    reg = build_profile(frame, "m", "1", prediction="pred", label="y", task="regression", bins=2)
    assert reg.prediction == FeatureProfile("numeric", (1, 3), 0, edges=(1.0,))
    assert reg.label == FeatureProfile("numeric", (1, 3), 0, edges=(1.0,))


def test_accuracy_baseline_compares_class_keys_and_skips_missing() -> None:
    frame = pd.DataFrame({
        "pred": pd.Series([1, 0, 1, 1, 1], dtype=object),
        "label": pd.Series(["1", 0.0, "0", True, None], dtype=object),
    })
    profile = build_profile(frame, "m", "1", prediction="pred", label="label")
    # "1"=="1", "0"=="0", "1"!="0", "1"!="true"; the unlabelled row is left out
    assert profile.baseline == {"accuracy": 0.5}


def test_regression_baseline_mae_rmse() -> None:
    frame = pd.DataFrame({"pred": [2.0, 1.0, 5.0, 0.0, 9.0], "y": [1.0, 2.0, 2.0, 3.0, None]})
    profile = build_profile(frame, "m", "1", prediction="pred", label="y", task="regression")
    # errors 1, -1, 3, -3: MAE 2, RMSE sqrt(20 / 4)
    assert profile.baseline == {"mae": 2.0, "rmse": math.sqrt(5.0)}


def test_no_baseline_without_both_columns() -> None:
    frame = pd.DataFrame({"pred": [1, 0], "y": [1, 1]})
    assert build_profile(frame, "m", "1", prediction="pred").baseline == {}
    assert build_profile(frame, "m", "1", label="y").baseline == {}
    assert build_profile(frame, "m", "1", label="y").prediction is None


def test_explicit_feature_list() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "c": [0.5, 0.5]})
    profile = build_profile(frame, "m", "1", features=["b"])
    assert list(profile.features) == ["b"]
    assert profile.n == 2 and profile.key == "m:1" and profile.source == "data"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prediction": "score"}, "column 'score'"),
    ({"label": "truth"}, "column 'truth'"),
    ({"features": ["a", "nope"]}, "column 'nope'"),
    ({"bins": 1}, "bins"),
    ({"top_k": 0}, "top_k"),
    ({"task": "ranking"}, "task"),
    ({"source": "magic"}, "source"),
])
def test_build_profile_errors_name_the_column_or_parameter(
    kwargs: dict[str, Any], message: str
) -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    with pytest.raises(ConfigError, match=message):
        build_profile(frame, "m", "1", **kwargs)


def test_empty_frame_and_empty_model_are_refused() -> None:
    with pytest.raises(ConfigError, match="no rows"):
        build_profile(pd.DataFrame({"a": []}), "m", "1")
    with pytest.raises(ConfigError, match="model"):
        build_profile(pd.DataFrame({"a": [1]}), "", "1")


# -- bin_index and proportions --------------------------------------------------------


def test_bin_index_agrees_with_searchsorted() -> None:
    rng = np.random.default_rng(7)
    profile = profile_of(rng.exponential(2.0, 1000), bins=8)
    probes = np.concatenate([rng.exponential(2.0, 500), np.array(profile.edges), [-1.0, 1e9]])
    expected = np.searchsorted(profile.edges, probes, side="right")
    assert [profile.bin_index(float(x)) for x in probes] == expected.tolist()
    assert profile.bin_index(3) == np.searchsorted(profile.edges, 3, side="right")
    assert profile.bin_index(np.float32(3.0)) == profile.bin_index(3)


@pytest.mark.parametrize("value", [None, float("nan"), np.nan, True, False, "1.5", "x", [1]])
def test_numeric_bin_index_missing(value: Any) -> None:
    assert FeatureProfile("numeric", (1, 1), 0, edges=(1.0,)).bin_index(value) is None


def test_bin_index_reproduces_the_reference_counts() -> None:
    rng = random.Random(11)
    amounts = [None if rng.random() < 0.1 else round(rng.gauss(50, 10), 1) for _ in range(400)]
    countries = [rng.choice(["DE", "FR", "US", "IT", None, 1, True]) for _ in range(400)]
    frame = pd.DataFrame({"amount": amounts, "country": pd.Series(countries, dtype=object)})
    profile = build_profile(frame, "m", "1", bins=5, top_k=3)
    for name, values in (("amount", amounts), ("country", countries)):
        feature = profile.features[name]
        bins = [feature.bin_index(v) for v in values]
        assert bins.count(None) == feature.missing
        placed = np.bincount([b for b in bins if b is not None], minlength=len(feature.counts))
        assert tuple(placed.tolist()) == feature.counts


def test_categorical_bin_index() -> None:
    profile = FeatureProfile("categorical", (4, 3, 2, 1), 0, categories=("DE", "1", "true"))
    assert [profile.bin_index(v) for v in ("DE", 1, 1.0, "1", True, "IT", False)] == \
        [0, 1, 1, 1, 2, 3, 3]
    assert profile.bin_index(None) is None
    assert profile.bin_index(float("nan")) is None


def test_proportions() -> None:
    profile = FeatureProfile("numeric", (1, 3, 0, 4), 10, edges=(1.0, 2.0, 3.0))
    proportions = profile.proportions()
    assert proportions.dtype == np.float64
    assert proportions.tolist() == [0.125, 0.375, 0.0, 0.5]
    assert profile.n == 18


# -- JSON -----------------------------------------------------------------------------


def seeded_profile() -> ReferenceProfile:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({
        "amount": rng.gamma(2.0, 20.0, 300),
        "country": rng.choice(["DE", "FR", "US", "IT"], 300),
        "is_new": rng.random(300) < 0.3,
        "pred": rng.integers(0, 3, 300),
        "label": rng.integers(0, 3, 300),
    })
    frame.loc[::7, "amount"] = np.nan
    return build_profile(frame, "fraud", "3", prediction="pred", label="label", bins=6)


def test_json_round_trip() -> None:
    profile = seeded_profile()
    raw = profile.to_json()
    assert orjson.loads(raw)["format"] == 1
    assert ReferenceProfile.from_json(raw) == profile
    assert ReferenceProfile.from_json(raw).to_json() == raw


def test_json_is_deterministic_whatever_the_feature_order() -> None:
    profile = seeded_profile()
    reordered = dataclasses.replace(profile, features=dict(reversed(profile.features.items())))
    assert reordered.to_json() == profile.to_json()
    assert list(orjson.loads(profile.to_json())["features"]) == ["amount", "country", "is_new"]


def test_json_of_a_hand_written_profile() -> None:
    profile = ReferenceProfile(
        "m", "1", "data", 3,
        {"x": FeatureProfile("numeric", (1, 2), 0, edges=(0.5,))},
        label=FeatureProfile("categorical", (2, 1), 0, categories=("a",)),
    )
    assert orjson.loads(profile.to_json()) == {
        "format": 1, "model": "m", "version": "1", "source": "data", "n": 3,
        "features": {"x": {"kind": "numeric", "counts": [1, 2], "missing": 0, "edges": [0.5]}},
        "prediction": None,
        "label": {"kind": "categorical", "counts": [2, 1], "missing": 0, "categories": ["a"]},
        "baseline": {},
    }
    assert ReferenceProfile.from_json(profile.to_json()) == profile


def good_doc() -> dict[str, Any]:
    return {
        "format": 1, "model": "fraud", "version": "3", "source": "data", "n": 6,
        "features": {
            "amount": {"kind": "numeric", "counts": [1, 2, 3], "missing": 0, "edges": [1, 2.5]},
            "country": {"kind": "categorical", "counts": [4, 2], "missing": 0,
                        "categories": ["DE"]},
        },
        "prediction": {"kind": "categorical", "counts": [3, 3, 0], "missing": 0,
                       "categories": ["0", "1"]},
        "label": None,
        "baseline": {"accuracy": 0.9},
        "comment": "unknown fields are ignored",
    }


def test_from_json_accepts_integer_edges() -> None:
    profile = ReferenceProfile.from_json(orjson.dumps(good_doc()))
    assert profile.features["amount"].edges == (1.0, 2.5)
    assert profile.baseline == {"accuracy": 0.9}


@pytest.mark.parametrize(("path", "value", "message"), [
    (("format",), 2, "'format' must be 1"),
    (("model",), "", "'model' must be a non-empty string"),
    (("version",), 3, "'version' must be a non-empty string"),
    (("source",), "guess", "'source' must be one of"),
    (("n",), -1, "'n' must be a non-negative integer"),
    (("features",), [], "'features' must be an object"),
    (("features", "amount", "edges"), [2.5, 1], "'features.amount.edges' must be increasing"),
    (("features", "amount", "edges"), [1, 1], "'features.amount.edges' must be increasing"),
    (("features", "amount", "edges"), [1, None], "'features.amount.edges' must be a list"),
    (("features", "amount", "counts"), [1, 2], "'features.amount.counts' must have 3 entries"),
    (("features", "amount", "counts"), [1, -2, 3], "'features.amount.counts' must be a list"),
    (("features", "amount", "counts"), [1, True, 3], "'features.amount.counts' must be a list"),
    (("features", "amount", "missing"), 0.5, "'features.amount.missing' must be a non-negative"),
    (("features", "amount", "kind"), "ordinal", "'features.amount.kind' must be one of"),
    (("features", "amount", "categories"), ["a"], "'features.amount.categories' must be empty"),
    (("features", "country", "edges"), [1.0], "'features.country.edges' must be empty"),
    (("features", "country", "categories"), [1], "'features.country.categories' must be a list"),
    (("features", "country"), "DE", "'features.country' must be an object"),
    (("prediction", "categories"), ["0", "0"], "'prediction.categories' must not repeat"),
    (("baseline", "accuracy"), None, "'baseline.accuracy' must be a finite number"),
    # Fixed: an impossible baseline was taken, and put the threshold above any accuracy.
    (("baseline", "accuracy"), 5.0, "'baseline.accuracy' must be in [0, 1], got 5.0"),
    (("baseline", "accuracy"), -0.1, "'baseline.accuracy' must be in [0, 1], got -0.1"),
    (("baseline", "rmse"), -1, "'baseline.rmse' must be >= 0, got -1"),
])
def test_from_json_errors_name_the_field(path: tuple[str, ...], value: Any, message: str) -> None:
    doc = good_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError, match=re.escape(f"reference profile field {message}")):
        ReferenceProfile.from_json(orjson.dumps(doc))


@pytest.mark.parametrize(("path", "message"), [
    (("model",), "'model' is required"),
    (("features", "amount", "counts"), "'features.amount.counts' is required"),
    (("features", "country", "kind"), "'features.country.kind' is required"),
])
def test_from_json_missing_fields(path: tuple[str, ...], message: str) -> None:
    doc = good_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    with pytest.raises(ConfigError, match=re.escape(f"reference profile field {message}")):
        ReferenceProfile.from_json(orjson.dumps(doc))


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_from_json_rejects_non_objects(raw: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReferenceProfile.from_json(raw)


def test_fingerprint_is_stable_and_tracks_counts() -> None:
    profile = ReferenceProfile("m", "1", "data", 3,
                               {"x": FeatureProfile("numeric", (1, 2), 0, edges=(0.5,))})
    assert profile.fingerprint() == "4ff35fcca926f41a"
    assert len(seeded_profile().fingerprint()) == 16
    assert seeded_profile().fingerprint() == seeded_profile().fingerprint()
    changed = dataclasses.replace(
        profile, features={"x": FeatureProfile("numeric", (1, 3), 0, edges=(0.5,))})
    assert changed.fingerprint() != profile.fingerprint()


def test_profiles_survive_the_state_codec() -> None:
    profile = seeded_profile()
    country = profile.features["country"]
    assert country.bin_index(country.categories[1]) == 1  # fills the lookup cache
    assert codec.loads(codec.dumps(profile)) == profile


# -- read_frame -----------------------------------------------------------------------


def test_read_frame_csv_and_parquet(tmp_path: Any) -> None:
    frame = pd.DataFrame({"amount": [1.5, 2.0, None], "country": ["DE", "FR", "DE"],
                          "pred": [1, 0, 1]})
    frame.to_csv(tmp_path / "ref.csv", index=False)
    frame.to_parquet(tmp_path / "ref.parquet", index=False)
    frame.to_parquet(tmp_path / "ref.PQ", index=False)
    expected = build_profile(frame, "m", "1", prediction="pred", bins=2)
    for name in ("ref.csv", "ref.parquet", "ref.PQ"):
        read = read_frame(tmp_path / name)
        assert read["amount"].tolist()[:2] == [1.5, 2.0]
        assert build_profile(read, "m", "1", prediction="pred", bins=2) == expected
    assert read_frame(str(tmp_path / "ref.csv")).shape == (3, 3)


def test_read_frame_errors_name_the_path(tmp_path: Any) -> None:
    (tmp_path / "ref.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape("ref.json")):
        read_frame(tmp_path / "ref.json")
    with pytest.raises(ConfigError, match=re.escape("absent.csv")):
        read_frame(tmp_path / "absent.csv")


# -- ProfileBuilder -------------------------------------------------------------------


def bootstrap_rows(seed: int, n: int) -> list[tuple[dict[str, Any], Any]]:
    """(features, prediction) pairs; ``score`` first appears at row 30."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        features: dict[str, Any] = {
            "amount": None if rng.random() < 0.05 else round(rng.lognormvariate(3, 1), 2),
            "count": rng.randint(0, 5),
            "country": rng.choice(["DE", "FR", "US", None]),
            "is_new": rng.random() < 0.3,
            "code": rng.choice([1, 2, "A"]),
        }
        if i >= 30:
            features["score"] = rng.random()
        rows.append((features, rng.choice([0, 1, 1])))
    return rows


def test_builder_returns_the_profile_exactly_at_size() -> None:
    rows = bootstrap_rows(5, 200)
    builder = ProfileBuilder("fraud", "3", size=200, bins=5, top_k=3)
    results = [builder.add(features, prediction) for features, prediction in rows]
    assert all(result is None for result in results[:-1])
    profile = results[-1]
    assert profile is not None
    assert builder.done and builder.n == 200
    frame = pd.DataFrame([{**features, "prediction": p} for features, p in rows])
    expected = build_profile(frame, "fraud", "3", prediction="prediction", bins=5, top_k=3,
                             source="bootstrap")
    assert profile == expected
    assert profile.source == "bootstrap" and profile.n == 200
    assert profile.features["score"].missing == 30
    assert profile.features["count"].kind == "numeric"
    assert profile.features["code"].kind == "categorical"
    assert profile.features["is_new"].categories == ("false", "true")
    assert ReferenceProfile.from_json(profile.to_json()) == profile
    # afterwards: buffer freed, nothing more returned
    assert builder._columns == {} and builder._predictions == []
    assert builder.add({"amount": 1.0}, 1) is None
    assert builder.n == 200


def test_builder_tracks_the_first_max_features() -> None:
    builder = ProfileBuilder("m", "1", size=3, max_features=2)
    assert builder.add({"a": 1.0}, "x") is None
    assert builder.add({"b": "u", "c": 2.0, "a": 2.0}, "y") is None
    profile = builder.add({"c": 3.0, "b": "v"}, "x")
    assert profile is not None
    assert list(profile.features) == ["a", "b"]
    assert profile.features["a"].missing == 1
    assert profile.features["b"] == FeatureProfile("categorical", (1, 1, 0), 1,
                                                   categories=("u", "v"))
    assert profile.prediction == FeatureProfile("categorical", (2, 1, 0), 0,
                                                categories=("x", "y"))


def test_builder_regression_and_a_feature_named_prediction() -> None:
    builder = ProfileBuilder("m", "1", size=4, task="regression", bins=2)
    rows = [({"prediction": "a"}, 1.0), ({"prediction": "b"}, 3.0),
            ({"prediction": "a"}, 2.0), ({"prediction": "a"}, 4.0)]
    results = [builder.add(features, p) for features, p in rows]
    profile = results[-1]
    assert profile is not None
    assert profile.features["prediction"].categories == ("a", "b")
    assert profile.prediction == FeatureProfile("numeric", (2, 2), 0, edges=(2.5,))
    assert profile.baseline == {}


def test_builder_survives_the_state_codec_midway() -> None:
    rows = bootstrap_rows(9, 60)
    whole = ProfileBuilder("m", "1", size=60)
    split = ProfileBuilder("m", "1", size=60)
    for features, prediction in rows[:25]:
        whole.add(features, prediction)
        split.add(features, prediction)
    split = codec.loads(codec.dumps(split))
    assert split.n == 25
    last = [(whole.add(f, p), split.add(f, p)) for f, p in rows[25:]][-1]
    assert last[0] is not None and last[0] == last[1]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"size": 0}, "size"),
    ({"task": "ranking"}, "task"),
    ({"bins": 1}, "bins"),
    ({"bins": 1001}, "bins must be an integer from 2 to 1000, got 1001"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 1001}, "top_k must be an integer from 1 to 1000, got 1001"),
    ({"max_features": 0}, "max_features"),
])
def test_builder_parameters_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProfileBuilder("m", "1", **kwargs)


def test_numbers_written_as_text_in_a_categorical_feature_are_reported() -> None:
    from decimal import Decimal

    frame = pd.DataFrame({
        "amount": [f"{i}.5" for i in range(99)] + ["?"],  # a CSV column with a stray "?"
        "country": ["DE", "FR", "1", "DE"] * 25,  # a quarter of it looks like a number
        "flag": [True, False] * 50,
        "x": np.arange(100.0),
    })
    profile = build_profile(frame, "m", "1")
    assert profile.features["amount"].kind == "categorical"
    assert numbers_in_categoricals(frame, profile) == {"amount": 0.99}
    # Parquet decimals arrive as Decimal objects, not floats.
    decimals = pd.DataFrame({"price": [Decimal("134.50"), Decimal("2.25"), None, Decimal("7")]})
    assert numbers_in_categoricals(decimals, build_profile(decimals, "m", "1")) == {"price": 1.0}
