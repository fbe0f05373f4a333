"""Security of a session, locally: CURVE on every data-plane connection, mutual TLS on every control
port. Outsiders are refused and counted; the session itself streams with exact accounting."""

import os
import subprocess
import urllib.request

import grpc
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from detstream.services.dataplane.security import Keys
from detstream.services.dataplane.wire import WANT, Header, Outbox
from detstream.services.runtime.control import StageClient

from helpers import DETSTREAM, manifest, wait_for

SECURE = {"dataPlane": "curve", "controlPlane": "mtls"}
SMALL = {"rows": 64, "cols": 64, "sectors": 2}


def rejected(port, reason):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "detstream_rejected_messages_total" and s.labels.get("reason") == reason)


def want_message():
    return Header(kind=WANT, scan=0, block=0)


def test_outsiders_are_refused_and_counted_while_the_session_streams_exactly(local_session, tmp_path):
    doc = manifest("secure", scan={"rows": 8, "cols": 8}, detector=SMALL, source={"kind": "external"},
                   plugin={"name": "noop"}, security=SECURE)
    local = local_session(doc)
    keys = Keys(local.run_dir / "keys")
    lane = local.plan.stage("distributor", 0)
    ingest = local.plan.endpoint("distributor", 0, "route")
    ctx = zmq.Context()
    try:
        outsiders = []
        plain = ctx.socket(zmq.DEALER)                     # no CURVE at all
        stranger = ctx.socket(zmq.DEALER)                  # CURVE, knows the server key, but not a session key
        stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
        stranger.curve_serverkey = keys.curve_public("distributor-0")
        intruder = ctx.socket(zmq.DEALER)                  # a session key, of a role that never sends here
        keys.curve_client(intruder, "worker-0", "distributor-0")
        for sock in (plain, stranger, intruder):
            sock.linger = 0
            sock.connect(ingest)
            outsiders.append(Outbox(sock, "outsider"))
            try:
                sock.send(want_message().SerializeToString(), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # never connected: that is the point
        wait_for(lambda: rejected(lane.ports["metrics"], "auth") >= 3)

        # the session's own detector-side sender, with the `external` key, streams the scan
        path = tmp_path / "secure.yaml"
        import yaml
        path.write_text(yaml.safe_dump(doc))
        env = dict(os.environ, DETSTREAM_KEYS=str(local.run_dir / "keys"))
        sender = subprocess.run(DETSTREAM + ["stage", "source", "--manifest", str(path), "--connect", ingest],
                                env=env, capture_output=True, text=True, timeout=60)
        assert sender.returncode == 0, sender.stderr
        wait_for(lambda: local.finished())
        (account,) = local.writer().client.status().scans
        assert (account.expected, account.written, account.lost, account.partial) == (64, 64, 0, 0)
        assert local.writer().client.status().frames_in == 64   # nothing of the outsiders got in
        assert rejected(lane.ports["metrics"], "auth") >= 3
    finally:
        ctx.destroy(linger=0)


def test_the_control_plane_refuses_callers_without_a_session_certificate(local_session):
    doc = manifest("mtls", scan={"rows": 4, "cols": 4}, detector=SMALL, source={"rate": 2},
                   plugin={"name": "noop"}, security=SECURE)
    local = local_session(doc)
    keys = Keys(local.run_dir / "keys")
    for p in local.stages:
        address = f"127.0.0.1:{p.stage.ports['control']}"
        with grpc.insecure_channel(address) as channel:           # plain HTTP/2: the TLS server hangs up
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        server_only = grpc.ssl_channel_credentials(root_certificates=(keys.folder / "tls" / "ca.crt").read_bytes())
        anonymous = StageClient(address, timeout=3, credentials=server_only)  # TLS, but no client certificate
        with pytest.raises(grpc.RpcError) as err:
            anonymous.stop()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        anonymous.close()
        assert local.client(p.stage).status().state in (2, 4), p.stage.name  # the launcher's certificate works
    assert all(p.proc.poll() is None for p in local.stages)  # nobody was stopped by the anonymous calls


def test_a_curve_session_through_detstream_run_accounts_for_every_frame(tmp_path, write_manifest):
    doc = manifest("curverun", scan={"rows": 12, "cols": 12}, lanes=2, detector=SMALL,
                   source={"replicas": 2}, plugin={"name": "noop"}, security=SECURE)
    result = subprocess.run(DETSTREAM + ["run", str(write_manifest(doc)), "--output", str(tmp_path / "out"),
                                         "--report", str(tmp_path / "report.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import json
    (scan,) = json.loads((tmp_path / "report.json").read_text())["scans"]
    assert (scan["written"], scan["lost"], scan["unaccounted"]) == (144, 0, 0)
    secrets = tmp_path / "out" / ".detstream" / "curverun" / "keys"
    assert (secrets.stat().st_mode & 0o777) == 0o700
    assert ((secrets / "tls" / "ca.key").stat().st_mode & 0o777) == 0o600
