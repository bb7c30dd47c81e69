"""Observability against a real Prometheus: every dashboard and alert query returns data.

A worker processes a labelled stream whose error rises, a 20-feature stream whose feature
``n3`` shifts, and some bad input, on the real broker. A real Prometheus server (Debian's
package, installed by ``make test``) scrapes it every second with the project's alert
rules. Then every PromQL expression of the Grafana dashboard and of the alert rules is
evaluated through Prometheus's HTTP API.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
import yaml

from models.reference import build_profile
from models.simulation import Scenario, WideScenario, simulate, simulate_wide
from tests.streams.harness import ROOT, Worker, free_port, produce, run, wait_until

DASHBOARDS = sorted((ROOT / "deploy" / "grafana").rglob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
START = float(int(time.time())) - 3000.0
# Grafana's built-in variables, as Grafana would expand them for a short time range.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m",
                "$model": ".*", "$version": ".*"}
COMPARISON = re.compile(r"^(?P<signal>.+?)\s*(==|!=|>=|<=|>|<)\s*-?[0-9.e]+\s*$", re.S)

POLICY = """
[default]
min_outcomes = 500
cooldown_seconds = 60

[models.wide]
reference_size = 2000
drift_window = 500
"""


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float) -> list[dict[str, Any]]:
        """As a Grafana panel or annotation evaluates it: over the time range."""
        return self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}",
                        end=f"{time.time():.3f}", step="1s")["result"]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Start a real Prometheus scraping the given metrics port; stopped by pid afterwards."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `make test` installs Debian's package",
                    pytrace=False)
    procs: list[subprocess.Popen[bytes]] = []

    def start(metrics_port: int) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "driftwarden", "static_configs": [
                {"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        with (tmp_path / "prometheus.log").open("ab") as log:
            procs.append(subprocess.Popen(
                [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT))
        prom = Prometheus(f"http://127.0.0.1:{port}")

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False
        wait_until(ready, 60, "Prometheus to be ready")
        return prom

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _dashboard_exprs() -> list[str]:
    exprs = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        panels = list(doc.get("panels", []))
        while panels:
            panel = panels.pop()
            panels.extend(panel.get("panels", []))  # rows
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
        exprs.extend(a["expr"] for a in doc.get("annotations", {}).get("list", [])
                     if a.get("expr"))
    return exprs


def _rule_signals() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    out = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            match = COMPARISON.match(rule["expr"].strip())
            assert match, f"rule {rule['alert']}: expr is not '<signal> <op> <number>'"
            out[rule["alert"]] = match.group("signal")
    return out


def _expand(expr: str) -> str:
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace(name, value)
    return expr


def _demo_reference(prefix: str) -> tuple[str, bytes, bytes]:
    """A published profile of the labelled model, with its label column: label drift."""
    rows = {}
    for ev in simulate(Scenario(n=5_000, seed=8, unlabelled=0.0, start_ts=START)):
        if ev.topic == "predictions":
            rows[ev.key] = {**ev.value["features"], "prediction": ev.value["prediction"]}
        else:
            rows[ev.key]["label"] = ev.value["label"]
    profile = build_profile(pd.DataFrame(list(rows.values())), "demo", "1",
                            prediction="prediction", label="label")
    return prefix + "references", profile.key.encode(), profile.to_json()


def _traffic(prefix: str) -> list[tuple[str, bytes, bytes]]:
    labelled = Scenario(n=20_000, seed=9, change_at=8_000, error_before=0.1, error_after=0.4,
                        unlabelled=0.1, start_ts=START)
    wide = WideScenario(n=6_000, seed=9, shift_feature="n3", shift_at=3_000, start_ts=START)
    out = [(prefix + ev.topic, ev.key.encode(), orjson.dumps(ev.value))
           for ev in simulate(labelled)]
    out += [(prefix + ev.topic, ev.key.encode(), orjson.dumps(ev.value))
            for ev in simulate_wide(wide)]
    out += [(prefix + "predictions", b"bad-1", b'{"id": "bad-1", "model": "demo"'),
            (prefix + "labels", b"bad-2", b"[1, 2]")]
    return out


def test_every_dashboard_and_alert_query_returns_data(kafka_broker, prefix, tmp_path,
                                                      prometheus):
    assert DASHBOARDS, "no Grafana dashboard JSON under deploy/grafana"
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    worker = Worker(kafka_broker, prefix, tmp_path, env_extra={
        "DRIFTWARDEN_POLICY_FILE": str(policy), "DRIFTWARDEN_LABEL_TTL_SECONDS": "120"})
    try:
        worker.start()
        prom = prometheus(worker.metrics_port)
        started = time.time()
        run(produce(kafka_broker, [_demo_reference(prefix)]))
        wait_until(lambda: "reference profile for demo:1" in worker.log_text(), 60,
                   "the worker to receive the demo profile")
        run(produce(kafka_broker, _traffic(prefix), throttle=3000))
        wait_until(lambda: worker.value("driftwarden_retraining_events_total",
                                        model="wide", version="1") >= 1,
                   120, "the feature-drift retraining event of model wide")
        wait_until(lambda: worker.total("driftwarden_drift_detected_total") >= 1,
                   120, "a concept-drift detection on model demo")

        def firing() -> bool:
            alerts = prom.get("/api/v1/alerts")["alerts"]
            return any(a["labels"]["alertname"] == "DriftwardenDataDrift"
                       and a["state"] == "firing" for a in alerts)
        wait_until(firing, 150, "the DriftwardenDataDrift alert to fire", interval=2.0)

        panels = [_expand(e) for e in _dashboard_exprs()]
        signals = list(_rule_signals().values())
        assert len(panels) >= 15 and len(signals) >= 5
        empty = [e for e in panels if not prom.query_range(e, started)]
        empty += [e for e in signals if not prom.query(e)]
        assert empty == [], f"{len(empty)} of {len(panels) + len(signals)} expressions " \
                            f"return no data: {empty}"
        # The drift alert names the shifted feature, and only that one.
        drift = [a for a in prom.get("/api/v1/alerts")["alerts"]
                 if a["labels"]["alertname"] == "DriftwardenDataDrift"]
        assert {a["labels"].get("feature") for a in drift} == {"n3"}
    finally:
        worker.stop()


def test_metrics_never_expose_ids_or_feature_values(start_worker, kafka_broker, prefix):
    worker = start_worker()
    secret = {"id": "id-7f3a9c1d", "model": "fraud", "version": "1",
              "features": {"email": "someone-4b2e@example.com", "amount": 98765.4321},
              "prediction": "approve-5e8f", "scores": {"approve-5e8f": 0.9, "deny": 0.1}}
    label = {"id": "id-7f3a9c1d", "label": "deny"}
    run(produce(kafka_broker, [(prefix + "predictions", b"id-7f3a9c1d", orjson.dumps(secret)),
                               (prefix + "labels", b"id-7f3a9c1d", orjson.dumps(label))]))
    wait_until(lambda: worker.value("driftwarden_outcomes_total", model="fraud", version="1"),
               60, "the outcome to be absorbed")
    text = worker.scrape()
    # The amount as prometheus-client would print it: its digits alone also turn up, by
    # chance, inside a series' creation time (1.795810744998765e+09 failed a CI run).
    for value in ("id-7f3a9c1d", "someone-4b2e", "98765.4321", "approve-5e8f"):
        assert value not in text, f"{value!r} is exposed on the metrics endpoint"
    assert 'model="fraud"' in text  # the scrape did contain the model's series


def test_every_series_the_worker_exports_is_in_the_readme_catalogue(start_worker, kafka_broker,
                                                                     prefix):
    worker = start_worker()
    run(produce(kafka_broker, [
        (prefix + "predictions", b"c-1", orjson.dumps(
            {"id": "c-1", "model": "fraud", "features": {"x": 1.0}, "prediction": 1,
             "scores": {"0": 0.2, "1": 0.8}})),
        (prefix + "labels", b"c-1", orjson.dumps({"id": "c-1", "label": 0})),
        (prefix + "labels", b"bad", b"not json")]))
    wait_until(lambda: worker.total("driftwarden_outcomes_total"), 60,
               "the outcome to be absorbed")
    wait_until(lambda: worker.total("driftwarden_dead_letters_total"), 60, "the dead letter")
    catalogue = (ROOT / "README.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for row in catalogue.splitlines():
        names = re.findall(r"`(driftwarden)?(_[a-z0-9_]+)`", row)
        if names and names[0][0]:  # "`driftwarden_precision`, `_recall`, `_f1`"
            documented.update("driftwarden" + suffix for _, suffix in names)
    # A histogram's series by its name; a counter's creation time (_created) goes with it.
    exported = {re.sub(r"_(bucket|sum|count)$", "", name) for name, _ in worker.metrics()
                if name.startswith("driftwarden_") and not name.endswith("_created")}
    assert {"driftwarden_events_received_total", "driftwarden_label_delay_seconds",
            "driftwarden_log_loss", "driftwarden_worker_info"} <= exported
    assert exported - documented == set(), "exported but not in the README's catalogue"

