"""The chart's Grafana dashboards and Prometheus alert rules, checked with the real tools.

- Structure of every dashboard JSON (schema version, datasource variable, unique panel ids, every
  target has an expression, every `$variable` defined, panels inside the 24-column grid).
- `promtool check rules` and `promtool test rules` (tests/prometheus/*.test.yaml, one test group
  per alert at least).
- Live: the Debian `prometheus` scrapes two local sessions started in-process, a healthy one and
  a troubled one labelled as on Kubernetes (see "live Prometheus" below), and the operator's own
  metrics objects; every dashboard query and variable query goes through Prometheus's HTTP API as
  Grafana sends it (variables resolved, range queries for time series), and the rules run in it.
  The tests check what a user sees: the default session, rejected messages on the panels, last
  states after the stages stopped, stat colours, units, latency resolution, which alerts fired
  with which labels, and the exact lost count.

Without promtool/prometheus these tests skip, unless $CI is set: then they fail.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, manifest, require

CHART = ROOT / "charts" / "detstream"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RULES = CHART / "alerts" / "detstream-rules.yaml"
RULE_TESTS = sorted((ROOT / "tests" / "prometheus").glob("*.test.yaml"))
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
            assert (re.fullmatch(r"label_values\(.+, *\w+\)", v["query"])
                    or re.fullmatch(r"query_result\(.+\)", v["query"]) and "(" in v["regex"]), v["name"]

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
    undefined = used - BUILTIN_VARIABLES - set(variables)
    assert not undefined, f"undefined variables: {undefined}"
    if any("$session" in expr for _, expr in targets(dash)):
        assert variables["session"]["query"].startswith(("label_values(", "query_result("))


def test_session_dashboards_cover_what_the_brief_promises():
    exprs = {p.stem: " ".join(e for _, e in targets(load(p))) for p in DASHBOARDS}
    for metric in ("detstream_stage_state", "detstream_frames_outcome_total", "detstream_bytes_received_total",
                   "detstream_workers"):
        assert metric in exprs["overview"], metric
    for metric in ("detstream_frames_received_total", "detstream_bytes_received_total", "detstream_queue_depth",
                   "detstream_credits", "detstream_in_flight_frames", "detstream_processing_seconds_bucket",
                   "detstream_peak_rss_bytes", "detstream_frames_resent_total", "detstream_backpressure_seconds_total",
                   "detstream_session_frames"):
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
#
# One Prometheus scrapes two local sessions and the operator's metrics:
# - "dash", healthy, streaming while the tests run (2 workers at 20 ms a frame, 50 frames/s), which
#   also gets one malformed message and one connection that is not ZeroMQ; scraped with the local
#   labels (replica = lane);
# - "backlog" (alphabetically first), labelled as on Kubernetes (namespace, pod, container, replica
#   = pod name): its one worker takes 100 ms a frame (sustained backpressure), its source is killed
#   mid-scan (frames lost), its writer then fails (spec.transport.onLoss: fail) and serves its
#   failed state for FAILED_LINGER_S before it exits; the session has ended when the tests run.
# The operator's gauges are set from the status the operator writes for backlog's writer status.
# The alert rules are loaded without their `for` (a test cannot wait 5 minutes): the ALERTS series
# shows which fired, with which labels; promtool's unit tests cover the `for`.

DASH, BACKLOG, NAMESPACE = "dash", "backlog", "lab"
FAILED_LINGER_S = 6
DASH_RATE, DASH_DELAY_S = 50, 0.02


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

    def wait_for(self, exprs: list[str], timeout: float) -> None:
        """Until every expression returns something; on a timeout, name those that do not."""
        deadline = time.monotonic() + timeout
        while missing := [e for e in exprs if not self.result(e)]:
            assert time.monotonic() < deadline, f"timed out waiting for {missing}"
            time.sleep(0.2)

    def series(self, expr: str, since: float) -> list:
        """A range query from `since` to now at 1 s steps, as a Grafana time-series panel sends it."""
        reply = self.get("/api/v1/query_range", query=expr, start=f"{since:.3f}", end=f"{time.time():.3f}", step="1")
        assert reply["status"] == "success", f"{expr}: {reply.get('error')}"
        return reply["data"]["result"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def pod_name(stage) -> str:
    """What a stage pod of the backlog session is called on Kubernetes (workers: a Deployment)."""
    return f"{BACKLOG}-worker-5d8c7-x{stage.index}" if stage.role == "worker" else f"{BACKLOG}-{stage.name}"


def scrape_jobs(dash, backlog, operator_port: int) -> list[dict]:
    """The targets labelled as the chart's monitors label them (honor_labels; on Kubernetes the
    stages' own replica label is the pod name)."""
    return [
        {"job_name": "detstream-stages", "honor_labels": True,
         "static_configs": [{"targets": [f"127.0.0.1:{s.ports['metrics']}"],
                             "labels": {"session": DASH, "stage": s.role}} for s in dash.plan.stages]},
        {"job_name": f"{NAMESPACE}/detstream-stages", "honor_labels": True,
         "static_configs": [{"targets": [f"127.0.0.1:{s.ports['metrics']}"],
                             "labels": {"namespace": NAMESPACE, "pod": pod_name(s), "container": "stage",
                                        "endpoint": "metrics", "session": BACKLOG, "stage": s.role}}
                            for s in backlog.plan.stages],
         "metric_relabel_configs": [{"source_labels": ["pod"], "target_label": "replica"}]},
        {"job_name": "detstream-operator", "honor_labels": True,
         "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
    ]


def rules_firing_at_once(path: Path) -> None:
    """The chart's rules without `for`, written to `path`."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    path.write_text(yaml.safe_dump(doc))


@contextmanager
def environment(**values):
    """Environment variables for the stage processes launched inside (they inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def export_operator_status(session, writer_status) -> dict:
    """What the operator's observe() writes for this writer status, and exports from it."""
    from detstream.operator import metrics as operator_metrics
    from detstream.operator.status import Observed, status_patch
    from detstream.services.model.plan import replicas

    observed = Observed(desired=replicas(session), stages={f"{BACKLOG}-writer-0": writer_status}, started=True)
    status = status_patch(observed, {}, 1, "")
    operator_metrics.export(NAMESPACE, BACKLOG, status)
    return status


@dataclass
class Live:
    prom: Prometheus
    t0: float               # when Prometheus started (range queries start here)
    backlog_status: dict    # the status the operator wrote for backlog at its end
    backlog_report: dict    # what `detstream run` reports for backlog (its summary)
    rejected_at: float      # when dash got the malformed message and the non-ZeroMQ connection
    dash_stages: int        # how many stage processes dash has
    dash_sources: int       # how many source replicas dash has
    frame_bytes: int        # the pixels of one detector frame of backlog, in bytes
    failed_metrics: str     # what backlog's failed writer served 3 s after it failed


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real Prometheus scraping the two sessions and the operator's metrics (see above)."""
    prometheus_bin = require("prometheus")
    import zmq
    from prometheus_client import start_http_server

    import detstream.operator.handlers as operator_handlers
    from detstream.services.launcher.progress import Summary
    from detstream.services.launcher.runner import LocalSession
    from detstream.services.model.session import load_session
    from detstream.services.sinks.output import accounting_file, read_accounting

    tmp = tmp_path_factory.mktemp("prometheus")
    fast = {"heartbeatS": 0.1, "workerTimeoutS": 2.0, "frameTimeoutS": 0.5, "endOfScanTimeoutS": 1.5}
    dash = LocalSession(load_session(manifest(DASH, scan={"rows": 40, "cols": 40, "count": 2},
                                              source={"rate": DASH_RATE}, lanes=2, workers={"replicas": 2},
                                              plugin={"name": "noop"})), tmp / "dash")
    backlog_session = load_session(manifest(BACKLOG, scan={"rows": 16, "cols": 32}, source={"rate": 0}, lanes=1,
                                            workers={"replicas": 1}, plugin={"name": "noop"},
                                            transport={**fast, "onLoss": "fail"}))
    backlog = LocalSession(backlog_session, tmp / "backlog")

    # The operator's real metric objects (default registry, with process metrics), as it serves them.
    operator_port = free_port()
    server, _ = start_http_server(operator_port, addr="127.0.0.1")
    for _ in range(3):
        operator_handlers.RECONCILES.labels("applied").inc()
        operator_handlers.RECONCILE_SECONDS.observe(0.03)
    operator_handlers.RECONCILES.labels("invalid").inc()

    rules_firing_at_once(tmp / "rules.yaml")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(tmp / "rules.yaml")], "scrape_configs": scrape_jobs(dash, backlog, operator_port)}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    t0 = time.time()
    # started before the stages: no gRPC channel is open in this process while it forks
    proc = subprocess.Popen([prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    push = None
    try:
        with environment(DETSTREAM_FAILPOINTS="worker:process-delay=0.1",
                         DETSTREAM_FAILED_LINGER_S=str(FAILED_LINGER_S)):
            backlog.spawn()
        with environment(DETSTREAM_FAILPOINTS=f"worker:process-delay={DASH_DELAY_S}"):
            dash.spawn()
        backlog.connect()  # only now: no gRPC channel may be open while the stages fork
        dash.connect()
        backlog.wait_healthy()
        dash.wait_healthy()

        def ready():
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            try:
                return urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2).status == 200
            except OSError:
                return False
        wait_for(ready, 30, "Prometheus to be ready")
        wait_for(lambda: prom.result('up{job=~".*detstream-stages"} == 1'), 30, "a first scrape")

        backlog.start()
        writer = backlog.writer().client

        def backlog_written(n):
            status = export_operator_status(backlog_session, writer.status())  # as observe() every 2 s
            return status["framesWritten"] >= n
        wait_for(lambda: backlog_written(120), 120, "backlog half written")
        source = next(p for p in backlog.stages if p.stage.role == "source")
        source.proc.kill()   # mid-scan: the rest of the scan is lost, and the writer fails (onLoss: fail)
        dash.start()
        # as the launcher sees it: its watch of the writer's status says failed
        final = wait_for(lambda: backlog.writer().failed() and backlog.writer().status, 60, "backlog's writer to fail")
        backlog_status = export_operator_status(backlog_session, final)
        # a few seconds on (a failed stage used to exit within its control server's 1 s grace),
        # what its metrics endpoint says
        time.sleep(3)
        writer_metrics = f"http://127.0.0.1:{backlog.writer().stage.ports['metrics']}/metrics"
        try:
            failed_metrics = urllib.request.urlopen(writer_metrics, timeout=5).read().decode()
        except OSError as exc:
            failed_metrics = str(exc)
        closed = read_accounting(accounting_file(backlog.output / backlog_session.spec.output.path, BACKLOG))
        backlog_report = json.loads(Summary.of(backlog_session, final, 1.0, "failed", closed=closed).to_json())

        # one malformed message and one connection that does not speak ZeroMQ, to a worker's data port
        rejected_at = time.time()
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(dash.plan.endpoint("worker", 0, "data"))
        push.send(b"not a detstream header")
        host, port_ = dash.plan.endpoint("worker", 0, "data").removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port_)), timeout=5) as s:
            # a ZMTP 3.0 greeting asking for CURVE, which this (plain) session's sockets do not speak
            s.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\0") + bytes(32))
            s.settimeout(1.0)
            try:
                s.recv(100)  # until the stage hangs up
            except OSError:
                pass

        backlog.stop()  # the failed writer exits by itself after FAILED_LINGER_S
        prom.wait_for([f'sum(detstream_rejected_messages_total{{session="{DASH}"}}) >= 2',
                       f'count(up{{session="{BACKLOG}"}} == 0) == {len(backlog.stages)}',
                       f'min(count_over_time(detstream_frames_received_total{{session="{DASH}", stage="worker"}}[1m]))'
                       ' >= 5'],
                      60)
        assert not dash.finished(), "dash ended before the tests: give it a longer scan"
        yield Live(prom, t0, backlog_status, backlog_report, rejected_at, len(dash.stages),
                   len(dash.plan.of_role("source")), backlog_session.spec.detector.frame_bytes, failed_metrics)
    finally:
        if push is not None:
            push.close(linger=0)
        dash.stop()
        backlog.stop()
        proc.terminate()
        proc.wait(10)
        log.close()
        server.shutdown()


GRAFANA = {"namespace": ".*", "job": "detstream-operator", "__rate_interval": "4s", "__interval": "1s",
           "__range": "10m"}


def substitute(expr: str, values: dict) -> str:
    """What Grafana sends: template variables replaced by their values."""
    values = {**GRAFANA, **values}
    unknown = set(re.findall(r"\$\{?(\w+)", expr)) - set(values)
    assert not unknown, f"no test value for {unknown}"
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def options(prom: Prometheus, variable: dict, since: float) -> list[str]:
    """The values Grafana offers for a query variable, in its order (the first is the default)."""
    query = substitute(variable["query"], {})
    if query.startswith("query_result("):
        # Grafana's text of each result: {label="value", ...} VALUE TIMESTAMP, matched by the variable's regex
        lines = ["{" + ", ".join(f'{k}="{v}"' for k, v in s["metric"].items()) + "} "
                 + " ".join(map(str, s["value"][::-1])) for s in prom.result(query[len("query_result("):-1])]
        found = [re.search(variable["regex"].strip("/"), line) for line in lines]
        values = list(dict.fromkeys(m.group(1) for m in found if m))
    else:
        # the series of the dashboard's time range (refresh: on time range change)
        selector, label = re.fullmatch(r"label_values\((.+), *(\w+)\)", query).groups()
        found = prom.get("/api/v1/series",
                         **{"match[]": selector, "start": f"{since:.3f}", "end": f"{time.time():.3f}"})
        values = sorted({s.get(label) for s in found["data"]} - {None})
    return values if variable.get("sort", 0) == 0 else sorted(values)


def dashboard(name: str) -> dict:
    return load(CHART / "dashboards" / f"{name}.json")


def panel(dash: dict, title: str) -> dict:
    return next(p for p in panels(dash) if p["title"] == title)


def evaluate(prom: Prometheus, live: Live, p: dict, values: dict) -> list[list]:
    """Every target of a panel, as Grafana sends it: an instant query for instant targets, else a
    range query over the test's time. One list of series per target."""
    out = []
    for t in p["targets"]:
        expr = substitute(t["expr"], values)
        out.append(prom.result(expr) if t.get("instant") else prom.series(expr, live.t0))
    return out


def last(series: dict) -> float:
    """A stat panel's reduction (lastNotNull) of one series."""
    return float(series["value"][1] if "value" in series else series["values"][-1][1])


def colour(p: dict, value: float) -> str:
    """The colour Grafana gives a value by the panel's (absolute) thresholds."""
    steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [s["color"] for s in steps if s["value"] is None or value >= s["value"]][-1]


def test_the_session_variable_defaults_to_the_session_streaming_now(live):
    variable = next(v for v in dashboard("pipeline")["templating"]["list"] if v["name"] == "session")
    offered = options(live.prom, variable, live.t0)
    assert set(offered) == {BACKLOG, DASH}
    assert offered[0] == DASH, f"the default is {offered[0]}, not the session streaming now"


def test_every_dashboard_query_returns_data(live):
    problems = []
    count = 0
    for path in DASHBOARDS:
        for p in panels(load(path)):
            if p["type"] == "row":
                continue
            for t, result in zip(p["targets"], evaluate(live.prom, live, p, {"session": DASH})):
                count += 1
                if not result:
                    problems.append(f"{path.stem} / {p['title']}: no data\n    {t['expr']}")
    assert count >= 45
    assert not problems, "\n".join(problems)


def test_every_variable_query_finds_the_sessions(live):
    for path in DASHBOARDS:
        for v in load(path)["templating"]["list"]:
            if v["type"] != "query":
                continue
            want = {"session": {DASH, BACKLOG}, "job": {"detstream-operator"}, "namespace": {NAMESPACE}}[v["name"]]
            assert want <= set(options(live.prom, v, live.t0)), f"{path.stem}: variable {v['name']}"


def test_one_rejected_message_and_one_bad_connection_show_on_both_rejected_panels(live):
    for name in ("pipeline", "overview"):
        (series,) = evaluate(live.prom, live, panel(dashboard(name), "Rejected messages/s"), {"session": DASH})
        peaks = {}
        for s in series:   # the highest point of each reason, over its stages
            reason = s["metric"]["reason"]
            recent = [float(v) for t, v in s["values"] if t >= live.rejected_at - 1]
            peaks[reason] = max([peaks.get(reason, 0.0), *recent])
        assert peaks["header"] > 0 and peaks["handshake"] > 0, (name, peaks)
        assert peaks["late"] == 0, "every reason is a series from the start"


def test_stage_states_show_the_last_states_after_the_stages_stopped(live):
    for name in ("pipeline", "overview"):
        (table,) = evaluate(live.prom, live, panel(dashboard(name), "Stage states"), {"session": BACKLOG})
        states = {(s["metric"]["stage"], s["metric"]["replica"]): int(float(s["value"][1])) for s in table}
        assert states[("writer", f"{BACKLOG}-writer-0")] == 5, states   # failed
        assert {stage for stage, _ in states} == {"source", "distributor", "worker", "writer"}


def test_stat_colours_mean_something(live):
    for path in DASHBOARDS:
        for p in panels(load(path)):
            if p["type"] in ("stat", "gauge"):
                steps = p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps")
                assert steps, f"{path.stem} / {p['title']}: Grafana's default thresholds (red from 80)"
    # a healthy streaming session shows no red...
    for name in ("pipeline", "overview", "operator"):
        for p in panels(dashboard(name)):
            if p["type"] in ("stat", "gauge"):
                for result in evaluate(live.prom, live, p, {"session": DASH}):
                    assert all(colour(p, last(s)) != "red" for s in result), (name, p["title"], result)
    # ...the session that lost frames shows its loss and its failed stage in red
    lost = panel(dashboard("pipeline"), "Lost")
    ((series,),) = evaluate(live.prom, live, lost, {"session": BACKLOG})
    assert colour(lost, last(series)) == "red"
    failed = panel(dashboard("overview"), "Stages failed")
    ((series,),) = evaluate(live.prom, live, failed, {"session": BACKLOG})
    assert last(series) == 1 and colour(failed, last(series)) == "red"


def test_frames_per_stage_and_from_the_sources_with_units(live):
    pipeline = dashboard("pipeline")
    per_panel = {}
    for title in ("Frames received/s", "Frames sent/s", "Frames from sources/s"):
        p = panel(pipeline, title)
        assert p["fieldConfig"]["defaults"]["unit"] == "suffix: frames/s", title
        results = evaluate(live.prom, live, p, {"session": DASH})
        per_panel[title] = {s["metric"].get("stage") for r in results for s in r}
    assert per_panel["Frames received/s"] == {"worker", "writer"}        # assembled; results
    assert per_panel["Frames sent/s"] == {"distributor", "worker"}       # routed; results
    (sent, assembled) = evaluate(live.prom, live, panel(pipeline, "Frames from sources/s"), {"session": DASH})
    assert len(sent) == live.dash_sources and len(assembled) == 1   # a line per source, the workers' sum


def test_ingest_shows_the_raw_detector_bytes_the_workers_received(live):
    """backlog's one source sent whole frames, so its worker received exactly a frame's pixels per frame it
    assembled: what the Ingest panels sum, read as totals instead of rates."""
    for title in ("Ingest", "Ingest bytes/s"):
        expr = panel(dashboard("overview"), title)["targets"][0]["expr"].replace("rate(", "last_over_time(")
        (total,) = live.prom.result(substitute(expr, {"session": BACKLOG, "__rate_interval": "10m"}))
        (frames,) = live.prom.result(f'sum(last_over_time(detstream_frames_received_total{{session="{BACKLOG}", '
                                     'stage="worker"}[10m]))')
        assert float(frames["value"][1]) > 0
        assert float(total["value"][1]) == float(frames["value"][1]) * live.frame_bytes, title


def test_the_latency_panel_resolves_a_20_ms_delay(live):
    p = panel(dashboard("pipeline"), "Processing latency")
    p50 = next(t for t in p["targets"] if t["legendFormat"] == "p50")
    (series,) = live.prom.result(substitute(p50["expr"], {"session": DASH, "__rate_interval": "20s"}))
    assert DASH_DELAY_S * 0.9 <= float(series["value"][1]) <= DASH_DELAY_S * 1.3, series


def test_peak_memory_and_resent_frames_are_shown(live):
    pipeline = dashboard("pipeline")
    (memory,) = evaluate(live.prom, live, panel(pipeline, "Peak memory per stage"), {"session": DASH})
    assert len(memory) == live.dash_stages and all(last(s) > 10e6 for s in memory)   # every stage process, >10 MB each
    ((resent,),) = evaluate(live.prom, live, panel(pipeline, "Frames re-sent"), {"session": DASH})
    assert last(resent) == 0


def fired(prom: Prometheus, alert: str) -> list[dict]:
    """Label sets an alert fired with since Prometheus started."""
    return [s["metric"] for s in prom.result(f'max_over_time(ALERTS{{alertname="{alert}", alertstate="firing"}}[10m])')]


def test_a_failed_stage_keeps_serving_its_failed_state(live):
    assert 'detstream_stage_state{replica="0",session="backlog",stage="writer"} 5.0' in live.failed_metrics, \
        live.failed_metrics[:300]


def test_the_troubled_session_fires_its_alerts_with_cluster_labels(live):
    expected = {
        "DetstreamBackpressureSustained": {"namespace": NAMESPACE, "session": BACKLOG,
                                           "replica": f"{BACKLOG}-distributor-0"},
        "DetstreamStageFailed": {"namespace": NAMESPACE, "session": BACKLOG, "stage": "writer",
                                 "replica": f"{BACKLOG}-writer-0", "pod": f"{BACKLOG}-writer-0"},
        "DetstreamFramesLost": {"namespace": NAMESPACE, "session": BACKLOG},
    }
    for alert, labels in expected.items():
        assert any(labels.items() <= m.items() for m in fired(live.prom, alert)), (alert, fired(live.prom, alert))


def test_one_rejected_message_and_one_bad_connection_fire_the_alerts(live):
    (header,) = [m for m in fired(live.prom, "DetstreamMessagesRejected") if m["session"] == DASH]
    assert (header["stage"], header["reason"], header["severity"]) == ("worker", "header", "warning")
    (handshake,) = [m for m in fired(live.prom, "DetstreamUnauthenticatedPeer") if m["session"] == DASH]
    assert (handshake["stage"], handshake["reason"], handshake["severity"]) == ("worker", "handshake", "critical")
    others = {s["metric"]["alertname"] for s in live.prom.result(f'ALERTS{{session="{DASH}"}}')}
    assert others <= {"DetstreamMessagesRejected", "DetstreamUnauthenticatedPeer"}, "dash is otherwise healthy"


def test_the_lost_count_reaches_prometheus_exactly(live):
    lost = sum(s["lost"] for s in live.backlog_report["scans"])
    assert lost > 0 and lost == live.backlog_status["framesLost"]
    (gauge,) = live.prom.result(f'detstream_session_frames{{session="{BACKLOG}", outcome="lost"}}')
    assert gauge["metric"]["namespace"] == NAMESPACE and float(gauge["value"][1]) == lost
    (alert,) = [s for s in live.prom.result(rules()[0]["expr"]) if s["metric"]["session"] == BACKLOG]
    assert float(alert["value"][1]) == lost
    written = live.prom.result(f'detstream_session_frames{{session="{BACKLOG}", outcome="written"}}')
    assert float(written[0]["value"][1]) == sum(s["written"] for s in live.backlog_report["scans"])


def test_the_distributors_count_the_lost_frames_exactly(live):
    """What the dashboards and DetstreamFramesLost show without an operator (local runs): the lanes' count."""
    lost = sum(s["lost"] for s in live.backlog_report["scans"])
    (counted,) = live.prom.result(f'sum(last_over_time(detstream_frames_outcome_total{{session="{BACKLOG}", '
                                  'stage="distributor", outcome="lost"}[10m]))')
    assert lost > 0 and float(counted["value"][1]) == lost


def test_every_labelled_counter_exports_every_label_value_from_the_start(live):
    from detstream.services.dataplane.wire import REJECT_REASONS
    for stage in ("source", "distributor", "worker", "writer"):
        reasons = {s["metric"]["reason"] for s in live.prom.result(
            f'detstream_rejected_messages_total{{session="{DASH}", stage="{stage}"}}')}
        assert reasons == set(REJECT_REASONS), stage
    results = {s["metric"]["result"] for s in live.prom.result("detstream_operator_reconciles_total")}
    assert results == {"applied", "invalid", "error"}


def test_every_rejection_reason_in_the_code_is_listed():
    """Each reason a stage passes to WireError/refuse is one REJECT_REASONS exports from the start."""
    from detstream.services.dataplane.wire import REJECT_REASONS
    code = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    used = set(re.findall(r'(?:WireError|refuse)\(\s*"([\w-]+)"', code))
    used |= set(re.findall(r'reason = "([\w-]+)"', code))
    used |= set(re.findall(r'"([\w-]+)" if self\.curve else "([\w-]+)"', code)[0])
    assert used and used <= set(REJECT_REASONS), used - set(REJECT_REASONS)


def test_prometheus_loaded_and_evaluates_the_rules(live):
    def evaluated():
        groups = live.prom.get("/api/v1/rules")["data"]["groups"]
        return groups and all(r.get("lastEvaluation", "").startswith("20") and r["health"] != "unknown"
                              for g in groups for r in g["rules"])
    wait_for(evaluated, 20, "the rules to be evaluated")
    loaded = {r["name"]: r for g in live.prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


