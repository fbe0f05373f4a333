"""The chart's Grafana dashboards and Prometheus alert rules, checked with the real tools.

- Structure of every dashboard JSON (schema version, datasource variable, unique panel ids, every
  target has an expression, every `$variable` defined, panels inside the 24-column grid).
- `promtool check rules` and `promtool test rules` (tests/prometheus/*.test.yaml, one test group
  per alert at least).
- Live: the Debian `prometheus` scrapes a local session started in-process (a slow 40x40 scan)
  and the operator's own metrics objects; then every dashboard query, every variable query and
  every alert expression goes through Prometheus's HTTP API, as Grafana and the rule engine send
  them. Dashboard queries must return data. Alert expressions must be valid and return nothing
  (a healthy session raises no alert); for each, the series inside its condition must return
  data (listed in ALERT_INNER_SERIES, each checked to be part of its rule).

Without promtool/prometheus these tests skip, unless $CI is set: then they fail.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, manifest, require

CHART = ROOT / "charts" / "detstream"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RULES = CHART / "alerts" / "detstream-rules.yaml"
RULE_TESTS = sorted((ROOT / "tests" / "prometheus").glob("*.test.yaml"))
SESSION = "dash"
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s", "__range_ms"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels of a collapsed row


def targets(dashboard: dict):
    """(panel title, expr) of every query of a dashboard."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target.get("expr", "")


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# ---------------------------------------------------------------- structure

def test_there_are_the_three_dashboards():
    assert [p.stem for p in DASHBOARDS] == ["operator", "overview", "pipeline"]
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path):
    dash = load(path)
    assert dash["schemaVersion"] >= 39
    assert dash["title"].startswith("detstream / ") and dash["uid"].startswith("detstream-")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, v["name"]
            assert re.fullmatch(r"label_values\(.+, *\w+\)", v["query"]), v["name"]

    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels(dash):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"a target of {panel['title']!r} has no expr"

    used = {name for _, expr in targets(dash) for name in re.findall(r"\$\{?(\w+)", expr)}
    used |= {name for v in variables.values() for name in re.findall(r"\$\{?(\w+)", v.get("query", "") or "")}
    assert used - BUILTIN_VARIABLES <= set(variables), f"undefined variables: {used - BUILTIN_VARIABLES - set(variables)}"
    if any("$session" in expr for _, expr in targets(dash)):
        assert variables["session"]["query"].startswith("label_values(")


def test_session_dashboards_cover_what_the_brief_promises():
    exprs = {p.stem: " ".join(e for _, e in targets(load(p))) for p in DASHBOARDS}
    for metric in ("detstream_stage_state", "detstream_frames_outcome_total", "detstream_bytes_received_total",
                   "detstream_workers"):
        assert metric in exprs["overview"], metric
    for metric in ("detstream_frames_received_total", "detstream_bytes_received_total", "detstream_queue_depth",
                   "detstream_credits", "detstream_in_flight_frames", "detstream_processing_seconds_bucket"):
        assert metric in exprs["pipeline"], metric
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(detstream_processing_seconds_bucket" in exprs["pipeline"]
    for metric in ("detstream_operator_reconciles_total", "detstream_operator_reconcile_seconds_bucket"):
        assert metric in exprs["operator"], metric


# ---------------------------------------------------------------- rules

def test_promtool_checks_the_rules():
    promtool = require("promtool")
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests_of_every_alert():
    promtool = require("promtool")
    tested = set()
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            tested |= {case["alertname"] for case in group.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert tested == {r["alert"] for r in rules()}, "every alert needs a unit test in which it fires"
    out = subprocess.run([promtool, "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_severity_and_summary():
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["alert"].startswith("Detstream")


# ---------------------------------------------------------------- live Prometheus

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params):
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:  # 400 for a bad expression: the body says why
            return json.loads(err.read())

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def result(self, expr: str) -> list:
        reply = self.query(expr)
        assert reply["status"] == "success", f"{expr}: {reply.get('error')}"
        return reply["data"]["result"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real Prometheus scraping a streaming local session and the operator's metrics."""
    prometheus_bin = require("prometheus")
    import zmq
    from prometheus_client import start_http_server

    import detstream.operator.handlers as operator_handlers
    from detstream.services.runner import LocalSession
    from detstream.services.session import load_session

    tmp = tmp_path_factory.mktemp("prometheus")
    doc = manifest(SESSION, scan={"rows": 40, "cols": 40}, source={"rate": 100}, lanes=2,
                   workers={"replicas": 2}, plugin={"name": "noop"})
    local = LocalSession(load_session(doc), tmp / "out")

    # The operator's real metric objects (default registry, with process metrics), as it serves them.
    operator_port = free_port()
    server, _ = start_http_server(operator_port, addr="127.0.0.1")
    for _ in range(3):
        operator_handlers.RECONCILES.labels("applied").inc()
        operator_handlers.RECONCILE_SECONDS.observe(0.03)
    operator_handlers.RECONCILES.labels("invalid").inc()

    # Targets labelled as the chart's PodMonitor labels them (session, stage; honor_labels).
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "detstream-stages", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{s.ports['metrics']}"],
                                 "labels": {"session": SESSION, "stage": s.role}} for s in local.plan.stages]},
            {"job_name": "detstream-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    # started before the stages: no gRPC channel is open in this process while it forks
    proc = subprocess.Popen([prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    push = None
    try:
        local.launch()
        local.wait_healthy()

        def ready():
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            try:
                return urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2).status == 200
            except OSError:
                return False
        wait_for(ready, 30, "Prometheus to be ready")
        local.start()
        # a malformed message, so the rejected-messages panels have something to show
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(local.plan.endpoint("aggregator", 0, "ingest"))
        push.send(b"not a detstream header")
        # every target scraped at least 5 times while frames flow
        wait_for(lambda: len(prom.result('min_over_time(up{job="detstream-stages"}[1m]) == 1')) == len(local.stages)
                 and prom.result('min(count_over_time(detstream_frames_received_total{stage="worker"}[1m])) >= 5')
                 and prom.result('sum(increase(detstream_frames_outcome_total{outcome="written"}[1m])) > 0')
                 and prom.result('sum(detstream_rejected_messages_total) > 0')
                 and prom.result('count_over_time(detstream_operator_reconciles_total[1m]) >= 2'),
                 60, "five scrapes of a streaming session")
        # (at 100 frames/s the 1,600 frames take 16 s: the queries normally run while it streams; a
        # finished session's stages keep serving their metrics until stopped, so they still answer)
        yield prom
    finally:
        if push is not None:
            push.close(linger=0)
        local.stop()
        proc.terminate()
        proc.wait(10)
        log.close()
        server.shutdown()


def substitute(expr: str, variables: dict) -> str:
    """What Grafana sends: template variables replaced (regex-matched ones by their value)."""
    values = {"session": SESSION, "namespace": ".*", "job": "detstream-operator",
              "__rate_interval": "10s", "__interval": "2s", "__range": "1m"}
    unknown = set(re.findall(r"\$\{?(\w+)", expr)) - set(values)
    assert not unknown, f"no test value for {unknown}"
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def test_every_dashboard_query_returns_data(live):
    problems = []
    count = 0
    for path in DASHBOARDS:
        dash = load(path)
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        for title, expr in targets(dash):
            reply = live.query(substitute(expr, variables))
            count += 1
            if reply["status"] != "success":
                problems.append(f"{path.stem} / {title}: {reply.get('error')}\n    {expr}")
            elif not reply["data"]["result"]:
                problems.append(f"{path.stem} / {title}: no data\n    {expr}")
    assert count >= 40
    assert not problems, "\n".join(problems)


def test_every_variable_query_finds_the_session(live):
    for path in DASHBOARDS:
        for v in load(path)["templating"]["list"]:
            if v["type"] != "query":
                continue
            selector, label = re.fullmatch(r"label_values\((.+), *(\w+)\)", v["query"]).groups()
            series = live.result(substitute(selector, {}))
            assert series, f"{path.stem}: variable {v['name']} finds nothing"
            found = {s["metric"].get(label) for s in series}
            want = {"session": SESSION, "job": "detstream-operator", "namespace": None}[label]
            assert want in found, f"{path.stem}: variable {v['name']} offers {found}"


# The series inside each alert's condition: in a healthy session they have data, while the alert
# expressions themselves return nothing. The one part that cannot have data in a Prometheus that
# has just started is DetstreamSessionStuck's `detstream_stage_state offset 10m` (the session
# must have existed for 10 minutes); its unit tests cover it.
ALERT_INNER_SERIES = {
    "DetstreamFramesLost": [
        'sum by (namespace, session, stage) (increase(detstream_frames_outcome_total{outcome="lost"}[5m]))'],
    "DetstreamStageDown": ['up{session!=""}'],
    "DetstreamStageFailed": ["detstream_stage_state"],
    "DetstreamBackpressureSustained": [
        'max by (namespace, session, replica) (detstream_credits{stage="distributor"})',
        'sum by (namespace, session, replica) (detstream_queue_depth{stage=~"aggregator|distributor"})'],
    "DetstreamSessionStuck": [
        "max by (namespace, session) (changes(detstream_stage_state[10m]))",
        "sum by (namespace, session) (rate(detstream_frames_received_total[10m]))",
        "min by (namespace, session) (detstream_stage_state)"],
}


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_alert_expressions_are_valid_and_quiet_in_a_healthy_session(live):
    assert set(ALERT_INNER_SERIES) == {r["alert"] for r in rules()}
    for rule in rules():
        assert live.result(rule["expr"]) == [], f"{rule['alert']} fires in a healthy, streaming session"
        for inner in ALERT_INNER_SERIES[rule["alert"]]:
            assert squash(inner) in squash(rule["expr"]), f"{inner!r} is not part of {rule['alert']}"
            assert live.result(inner), f"{rule['alert']}: {inner} has no data"
            assert all(s["metric"].get("session") == SESSION for s in live.result(inner)), inner


def test_prometheus_loaded_and_evaluates_the_rules(live):
    def evaluated():
        groups = live.get("/api/v1/rules")["data"]["groups"]
        return groups and all(r.get("lastEvaluation", "").startswith("20") and r["health"] != "unknown"
                              for g in groups for r in g["rules"])
    wait_for(evaluated, 20, "the rules to be evaluated")
    loaded = {r["name"]: r for g in live.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        assert rule["state"] == "inactive", f"{name} is {rule['state']} in a healthy session"
