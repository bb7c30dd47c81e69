"""Static checks of the Prometheus and Grafana files (DESIGN.md section 6).

promtool (Debian's prometheus package, which `make test` installs) validates the
Prometheus config, the alerting rules, every PromQL expression of the dashboard, and the
alerts' behaviour on synthetic series. Every metric an expression names must be one the
worker exports: the names are read from streams/metrics.py, where they are declared.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
METRICS_PY = ROOT / "streams" / "metrics.py"
GRAFANA = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD_PROVIDER = GRAFANA / "dashboards" / "driftwarden.yml"
DATASOURCE = GRAFANA / "datasources" / "prometheus.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DATASOURCE_UID = "prometheus"

ALERT_NAMES = {
    "DriftwardenModelDegraded",
    "DriftwardenDataDrift",
    "DriftwardenConceptDrift",
    "DriftwardenNoEvents",
    "DriftwardenDeadLettersGrowing",
    "DriftwardenConsumerLagGrowing",
    "DriftwardenWorkerDown",
}
# `<signal> <comparison> <number>`: tooling strips the comparison to graph the signal.
RULE_EXPR = re.compile(
    r"^(?P<signal>.*\S)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<number>-?\d+(?:\.\d+)?)$", re.S)
METRIC_NAME = re.compile(r"driftwarden_[a-z_]+")
# Grafana's built-ins the dashboard may use, and values to validate the PromQL with.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".*",
    "$version": ".*",
}
# Exported metrics without a model label: the dashboard need not filter them by $model.
# (driftwarden_label_delay_seconds has model but no version label.)
NOT_PER_MODEL = {
    "driftwarden_consumer_lag",
    "driftwarden_pending_labels",
    "driftwarden_dead_letters_total",
    "driftwarden_events_consumed_total",
    "driftwarden_replays_skipped_total",
    "driftwarden_invalid_references",
    "driftwarden_models_dropped",
}
NOT_PER_VERSION = NOT_PER_MODEL | {
    "driftwarden_label_delay_seconds_bucket",
    "driftwarden_label_delay_seconds_sum",
    "driftwarden_label_delay_seconds_count",
}


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: `make test` installs Debian's prometheus package "
                    "(apt-get install prometheus), which provides it.", pytrace=False)
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} failed:\n{result.stdout}\n{result.stderr}")


# --- the metric names the worker exports -------------------------------------------------

_SUFFIXES = {
    "Counter": ("_total",),
    "CounterMetricFamily": ("_total",),
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
    "Summary": ("", "_sum", "_count"),
    "SummaryMetricFamily": ("", "_sum", "_count"),
    "Info": ("_info",),
    "InfoMetricFamily": ("_info",),
    "Enum": ("",),
    "StateSetMetricFamily": ("",),
}


def _bound_values(name: str, node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[str]:
    """Values `name` takes in the loop or comprehension around `node` that binds it,
    when it iterates over a literal tuple/list (of strings or of tuples of strings)."""
    scope = parents.get(node)
    while scope is not None:
        loops: list[tuple[ast.expr, ast.expr]] = []
        if isinstance(scope, ast.For):
            loops = [(scope.target, scope.iter)]
        elif isinstance(scope, ast.DictComp | ast.ListComp | ast.SetComp | ast.GeneratorExp):
            loops = [(gen.target, gen.iter) for gen in scope.generators]
        for target, iterable in loops:
            if isinstance(target, ast.Name) and target.id == name:
                position = None
            elif isinstance(target, ast.Tuple) and any(
                    isinstance(e, ast.Name) and e.id == name for e in target.elts):
                position = next(i for i, e in enumerate(target.elts)
                                if isinstance(e, ast.Name) and e.id == name)
            else:
                continue
            assert isinstance(iterable, ast.Tuple | ast.List), (
                f"streams/metrics.py line {iterable.lineno}: cannot read the values of "
                f"{name!r}; declare metric names with literals")
            items = [item if position is None else item.elts[position]  # type: ignore[attr-defined]
                     for item in iterable.elts]
            return [ast.literal_eval(item) for item in items]
        scope = parents.get(scope)
    raise AssertionError(f"streams/metrics.py: {name!r} is not bound by a literal loop")


def _names(arg: ast.expr, parents: dict[ast.AST, ast.AST]) -> list[str]:
    """The strings a metric-name argument can evaluate to."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.Name):
        return _bound_values(arg.id, arg, parents)
    if isinstance(arg, ast.JoinedStr):
        out = [""]
        for part in arg.values:
            if isinstance(part, ast.Constant):
                out = [prefix + str(part.value) for prefix in out]
            else:
                assert isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name)
                values = _bound_values(part.value.id, arg, parents)
                out = [prefix + str(v) for prefix in out for v in values]
        return out
    raise AssertionError(f"streams/metrics.py line {arg.lineno}: unreadable metric name")


def exported_metrics() -> set[str]:
    """Sample names the worker exposes, from the declarations in streams/metrics.py."""
    tree = ast.parse(METRICS_PY.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if kind not in _SUFFIXES:
            continue
        arg = node.args[0] if node.args else next(
            (k.value for k in node.keywords if k.arg == "name"), None)
        if arg is None:
            continue
        for name in _names(arg, parents):
            base = name.removesuffix("_total") if "Counter" in kind else name
            out.update(base + suffix for suffix in _SUFFIXES[kind])
    return out


@pytest.fixture(scope="module")
def exported() -> set[str]:
    names = exported_metrics()
    # The contract of DESIGN.md section 6: if these are missing, the parsing broke.
    for name in ("driftwarden_predictions_total", "driftwarden_outcomes_total",
                 "driftwarden_accuracy", "driftwarden_estimated_accuracy",
                 "driftwarden_feature_drift", "driftwarden_drift_detected_total",
                 "driftwarden_retraining_events_total", "driftwarden_dead_letters_total",
                 "driftwarden_pending_labels", "driftwarden_label_delay_seconds_bucket"):
        assert name in names, f"{name} not found in {METRICS_PY.relative_to(ROOT)}: {names}"
    return names


def _unknown_metrics(exprs: list[str], exported: set[str]) -> list[tuple[str, str]]:
    return [(name, expr) for expr in exprs for name in METRIC_NAME.findall(expr)
            if name not in exported]


def _validate_promql(exprs: list[str], tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule)."""
    rules = {"groups": [{"name": "validate", "rules": [
        {"record": f"validate:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    _check(_promtool("check", "rules", str(path)))


# --- Prometheus ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    groups = {g["name"]: g for g in doc["groups"]}
    assert "driftwarden" in groups, f"{ALERTS.name} has no group 'driftwarden': {list(groups)}"
    return list(groups["driftwarden"]["rules"])


def test_prometheus_config_is_valid() -> None:
    # promtool resolves rule_files relative to the config file, so alerts.yml is checked too.
    _check(_promtool("check", "config", str(PROM_CONFIG.relative_to(ROOT))))


def test_rule_files_resolve_in_the_repo_and_the_container() -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    rule_files = config.get("rule_files") or []
    assert rule_files, "prometheus.yml loads no rule_files"
    assert (PROM_DIR / "alerts.yml").resolve() in {
        (PROM_DIR / f).resolve() for f in rule_files}, rule_files
    # docker-compose.yml mounts each rule file where the mounted config resolves it.
    prometheus = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prometheus"]
    mounts = {}
    for entry in prometheus.get("volumes") or []:
        source, target = (entry["source"], entry["target"]) if isinstance(entry, dict) \
            else str(entry).split(":")[:2]
        mounts[target] = source
    config_target = next(t for t, s in mounts.items()
                         if (ROOT / s).resolve() == PROM_CONFIG.resolve())
    for name in rule_files:
        in_container = str(Path(config_target).parent / name)
        assert in_container in mounts, f"{in_container} is not mounted: {mounts}"
        assert (ROOT / mounts[in_container]).resolve() == (PROM_DIR / name).resolve()


def test_alert_rules_are_valid() -> None:
    _check(_promtool("check", "rules", str(ALERTS.relative_to(ROOT))))


def test_alert_rules_are_complete(alert_rules: list[dict[str, Any]]) -> None:
    names = [r.get("alert") for r in alert_rules]
    assert set(names) == ALERT_NAMES, f"alerts {names}, expected {sorted(ALERT_NAMES)}"
    for rule in alert_rules:
        assert rule.get("labels", {}).get("severity") in {"info", "warning", "critical"}, rule
        annotations = rule.get("annotations", {})
        assert "$labels" in annotations.get("summary", ""), rule["alert"]
        assert annotations.get("description"), rule["alert"]
    by_name = {r["alert"]: r for r in alert_rules}
    assert by_name["DriftwardenDataDrift"].get("for") == "1m"


def test_alert_exprs_are_signal_op_number(alert_rules: list[dict[str, Any]],
                                          exported: set[str], tmp_path: Path) -> None:
    signals = []
    for rule in alert_rules:
        expr = str(rule["expr"]).strip()
        match = RULE_EXPR.match(expr)
        assert match, f"{rule['alert']}: expr is not `<signal> <op> <number>`: {expr!r}"
        signals.append(match["signal"])
    _validate_promql(signals, tmp_path)
    unknown = _unknown_metrics([str(r["expr"]) for r in alert_rules], exported)
    assert not unknown, f"alerts use metrics the worker does not export: {unknown}"


def test_alerts_fire_on_synthetic_series(alert_rules: list[dict[str, Any]],
                                         tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires on a series that should trigger it
    (and DataDrift not on a feature under the threshold). Annotations are left out of the
    copy under test, so their wording can change freely."""
    rules = [{k: v for k, v in r.items() if k != "annotations"} for r in alert_rules]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "driftwarden", "rules": rules}]}, sort_keys=False))
    target = 'instance="worker:9102",job="driftwarden"'
    mv = f'model="m",version="1",{target}'
    series = [
        (f'driftwarden_feature_drift{{{mv},feature="x",statistic="psi"}}', "0.3x20"),
        (f'driftwarden_feature_drift{{{mv},feature="y",statistic="psi"}}', "0.05x20"),
        (f'driftwarden_feature_drift{{{mv},feature="x",statistic="js"}}', "0.9x20"),
        (f'driftwarden_accuracy{{{mv},window="rolling"}}', "0.7x20"),
        (f'driftwarden_accuracy{{{mv},window="cumulative"}}', "0.9x20"),
        (f'driftwarden_drift_detected_total{{{mv},detector="adwin"}}', "0 0 1 1 1 1 1"),
        (f'driftwarden_dead_letters_total{{topic="predictions",reason="bad_json",{target}}}',
         "0 2 4 4 4"),
        (f'driftwarden_consumer_lag{{topic="predictions",partition="0",{target}}}', "8000x20"),
        (f'driftwarden_consumer_lag{{topic="predictions",partition="1",{target}}}', "8000x20"),
        (f'driftwarden_last_event_timestamp_seconds{{{mv}}}', "0x40"),
        (f"up{{{target}}}", "0x20"),
    ]
    sev = {r["alert"]: r["labels"]["severity"] for r in alert_rules}

    def alert(name: str, at: str, **labels: str) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": [
            {"exp_labels": {**labels, "severity": sev[name]}}]}

    worker = {"instance": "worker:9102", "job": "driftwarden"}
    model = {"model": "m", "version": "1"}
    cases = [
        alert("DriftwardenDataDrift", "2m", **model, feature="x"),
        {"eval_time": "30s", "alertname": "DriftwardenDataDrift", "exp_alerts": []},
        alert("DriftwardenModelDegraded", "10m", **model, **worker),
        alert("DriftwardenConceptDrift", "5m", **model, detector="adwin"),
        alert("DriftwardenDeadLettersGrowing", "4m", topic="predictions", reason="bad_json"),
        alert("DriftwardenConsumerLagGrowing", "15m", topic="predictions"),
        {"eval_time": "5m", "alertname": "DriftwardenConsumerLagGrowing", "exp_alerts": []},
        alert("DriftwardenNoEvents", "30m", **model, **worker),
        {"eval_time": "20m", "alertname": "DriftwardenNoEvents", "exp_alerts": []},
        alert("DriftwardenWorkerDown", "5m", **worker),
    ]
    assert {c["alertname"] for c in cases} == ALERT_NAMES
    test = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "alert_rule_test": cases,
    }]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    _check(_promtool("test", "rules", "test.yml", cwd=tmp_path))


# --- Grafana ------------------------------------------------------------------------------

def _provider() -> dict[str, Any]:
    doc = yaml.safe_load(DASHBOARD_PROVIDER.read_text())
    [provider] = [p for p in doc["providers"] if p.get("type", "file") == "file"]
    return provider


def _dashboard_path() -> Path:
    """The provider's path is a container path under the provisioning mount."""
    path = Path(_provider()["options"]["path"])
    repo_dir = GRAFANA / path.relative_to("/etc/grafana/provisioning")
    files = sorted(repo_dir.glob("*.json"))
    assert [f.name for f in files] == ["driftwarden.json"], files
    return files[0]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(_dashboard_path().read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # inside collapsed rows
    return out


def _annotations(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in dashboard.get("annotations", {}).get("list", []) if not a.get("builtIn")]


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    exprs += [a.get("expr") or a["target"]["expr"] for a in _annotations(dashboard)]
    return exprs


def _substituted(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def test_grafana_provisioning_files_parse() -> None:
    provider = _provider()
    assert provider["folder"] == "driftwarden"
    assert provider["options"]["path"].startswith("/etc/grafana/provisioning/")
    [source] = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"


def test_home_dashboard_is_the_provisioned_one() -> None:
    grafana = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    env = grafana.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == Path(_provider()["options"]["path"]) / _dashboard_path().name


def test_dashboard_identity_and_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "driftwarden" and dashboard["title"] == "driftwarden"
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"model", "version"} <= set(variables), list(variables)
    for name, metric in (("model", "driftwarden_predictions_total"),
                         ("version", "driftwarden_predictions_total")):
        var = variables[name]
        query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
        assert re.fullmatch(rf"label_values\({metric}(\{{.*\}})?,\s*{name}\)", query), query
        assert var["datasource"]["uid"] == DATASOURCE_UID
    assert '$model' in variables["version"]["definition"] + str(variables["version"]["query"])


def test_every_query_uses_the_prometheus_datasource(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    assert len([p for p in panels if p.get("targets")]) >= 10
    for panel in panels:
        if panel["type"] == "row" and not panel.get("targets"):
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target.get("expr"), panel["title"]
    annotations = _annotations(dashboard)
    assert annotations, "no annotation query (drift detections)"
    for annotation in annotations:
        assert annotation["datasource"]["uid"] == DATASOURCE_UID, annotation["name"]


def test_dashboard_promql_is_valid(dashboard: dict[str, Any], tmp_path: Path) -> None:
    exprs = [_substituted(e) for e in _exprs(dashboard)]
    leftover = [e for e in exprs if "$" in e]
    assert not leftover, f"variables other than {sorted(GRAFANA_VARIABLES)}: {leftover}"
    _validate_promql(exprs, tmp_path)


def test_dashboard_uses_exported_metrics_only(dashboard: dict[str, Any],
                                              exported: set[str]) -> None:
    variables = [str(v.get("definition", "")) for v in dashboard["templating"]["list"]]
    unknown = _unknown_metrics(_exprs(dashboard) + variables, exported)
    assert not unknown, f"dashboard uses metrics the worker does not export: {unknown}"
    names = {n for e in _exprs(dashboard) for n in METRIC_NAME.findall(e)}
    # The panels the README promises.
    for name in ("driftwarden_accuracy", "driftwarden_estimated_accuracy",
                 "driftwarden_error_rate", "driftwarden_feature_drift",
                 "driftwarden_prediction_drift", "driftwarden_outcomes_total",
                 "driftwarden_pending_labels", "driftwarden_expired_predictions_total",
                 "driftwarden_label_delay_seconds_bucket",
                 "driftwarden_retraining_events_total", "driftwarden_drift_detected_total",
                 "driftwarden_dead_letters_total", "driftwarden_events_consumed_total",
                 "driftwarden_consumer_lag", "driftwarden_reference_info"):
        assert name in names, f"no panel shows {name}"


def test_dashboard_filters_by_model_and_version(dashboard: dict[str, Any]) -> None:
    selector = re.compile(r"(driftwarden_[a-z_]+)(\{[^}]*\})?")
    for expr in _exprs(dashboard):
        for name, matchers in selector.findall(expr):
            if name not in NOT_PER_MODEL:
                assert 'model=~"$model"' in matchers, f"{name} not filtered by $model: {expr}"
            if name not in NOT_PER_VERSION:
                assert 'version=~"$version"' in matchers, (
                    f"{name} not filtered by $version: {expr}")
