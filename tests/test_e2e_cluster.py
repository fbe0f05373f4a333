"""End to end on a real control plane: `helm install`, `kubectl apply` -> the operator -> pods ->
frames -> HDF5.

tests/cluster/ runs a real kube-apiserver and kube-controller-manager (v1.20.2); the chart is installed
with `helm install`, and the test node agent (tests/node_agent/) stands in for the scheduler and the
kubelet: it runs the chart's operator pod (with its ServiceAccount's token, so the API server
authorizes it by the chart's RBAC) and the pods the operator's StatefulSets and Deployments create, as
local processes, from the manifests as the API server holds them (command, env with downward-API fields,
volumes, probes, restart policy), each with its own loopback IP, resolving Service names from their
EndpointSlices. So a wrong command, a missing variable, a wrong port or a probe that never passes
fails these tests (see test_the_agent_refuses_what_a_kubelet_would).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
import stempy.io
import yaml
from test_tomo_session import fbp, relative_rms, simulated_sinograms

from detstream.services.dataplane.accounting import COMPLETE
from detstream.services.model.session import read_manifest
from detstream.services.sinks.output import read_accounting
from detstream.services.sources.tomo_simulator import ground_truth

from cluster.fixtures import RBAC_DENIAL
from helpers import ROOT, Background, manifest, wait_for

NS = "e2e"
OPERATOR_NS = "e2e-system"  # the chart's release; its operator serves NS
TESTS = Path(__file__).resolve().parent
# Small and light: 128x128 frames in 4 sectors, counted with fixed thresholds; `rate` makes a scan
# last long enough to act on it while it streams.
LIGHT = {"detector": {"rows": 128, "cols": 128, "sectors": 4},
         "plugin": {"name": "electron-counting", "params": {"dark": "simulated", "backgroundThreshold": 32,
                                                            "xrayThreshold": 50}},
         "transport": {"frameTimeoutS": 20.0}}
wait_until = functools.partial(wait_for, every=0.3)  # each poll runs kubectl: not too often


class Env:
    def __init__(self, kubectl, workdir, agent):
        self.kubectl, self.workdir, self.agent = kubectl, workdir, agent
        self.pods_dir = workdir / "node" / "pods"

    def operator_log(self):
        """The chart's operator pod's log, as the node keeps it (its container is named `operator`)."""
        return "".join(p.read_text(errors="replace") for p in sorted((self.workdir / "node").glob("**/operator/*.log")))

    def rbac_denials(self):
        """What the chart's RBAC refused the operator so far (its ServiceAccount's token is its only identity)."""
        return [line for line in self.operator_log().splitlines() if RBAC_DENIAL.search(line)]

    def get(self, what, name=None):
        out = self.kubectl.run("get", "-n", NS, what, *([name] if name else []), "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def status(self, session):
        return (self.get("sess", session) or {}).get("status") or {}

    def pods(self, session, role=None):
        selector = f"detstream.io/session={session}" + (f",app.kubernetes.io/component={role}" if role else "")
        out = self.kubectl("get", "pods", "-n", NS, "-l", selector, "-o", "json")
        return json.loads(out)["items"]

    def apply(self, doc):
        return self.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(doc))

    def volume(self, pod, name):
        """A pod's volume as the node holds it (what `kubectl cp` would read from inside the pod)."""
        return self.pods_dir / pod["metadata"]["uid"] / "volumes" / name

    def processes(self):
        """Command lines of processes the node agent started that are still running."""
        out = subprocess.run(["pgrep", "-af", str(self.pods_dir)], capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if "pgrep" not in line]

    def wait_phase(self, session, phase, timeout=240):
        def reached():
            status = self.status(session)
            assert status.get("phase") != "Failed" or phase == "Failed", f"session failed: {status.get('message')}"
            assert not self.rbac_denials(), "the chart's RBAC refused the operator:\n" + "\n".join(self.rbac_denials())
            return status.get("phase") == phase and status
        return wait_until(reached, timeout, f"{session} {phase}")

    def delete(self, session, timeout=120):
        """`kubectl delete` and wait until its pods and their processes are gone."""
        uids = [p["metadata"]["uid"] for p in self.pods(session)]
        self.kubectl("delete", "-n", NS, f"sess/{session}", f"--timeout={timeout}s", timeout=timeout + 10)
        wait_until(lambda: not self.pods(session), timeout, f"{session}'s pods gone")
        wait_until(lambda: not [p for p in self.processes() if any(uid in p for uid in uids)], 30,
                   f"{session}'s processes gone")

    def events(self, name):
        out = self.kubectl("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={name}", "-o", "json")
        return [e["message"] for e in json.loads(out)["items"]]


@pytest.fixture
def e2e(cluster):
    """The module's cluster; whatever a test leaves (a failed one) is deleted after it."""
    yield cluster
    cluster.kubectl.run("delete", "sess", "--all", "-n", NS, "--timeout=120s", check=False, timeout=130)
    cluster.kubectl.run("delete", "pvc", "--all", "-n", NS, "--timeout=60s", check=False, timeout=70)
    wait_until(lambda: not cluster.get("pods")["items"], 120, "every pod gone")


def pod_namespaces_possible() -> bool:
    """The node agent gives each pod its own /etc/hosts and /run in a mount namespace: root, or
    unprivileged user namespaces (some CI runners forbid them)."""
    from node_agent.container import in_pod_namespace
    try:
        subprocess.run(["true"], preexec_fn=in_pod_namespace(Path("/etc/hosts"), Path("/run")), check=True)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def cluster(kubectl, helm, tmp_path_factory):
    if not pod_namespaces_possible():
        pytest.skip("the test node agent cannot make a mount namespace here (needs root or unprivileged "
                    "user namespaces)")
    from detstream.services.launcher.runner import free_ports

    kubectl("create", "namespace", NS)
    workdir = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "KUBECONFIG": str(kubectl.cp.kubeconfig)}
    agent = Background([sys.executable, "-m", "node_agent", "--kubeconfig", str(kubectl.cp.kubeconfig), "-n", NS,
                        "-n", OPERATOR_NS, "--workdir", str(workdir / "node")], workdir / "node-agent.log", env=env,
                       cwd=TESTS)
    wait_until(lambda: kubectl("get", "nodes", "-o", "name").strip(), what="the test node")
    ports = free_ports()  # the operator listens on every address of the machine: ports nothing else uses
    helm("install", "detstream", str(ROOT / "charts" / "detstream"), "-n", OPERATOR_NS, "--create-namespace",
         values={"watchNamespaces": [NS], "dashboards": {"enabled": False},
                 "operator": {"livenessPort": next(ports)}, "metrics": {"port": next(ports)}})
    e = Env(kubectl, workdir, agent)
    try:
        wait_until(lambda: kubectl.run("explain", "streamingsession.spec", check=False).returncode == 0, what="CRD")
        wait_until(lambda: operator_ready(kubectl), 120, "the chart's operator pod Ready")
        yield e
    finally:
        kubectl.run("delete", "namespace", NS, "--wait=false", check=False)
        helm("uninstall", "detstream", "-n", OPERATOR_NS, check=False)
        agent.stop()
        print(f"\nlogs: {workdir}", file=sys.stderr)
    assert agent.proc.returncode == 0, agent.log()[-3000:]
    assert not e.processes(), "the node agent left processes running"
    assert not kubectl("get", "nodes", "-o", "name").strip(), "the node agent left its Node"


def operator_ready(kubectl):
    pods = json.loads(kubectl("get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/component=operator",
                              "-o", "json"))["items"]
    return any(c["type"] == "Ready" and c["status"] == "True"
               for p in pods for c in (p.get("status") or {}).get("conditions") or [])


class PhaseWatch:
    """`kubectl get sess NAME -w`: every phase the session's status went through, in order."""

    def __init__(self, kubectl, name):
        self.proc = subprocess.Popen(
            [kubectl.exe, f"--kubeconfig={kubectl.cp.kubeconfig}", "get", "-n", NS, "sess", "-w",
             f"--field-selector=metadata.name={name}", "--request-timeout=0",
             "-o", "jsonpath={.status.phase}{'\\n'}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.thread.start()

    def phases(self) -> list[str]:
        self.proc.terminate()
        self.thread.join(5)
        out = []
        for line in self.lines:
            line = line.strip()
            if line and (not out or out[-1] != line):
                out.append(line)
        return out


def metric(pod, name):
    """A stage's counter, read from its Prometheus endpoint on its pod IP (0 while it is not serving)."""
    try:
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:9100/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def pod_log(e2e, pod_name):
    """What `kubectl logs` would show of a removed pod: the node agent keeps its logs (it moves them
    there once the pod is gone, which may be a moment after the API server has let it go)."""
    folders = wait_until(lambda: list((e2e.workdir / "node" / "logs").glob(f"{NS}_{pod_name}_*")), 30,
                         f"the logs of {pod_name}")
    return "".join(f.read_text() for d in folders for f in sorted(d.rglob("*.log")))


def check_accounting(status, rows, cols):
    (scan,) = status["scans"]
    assert scan["complete"] and scan["expected"] == rows * cols
    assert scan["expected"] == scan["written"] + scan["lost"]
    assert (status["framesWritten"], status["framesLost"]) == (scan["written"], scan["lost"])
    return scan


def test_example_session_streams_through_pods_to_a_stempy_file(e2e):
    t0 = time.monotonic()
    watch = PhaseWatch(e2e.kubectl, "demo")
    e2e.kubectl("apply", "-n", NS, "-f", str(ROOT / "examples" / "4dstem.yaml"))
    status = e2e.wait_phase("demo", "Succeeded", timeout=300)
    took = time.monotonic() - t0
    # Pending lasts until the first stage pod runs; this node starts pods within a second, sometimes
    # before the operator's first observation (1 s after creation): then it is not seen.
    phases = watch.phases()
    assert phases in (["Pending", "Starting", "Ready", "Streaming", "Succeeded"],
                      ["Starting", "Ready", "Streaming", "Succeeded"]), phases
    scan = check_accounting(status, 32, 32)
    assert scan["lost"] == 0 and scan["written"] == 1024
    row = e2e.kubectl("get", "sess", "demo", "-n", NS).splitlines()[1].split()
    assert (row[0], row[1], row[3], row[4]) == ("demo", "Succeeded", "1024", "0")

    # The results live in the writer's emptyDir: the writer stays (finished) until the session is
    # deleted, so they can be fetched (`kubectl cp demo-writer-0:/data/demo-scan0000.h5 .`).
    (writer,) = e2e.pods("demo", "writer")
    path = e2e.volume(writer, "output") / "demo-scan0000.h5"
    counted = stempy.io.load_electron_counts(str(path))
    assert tuple(counted.scan_shape) == (32, 32) and tuple(counted.frame_shape) == (576, 576)
    assert sum(1 for frames in counted.data if len(frames[0])) == scan["written"]
    if scan["partial"] == 0:  # a partial frame is zero-filled: only whole frames count as stempy does
        from test_local_session import stempy_events

        from detstream.services.model.session import Detector
        from detstream.services.model.session import Simulator as SimulatorSettings
        from detstream.services.sources.simulator import Simulator
        sim = Simulator(SimulatorSettings(seed=7), Detector())
        for position in range(0, 1024, 97):
            np.testing.assert_array_equal(np.sort(counted.data[position][0]),
                                          stempy_events(sim.frame(0, position), sim.dark))
    wait_until(lambda: [p["metadata"]["name"] for p in e2e.pods("demo")] == ["demo-writer-0"], 60,
               "every stage but the writer scaled to zero")
    print(f"\nexample: kubectl apply -> Succeeded in {took:.1f} s", file=sys.stderr)
    e2e.delete("demo")
    wait_until(lambda: not path.exists(), 10, "the emptyDir removed with its pod")
    # the chart's operator did all this with the chart's RBAC, and was refused nothing
    assert "Handler 'reconcile' succeeded" in e2e.operator_log() and not e2e.rbac_denials(), e2e.rbac_denials()


def claim(e2e, name):
    """A PersistentVolumeClaim bound to a hostPath PersistentVolume in a folder of the test."""
    folder = e2e.workdir / name
    folder.mkdir()
    e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{NS}-{name}"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                  "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(folder)},
                  "claimRef": {"namespace": NS, "name": name}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": NS},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": f"{NS}-{name}",
                  "resources": {"requests": {"storage": "1Gi"}}}}]))
    wait_until(lambda: (e2e.get("pvc", name) or {}).get("status", {}).get("phase") == "Bound", what=f"{name} Bound")
    return folder


def streaming_session(e2e, name, rows, rate, workers, scans=1, **extra):
    sections = {**copy.deepcopy(LIGHT), **extra}
    doc = manifest(name, scan={"rows": rows, "cols": rows, "count": scans}, workers={"replicas": workers},
                   source={"kind": "simulator", "rate": rate, "simulator": {"seed": 3}},
                   output={"volumeClaim": name}, **sections)
    folder = claim(e2e, name)
    e2e.apply(doc)
    return folder


def written(e2e, session):
    return e2e.status(session).get("framesWritten", 0)


def check_file(path, rows, written_frames):
    """The file loads with stempy; the positions with events are the frames the writer counted."""
    counted = stempy.io.load_electron_counts(str(path))
    assert tuple(counted.scan_shape) == (rows, rows)
    assert sum(1 for frames in counted.data if len(frames[0])) == written_frames
    return counted


def test_scaling_workers_mid_scan_spreads_the_work_and_loses_nothing(e2e):
    folder = streaming_session(e2e, "scaled", 24, rate=12, workers=1)
    e2e.wait_phase("scaled", "Streaming")
    first = {p["metadata"]["name"] for p in e2e.pods("scaled", "worker")}
    wait_until(lambda: written(e2e, "scaled") >= 30, 120, "frames written by one worker")
    e2e.kubectl("scale", "-n", NS, "sess/scaled", "--replicas=3")

    def new_workers_working():
        new = [p for p in e2e.pods("scaled", "worker") if p["metadata"]["name"] not in first
               and p.get("status", {}).get("podIP")]
        assert e2e.status("scaled").get("phase") == "Streaming", "the scan ended before the new workers worked"
        return len(new) == 2 and all(metric(p, "detstream_frames_received_total") > 0 for p in new) and new
    wait_until(new_workers_working, 150, "the two new workers to receive frames", every=1)
    status = e2e.wait_phase("scaled", "Succeeded")
    assert status["workers"].endswith("/3") and status["workerReplicas"] == 3
    scan = check_accounting(status, 24, 24)
    assert (scan["written"], scan["lost"], scan["partial"]) == (576, 0, 0)
    check_file(folder / "scaled-scan0000.h5", 24, 576)
    assert any("came up mid-session" in m for m in e2e.events("scaled"))
    e2e.delete("scaled")


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_killed_or_stopped_worker_loses_nothing_and_duplicates_nothing(e2e, how):
    # Without fixed thresholds a worker holds its first `samples` frames to calibrate on them: they
    # are in flight (handed out, not acknowledged) when it is killed (SIGKILL: its pod restarts) or
    # stopped (SIGSTOP: silent, declared dead), so they must be re-sent.
    plugin = {"name": "electron-counting", "params": {"dark": "simulated", "samples": 60}}
    folder = streaming_session(e2e, how, 24, rate=12, workers=2, plugin=plugin,
                               transport={**LIGHT["transport"], "workerTimeoutS": 2.0})
    e2e.wait_phase(how, "Streaming")
    victim = e2e.pods(how, "worker")[0]
    name = victim["metadata"]["name"]
    wait_until(lambda: metric(victim, "detstream_frames_received_total") >= 15, 120, f"{name} holding frames")
    if how == "killed":
        kill_and_restart(e2e, victim)
        status = e2e.wait_phase(how, "Succeeded")
        assert any(f"came up mid-session: {name} (restarted 1x)" in m for m in e2e.events(how))
    else:
        pid = int(victim["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
        os.kill(pid, signal.SIGSTOP)
        try:
            status = e2e.wait_phase(how, "Succeeded")
        finally:
            os.kill(pid, signal.SIGCONT)
    scan = check_accounting(status, 24, 24)
    assert (scan["written"], scan["lost"], scan["partial"]) == (576, 0, 0)
    counted = check_file(folder / f"{how}-scan0000.h5", 24, 576)
    assert all(len(frames) == 1 for frames in counted.data)  # every position once: nothing duplicated
    e2e.delete(how)
    resent = [int(n) for n in re.findall(r"worker declared dead .*: routing its (\d+) frames again",
                                         pod_log(e2e, f"{how}-distributor-0"))]
    assert resent and resent[0] >= 15, resent


def kill_and_restart(e2e, pod):
    """SIGKILL the pod's process; wait until the (test) kubelet has restarted it and it is ready."""
    name = pod["metadata"]["name"]
    (container,) = pod["status"]["containerStatuses"]
    os.kill(int(container["containerID"].removeprefix("process://")), signal.SIGKILL)

    def restarted():
        (cs,) = e2e.get("pod", name)["status"]["containerStatuses"]
        return cs["restartCount"] == 1 and cs["ready"] and cs
    cs = wait_until(restarted, 90, f"{name} restarted and ready")
    assert cs["lastState"]["terminated"]["exitCode"] == 137 and cs["lastState"]["terminated"]["reason"] == "Error"


@pytest.mark.parametrize("role", ["distributor", "source"])
def test_a_killed_pipeline_stage_restarts_and_the_session_resumes_with_exact_accounting(e2e, role):
    # What its process held dies with it: those frames are lost, the others written, every scan
    # closes exactly (written + lost = expected), and the scans after the restart are whole. A
    # restarted lane learns again from the sources what they still keep (WANT, their scans' ends); a
    # restarted simulator source streams its scans again from the first: the frames the workers had
    # already are dropped there as duplicates, and a scan its lane closed meanwhile takes none.
    session = f"{role[:3]}-killed"
    streaming_session(e2e, session, 12, rate=20, workers=2, scans=3,
                      transport={**LIGHT["transport"], "endOfScanTimeoutS": 5.0, "workerTimeoutS": 2.0})
    e2e.wait_phase(session, "Streaming")
    wait_until(lambda: written(e2e, session) >= 30, 120, "scan 0 under way")
    (victim,) = e2e.pods(session, role)
    kill_and_restart(e2e, victim)
    status = e2e.wait_phase(session, "Succeeded")
    scans = status["scans"]
    assert [s["scan"] for s in scans] == [0, 1, 2]
    for s in scans:
        assert s["complete"] and s["expected"] == 144 == s["written"] + s["lost"], s
    assert scans[2]["written"] == 144, "the scan after the restart is whole"
    assert (status["framesWritten"], status["framesLost"]) == (sum(s["written"] for s in scans),
                                                               sum(s["lost"] for s in scans))
    name = victim["metadata"]["name"]
    assert any(f"came up mid-session: {name} (restarted 1x)" in m for m in e2e.events(session))
    e2e.delete(session)
    assert "UNACCOUNTED" not in pod_log(e2e, f"{session}-writer-0")


def test_a_pod_that_cannot_start_fails_the_session_with_its_message(e2e):
    # A replay of a file the source pod cannot see: the source exits 1 with the reason, is restarted,
    # exits again and backs off (CrashLoopBackOff), and the session says which pod and why.
    doc = manifest("broken", source={"kind": "replay", "path": "/data/scan-0042.npy"}, **copy.deepcopy(LIGHT))
    e2e.apply(doc)
    status = e2e.wait_phase("broken", "Failed", timeout=120)
    expected = "replay file /data/scan-0042.npy does not exist (spec.source.path)"
    assert status["message"].startswith("pod broken-source-0: CrashLoopBackOff: ") and expected in status["message"]
    ready = {c["type"]: c for c in status["conditions"]}["StagesReady"]
    assert ready["status"] == "False" and ready["reason"] == "StageFailed" and expected in ready["message"]
    (source,) = e2e.pods("broken", "source")
    (cs,) = source["status"]["containerStatuses"]
    assert cs["restartCount"] >= 1 and cs["lastState"]["terminated"]["exitCode"] == 1
    assert any("Back-off restarting failed container" in m for m in e2e.events("broken-source-0"))
    e2e.delete("broken")


def test_deleting_a_running_session_drains_it_and_removes_everything(e2e):
    folder = streaming_session(e2e, "drained", 32, rate=10, workers=2)
    e2e.wait_phase("drained", "Streaming")
    wait_until(lambda: written(e2e, "drained") >= 30, 120, "frames written")
    watch = PhaseWatch(e2e.kubectl, "drained")
    t0 = time.monotonic()
    e2e.delete("drained")
    took = time.monotonic() - t0
    assert "Draining" in watch.phases()
    assert not e2e.get("sess", "drained")
    assert any("drained: the writer has closed its files" in m for m in e2e.events("drained"))
    # The source ended its scan early; the writer closed it: frames not sent are reported lost, the
    # file is complete (renamed from its temporary name), valid, and holds what was written.
    closed = re.search(r"scan 0 closed: (\d+) expected, (\d+) written \((\d+) partial\), (\d+) lost",
                       pod_log(e2e, "drained-writer-0"))
    expected, kept, _, lost = map(int, closed.groups())
    assert expected == 1024 == kept + lost and 30 <= kept < 1024
    assert sorted(os.listdir(folder)) == ["drained-accounting.jsonl", "drained-scan0000.h5"]
    (account,) = read_accounting(folder / "drained-accounting.jsonl")
    assert (account["written"], account["lost"], account["unaccounted"]) == (kept, lost, 0)
    check_file(folder / "drained-scan0000.h5", 32, kept)
    print(f"\ndrain: kubectl delete returned in {took:.1f} s; {kept} of 1024 frames written, {lost} lost",
          file=sys.stderr)


def test_the_agent_refuses_what_a_kubelet_would(e2e):
    """The operator's own worker Deployment, applied as it builds it and with one thing broken each:
    only the unbroken one becomes Ready. This is what makes the tests above worth something."""
    from detstream.operator import resources
    from detstream.services.model.session import load_session

    session = load_session({**manifest("honest", **copy.deepcopy(LIGHT)), "metadata": {"name": "honest",
                                                                                        "namespace": NS}})
    built = resources.children(session, "example/detstream:test")
    plan = next(o for o in built if o["kind"] == "ConfigMap")
    worker = next(o for o in built if o["kind"] == "Deployment")

    def env(name, value=None):
        def change(c):
            c["env"] = [e for e in c["env"] if e["name"] != name] + ([{"name": name, "value": value}] if value else [])
        return change

    def metrics_port(c):  # declared where the stage does not listen: the probes ask the wrong port
        next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"] = 7999

    def mount_at(path):
        def change(c):
            next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/detstream")["mountPath"] = path
        return change

    cases = {"control": lambda c: None,
             "command": lambda c: c["args"].__setitem__(1, "wroker"),  # a typo in the role
             "env": env("POD_IP"),                                      # no downward-API pod IP
             "port": metrics_port,
             "mount": mount_at("/etc/plan")}                            # the plan is not where args say
    docs = [plan]
    for case, change in cases.items():
        doc = copy.deepcopy(worker)
        doc["metadata"]["name"] = f"honest-{case}"
        doc["spec"]["replicas"] = 1
        doc["spec"]["selector"]["matchLabels"]["case"] = doc["spec"]["template"]["metadata"]["labels"]["case"] = case
        change(doc["spec"]["template"]["spec"]["containers"][0])
        docs.append(doc)
    e2e.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump_all(docs))

    def pods():
        return {p["metadata"]["labels"]["case"]: p for p in e2e.pods("honest")
                if p.get("status", {}).get("containerStatuses")}

    def settled():
        now = pods()
        crashed = [now[c]["status"]["containerStatuses"][0] for c in ("command", "mount") if c in now]
        ready = "control" in now and now["control"]["status"]["containerStatuses"][0]["ready"]
        return ready and len(crashed) == 2 and all(cs["restartCount"] >= 1 for cs in crashed) and now
    wait_until(settled, 120, "the control worker Ready and the broken ones restarted", every=1)
    time.sleep(3 * 2)  # three more probe periods for the others
    now = {case: pod["status"]["containerStatuses"][0] for case, pod in pods().items()}
    assert now["control"]["ready"] and now["control"]["restartCount"] == 0
    assert not any(now[case]["ready"] for case in ("command", "env", "port", "mount"))
    last = lambda case: now[case].get("lastState", {}).get("terminated") or now[case]["state"]["terminated"]  # noqa
    assert last("command")["exitCode"] == 2 and "invalid choice: 'wroker'" in last("command")["message"]
    assert "/etc/detstream/plan.json" in last("mount")["message"]
    e2e.kubectl("delete", "deployment,configmap", "-n", NS, "-l", "detstream.io/session=honest")
    wait_until(lambda: not e2e.pods("honest"), 60, "the honest-* pods gone")


def worker_params(pod) -> dict | None:
    """The plugin parameters a worker pod says, over its own gRPC Status, it processes frames with
    (None while it does not answer)."""
    import grpc

    from detstream.services.runtime.control import StageClient
    client = StageClient(f"{pod['status']['podIP']}:7100", timeout=5)
    try:
        return json.loads(client.status().plugin_params_json or "null")
    except grpc.RpcError as exc:
        print(f"{pod['metadata']['name']} ({pod['status']['podIP']}): {exc.code()}", file=sys.stderr)
        return None
    finally:
        client.close()


def test_a_parameter_change_reaches_the_running_workers_and_the_frames_after_it(e2e):
    # Thresholds no pixel reaches count nothing: every frame the source sends after the workers
    # report them must be written without events; those written before the change have events.
    folder = streaming_session(e2e, "retuned", 16, rate=12, workers=2)
    e2e.wait_phase("retuned", "Streaming")
    wait_until(lambda: written(e2e, "retuned") >= 20, 120, "frames written with the first thresholds")
    workers = e2e.pods("retuned", "worker")
    before = wait_until(lambda: worker_params(workers[0]), 30, f"{workers[0]['metadata']['name']}'s Status")
    assert before["backgroundThreshold"] == 32 and before["xrayThreshold"] == 50
    e2e.kubectl("patch", "-n", NS, "sess/retuned", "--type=merge", "-p", json.dumps(
        {"spec": {"plugin": {"params": {"backgroundThreshold": 30000, "xrayThreshold": 40000}}}}))
    wait_until(lambda: all(worker_params(w) == {**before, "backgroundThreshold": 30000, "xrayThreshold": 40000}
                           for w in workers), 60, "both workers reporting the new thresholds")
    (source,) = e2e.pods("retuned", "source")
    boundary = int(metric(source, "detstream_frames_sent_total"))  # frames taken: every later frame is new
    assert e2e.status("retuned")["phase"] == "Streaming" and boundary < 256, "the scan ended before the change"
    assert any("plugin parameters pushed live to 2 worker(s)" in m for m in e2e.events("retuned"))
    assert sorted(w["metadata"]["uid"] for w in e2e.pods("retuned", "worker")) == sorted(
        w["metadata"]["uid"] for w in workers), "the workers were restarted"
    status = e2e.wait_phase("retuned", "Succeeded")
    check_accounting(status, 16, 16)
    counted = stempy.io.load_electron_counts(str(folder / "retuned-scan0000.h5"))
    events = [len(frames[0]) for frames in counted.data]
    assert sum(1 for n in events[:boundary] if n) >= 20  # counted with the first thresholds
    assert not any(events[boundary:]), f"frames {boundary}.. counted with the old thresholds"
    e2e.delete("retuned")


def test_editing_a_succeeded_session_keeps_its_results(e2e):
    # The results are in the writer's emptyDir: a rolled writer pod would take them with it.
    e2e.apply(manifest("kept", **copy.deepcopy(LIGHT)))
    e2e.wait_phase("kept", "Succeeded")
    (writer,) = e2e.pods("kept", "writer")
    path = e2e.volume(writer, "output") / "kept-scan0000.h5"
    template = e2e.get("statefulset", "kept-writer")["spec"]["template"]
    e2e.kubectl("patch", "-n", NS, "sess/kept", "--type=merge", "-p", '{"spec": {"transport": {"highWaterMark": 64}}}')

    def handled():
        ignored = [m for m in e2e.events("kept") if "a spec change has no effect" in m]
        replaced = [p for p in e2e.pods("kept", "writer") if p["metadata"]["uid"] != writer["metadata"]["uid"]]
        return ignored or replaced or not path.exists()
    wait_until(handled, 60, "the edit handled")
    assert path.exists(), "the edit deleted the results"
    assert [p["metadata"]["uid"] for p in e2e.pods("kept", "writer")] == [writer["metadata"]["uid"]]
    assert e2e.get("statefulset", "kept-writer")["spec"]["template"] == template
    session = e2e.get("sess", "kept")
    assert session["status"]["phase"] == "Succeeded"
    assert session["status"]["observedGeneration"] == session["metadata"]["generation"]  # the edit was seen
    assert tuple(stempy.io.load_electron_counts(str(path)).scan_shape) == (8, 8)
    e2e.delete("kept")


# Tomography, routed by slice: worker k owns band k of the detector rows (services/dataplane/bands.py).
TOMO_CORRELATION = 0.8   # the example's volume with the phantom (test_tomo_session: 0.88 for 64x64, 90 angles)


def volume_status(acc) -> dict:
    """A volume file's /accounting attributes as status.scans[].volume gives them."""
    return {"projectionsExpected": int(acc.attrs["projections_expected"]),
            "projectionsUsed": int(acc.attrs["projections_used"]),
            "projectionsLost": int(acc.attrs["projections_lost"]),
            "slicesMissing": int(acc.attrs["slices_missing"]), "complete": bool(acc.attrs["complete"])}


def test_the_tomography_example_reconstructs_through_pods_to_a_volume(e2e):
    """`kubectl apply` of the manifest `detstream run` takes: its workers are a StatefulSet (a Deployment's pods
    would all be worker 0, owning band 0), it succeeds with every projection used, and its status says so."""
    example = ROOT / "examples" / "tomo-local.yaml"
    spec = read_manifest(example).spec
    frames, angles, size = spec.scan.cols, spec.tomography.angles, spec.detector.rows
    e2e.kubectl("apply", "-n", NS, "-f", str(example))
    e2e.wait_phase("tomo", "Streaming")
    assert sorted(p["metadata"]["name"] for p in e2e.pods("tomo", "worker")) == ["tomo-worker-0", "tomo-worker-1"]
    status = e2e.wait_phase("tomo", "Succeeded", timeout=300)
    scan = check_accounting(status, 1, frames)
    assert (scan["written"], scan["partial"], scan["lost"]) == (frames, 0, 0)
    assert scan["volume"] == {"projectionsExpected": angles, "projectionsUsed": angles, "projectionsLost": 0,
                              "slicesMissing": 0, "complete": True}
    (writer,) = e2e.pods("tomo", "writer")
    with h5py.File(e2e.volume(writer, "output") / "tomo-scan0000.h5") as f:
        acc = f["accounting"]
        assert volume_status(acc) == scan["volume"]
        assert (acc["projection_status"][()] == COMPLETE).all() and (acc["slice_angles_missing"][()] == 0).all()
        volume = f["exchange/data"][()]
    assert volume.shape == (size, size, size)
    assert np.corrcoef(volume.ravel(), ground_truth(spec).ravel())[0, 1] > TOMO_CORRELATION
    e2e.delete("tomo")


def test_a_tomography_worker_killed_mid_scan_comes_back_on_its_band_and_the_volume_names_what_it_lacks(e2e):
    """SIGKILL worker-1 mid-scan: its pod restarts the same ordinal, which owns band 1 again, takes its remaining
    blocks and gets the scan's darks and flats again from the sources; what the dead process had summed is lost with
    it. No frame is lost, the accounting closes, and the file and the status say the volume is incomplete: band 1's
    slices lack the angles the dead process had (and are astra's FBP of the others), band 0's lack none."""
    size, angles, darks, flats = 64, 90, 4, 10
    frames = darks + flats + angles
    doc = manifest("tkill", scan={"rows": 1, "cols": frames}, detector={"rows": size, "cols": size, "sectors": 1},
                   tomography={"angles": angles, "darks": darks, "flats": flats},
                   source={"kind": "tomo-simulator", "rate": 6, "tomoSimulator": {"seed": 1, "centreOffset": 1.5}},
                   workers={"replicas": 2}, plugin={"name": "tomo-fbp", "params": {"centre": (size - 1) / 2 + 1.5}},
                   output={"volumeClaim": "tkill"}, transport={"workerTimeoutS": 2.0, "endOfScanTimeoutS": 5.0})
    folder = claim(e2e, "tkill")
    e2e.apply(doc)
    e2e.wait_phase("tkill", "Streaming")
    (victim,) = [p for p in e2e.pods("tkill", "worker") if p["metadata"]["name"] == "tkill-worker-1"]
    wait_until(lambda: metric(victim, "detstream_frames_received_total") >= darks + flats + 10, 120,
               "tkill-worker-1 summing projections")
    kill_and_restart(e2e, victim)
    assert e2e.status("tkill")["phase"] == "Streaming", "the scan ended before worker-1 came back"
    status = e2e.wait_phase("tkill", "Succeeded")
    assert any("came up mid-session: tkill-worker-1 (restarted 1x)" in m for m in e2e.events("tkill"))
    scan = check_accounting(status, 1, frames)
    assert (scan["written"], scan["lost"]) == (frames, 0)
    with h5py.File(folder / "tkill-scan0000.h5") as f:
        acc = f["accounting"]
        assert scan["volume"] == volume_status(acc)
        lacking, slices = acc["slice_angles_missing"][()], acc["slice_status"][()]
        projections, data = acc["projection_status"][()], f["exchange/data"][()]
        named = int((projections != COMPLETE).sum())
    volume = scan["volume"]
    print(f"\ntomography, worker-1 killed: status volume {volume}; band 1's slices lack "
          f"{sorted(set(lacking[size // 2:]))} angles", file=sys.stderr)
    assert not volume["complete"] and volume["projectionsExpected"] == angles and volume["slicesMissing"] == 0
    assert volume["projectionsUsed"] + volume["projectionsLost"] == angles and volume["projectionsLost"] == named
    assert (slices == COMPLETE).all() and (lacking[:size // 2] == 0).all()                # band 0: whole
    assert 0 < volume["projectionsUsed"] < angles and (lacking[size // 2:] == named).all()  # band 1: named
    sinograms, theta = simulated_sinograms()                   # the same scan (seed, size, layout) as that test's
    has = projections == COMPLETE
    assert relative_rms(data[size // 2:], fbp(sinograms[size // 2:, has], theta[has])) < 1e-3
    e2e.delete("tkill")
    assert "UNACCOUNTED" not in pod_log(e2e, "tkill-writer-0")
