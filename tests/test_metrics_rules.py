"""The Grafana dashboard and the Prometheus alert rules in deploy/ use only metrics the service exports.

Every metric name in their PromQL is found with a regular expression and looked up in the registry a real
process builds (services/metrics.py, with the queues read from a real Redis). The rule file's structure is
checked here; promtool, when installed (Debian's ``prometheus`` package), also checks the rules, the
dashboard's expressions, the scrape configuration and runs alerts.test.yml.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from services import metrics
from services.config import load_config
from services.keys import Keys
from services.redis_connection import scrape_client

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "imagegen.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"

# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label matchers,
    ranges, Grafana's variables and grouping clauses are cut out, that are not a function or an
    aggregation (followed by a parenthesis) nor a keyword."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr)
    return {match.group(1) for match in found if not match.group(2) and match.group(1) not in PROMQL_WORDS}


def test_metric_names_are_found() -> None:
    expr = (
        'sum by (le) (rate(a_bucket{queue="x}", job=~"b|c"}[$__rate_interval])) > 0.5 and on() '
        "max(b_total offset 5m) / ignoring(outcome) deriv(c[30m:1m]) unless bool up"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "up"}


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> list[str]:
        exprs = []
        for panel in panels:
            exprs += [target["expr"] for target in panel.get("targets", [])]
            exprs += walk(panel.get("panels", []))
        return exprs

    return walk(json.loads(DASHBOARD.read_text())["panels"])


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(redis_server: str) -> set[str]:
    """Every series name a process exports: its own metrics (every known label value made at 0) and the
    queues read from a real Redis."""
    collector = metrics.QueueCollector(
        scrape_client(load_config({"REDIS_URL": redis_server})), Keys("iq"), max_concurrency=0
    )
    registry: CollectorRegistry = metrics.scrape_registry([collector])
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
    assert "imagegen_queue_depth" in names, "the queues were read"
    return names


def test_the_dashboard_uses_only_exported_metrics(exported: set[str]) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        unknown = metric_names(expr) - exported - PROMETHEUS_OWN
        assert metric_names(expr) and not unknown, f"{expr}: {unknown or 'no metric'}"


def test_the_alerts_use_only_exported_metrics(exported: set[str]) -> None:
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names and not names - exported - PROMETHEUS_OWN, f"{rule['alert']}: {names - exported}"


def test_every_imagegen_metric_is_on_the_dashboard_and_in_the_readme(exported: set[str]) -> None:
    families = {name for name in exported if name.startswith("imagegen_")}
    families = {name for name in families if not name.endswith(("_bucket", "_count", "_sum"))}
    on_dashboard = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    readme = (ROOT / "README.md").read_text()
    for name in families:
        family = name.removesuffix("_total")
        assert any(used.startswith(family) for used in on_dashboard), f"{name} is not on the dashboard"
        assert f"`{name}" in readme, f"{name} is not in README.md"


def test_the_alert_rules_are_well_formed() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"} and document["groups"]
    seen = set()
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and isinstance(group["name"], str)
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            name = rule["alert"]
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name not in seen, name
            seen.add(name)
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
            assert rule["expr"].count("(") == rule["expr"].count(")"), name
            assert "for" not in rule or DURATION.fullmatch(rule["for"]), name
            assert rule["labels"]["severity"] in ("critical", "warning"), name
            assert {"summary", "description"} <= set(rule["annotations"]), name
            assert all(isinstance(text, str) and text for text in rule["annotations"].values()), name
    # what the issue asks to be alerted on
    assert {
        "ImagegenGenerationQueueStalled",
        "ImagegenTasksWaitLong",
        "ImagegenUpstreamErrorRate",
        "ImagegenWebhookGiveUps",
        "ImagegenUpstreamCapSaturated",
    } <= seen


def test_the_scrape_configuration_matches_the_rules_and_compose() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"imagegen-api", "imagegen-worker"}
    for rule in alert_rules():
        for job in re.findall(r'job=~?"([^"]+)"', rule["expr"]):
            assert set(job.split("|")) <= set(jobs), rule["alert"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    port = compose["x-app-env"]["WORKER_METRICS_PORT"]
    assert port == f"${{WORKER_METRICS_PORT:-{jobs['imagegen-worker']['dns_sd_configs'][0]['port']}}}"


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian's prometheus package has it): the rules' PromQL is checked "
    "by the tests above only",
)


def promtool(*args: str, cwd: Path = PROMETHEUS) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_the_rules_and_their_tests() -> None:
    promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts.test.yml")
    promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_promtool_parses_the_dashboards_expressions(tmp_path: Path) -> None:
    """Each expression as a recording rule, Grafana's interval variable replaced by a duration."""
    rules = [
        {"record": f"dashboard:expr_{index}", "expr": expr.replace("$__rate_interval", "5m")}
        for index, expr in enumerate(dashboard_exprs())
    ]
    document = {"groups": [{"name": "dashboard", "rules": rules}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(document))
    promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
