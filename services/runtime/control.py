"""The control plane: the StageControl gRPC service every stage serves, and its client.

The servicer only flips the stage's lifecycle and reads its counters; it never touches the
data-plane sockets, which belong to the stage's main thread. Calls in the wrong state get
FAILED_PRECONDITION, bad parameters INVALID_ARGUMENT: a caller can never crash a stage.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from detstream.services.dataplane.wire import WireError
from detstream.v1 import control_pb2, control_pb2_grpc
from detstream.v1.control_pb2 import CONFIGURED, FAILED, FINISHED, RUNNING

WATCH_INTERVAL_S = 0.5
# A stage that comes up late is found within a second: gRPC's default reconnect backoff grows to 2 minutes.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
             ("grpc.max_reconnect_backoff_ms", 1000)]


class Controlled(Protocol):
    """What the control plane calls on a stage (`runtime.stage.Stage` is one). A protocol, so that
    this module never imports the stage module that serves it (the import contracts forbid it)."""

    @property
    def state(self) -> control_pb2.StageState: ...
    @property
    def stopping(self) -> threading.Event: ...

    def configure(self, params: dict) -> None: ...
    def start(self) -> None: ...
    def drain(self) -> None: ...
    def stop(self) -> None: ...
    def status(self) -> control_pb2.StageStatus: ...
    def reject(self, exc: WireError) -> None: ...


def _refused(stage: Controlled, what: str) -> None:
    stage.reject(WireError("control", what))


class CountRefusals(grpc.ServerInterceptor):
    """Counts control calls the stage refuses (undecodable request, unknown method, bad argument,
    wrong state) as rejected messages, reason `control`."""

    def __init__(self, stage: Controlled):
        self.stage = stage

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            _refused(self.stage, f"unknown method {details.method}")
            return None
        if handler.unary_unary is None and handler.unary_stream is None:
            return handler
        stage, method = self.stage, details.method
        decode = handler.request_deserializer

        def deserializer(data):
            try:
                return decode(data)
            except Exception:
                _refused(stage, f"undecodable request to {method}")
                raise

        def counted(behaviour):
            def call(request, context):
                try:
                    return behaviour(request, context)
                except Exception:
                    if context.code() is not None:  # aborted with a status code: a refused call
                        _refused(stage, f"{method}: {context.code().name}")
                    raise
            return call

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(counted(handler.unary_unary), deserializer,
                                                       handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(handler.unary_stream, deserializer, handler.response_serializer)


class StageControlServicer(control_pb2_grpc.StageControlServicer):
    def __init__(self, stage: Controlled):
        self.stage = stage

    def Configure(self, request, context):
        try:
            params = json.loads(request.plugin_params_json or "{}")
            if not isinstance(params, dict):
                raise ValueError("plugin parameters must be a JSON object")
            self.stage.configure(params)
        except (ValueError, TypeError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self.stage.status()

    def Start(self, request, context):
        if self.stage.state not in (CONFIGURED, RUNNING):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"cannot start a stage that is {control_pb2.StageState.Name(self.stage.state)}")
        self.stage.start()
        return self.stage.status()

    def Drain(self, request, context):
        if self.stage.state in (FAILED,):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the stage has failed")
        self.stage.drain()
        return self.stage.status()

    def Stop(self, request, context):
        self.stage.stop()
        return self.stage.status()

    def Status(self, request, context):
        return self.stage.status()

    def WatchStatus(self, request, context) -> Iterator[control_pb2.StageStatus]:
        while context.is_active():
            status = self.stage.status()
            yield status
            if status.state in (FINISHED, FAILED) and self.stage.stopping.is_set():
                return
            time.sleep(WATCH_INTERVAL_S)


def serve(stage: Controlled, host: str, port: int, credentials: grpc.ServerCredentials | None = None
          ) -> tuple[grpc.Server, health.HealthServicer]:
    """Start StageControl and grpc.health.v1 on host:port (over TLS given `credentials`); health
    starts NOT_SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="control"),
                         interceptors=[CountRefusals(stage)])
    control_pb2_grpc.add_StageControlServicer_to_server(StageControlServicer(stage), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    added = (server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None
             else server.add_insecure_port(f"{host}:{port}"))
    if added == 0:
        raise OSError(f"cannot listen for control on {host}:{port}")
    server.start()
    return server, health_servicer


class StageClient:
    """A caller of one stage's control port (the local runner and the operator use it)."""

    def __init__(self, address: str, timeout: float = 5.0, credentials: grpc.ChannelCredentials | None = None,
                 tls_name: str | None = None):
        """`tls_name`: the name the stage's certificate must carry, when it differs from the address
        (the operator calls pods by IP; their certificates name their Services)."""
        self.address = address
        self.timeout = timeout
        options = RECONNECT + ([("grpc.ssl_target_name_override", tls_name)] if tls_name else [])
        self.channel = (grpc.secure_channel(address, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(address, options=options))
        self.stub = control_pb2_grpc.StageControlStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def healthy(self) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def configure(self, params: dict) -> control_pb2.StageStatus:
        request = control_pb2.ConfigureRequest(plugin_params_json=json.dumps(params))
        return self.stub.Configure(request, timeout=self.timeout)

    def start(self) -> control_pb2.StageStatus:
        return self.stub.Start(control_pb2.StartRequest(), timeout=self.timeout)

    def drain(self) -> control_pb2.StageStatus:
        return self.stub.Drain(control_pb2.DrainRequest(), timeout=self.timeout)

    def stop(self) -> control_pb2.StageStatus:
        return self.stub.Stop(control_pb2.StopRequest(), timeout=self.timeout)

    def status(self) -> control_pb2.StageStatus:
        return self.stub.Status(control_pb2.StatusRequest(), timeout=self.timeout)

    def watch(self) -> Iterator[control_pb2.StageStatus]:
        return self.stub.WatchStatus(control_pb2.StatusRequest())

    def close(self) -> None:
        self.channel.close()
