"""The StreamingSession model: the spec a user writes, its defaults and its validation.

The same document is `kubectl apply`-ed on Kubernetes and given to `detstream run` locally;
fields that only matter on Kubernetes (image, resources, node selectors) are accepted and
ignored by the local runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detstream.services.schema import FieldError, SpecError, check_dns_label, parse, spec_field

API_GROUP = "detstream.io"
API_VERSION = "v1alpha1"
KIND = "StreamingSession"
DTYPES = ("uint8", "uint16", "uint32", "float32")


@dataclass(frozen=True)
class Detector:
    """Geometry of the detector's frames and how they leave it."""
    rows: int = spec_field(576, doc="Pixel rows of a frame.", minimum=1, maximum=65536)
    cols: int = spec_field(576, doc="Pixel columns of a frame.", minimum=1, maximum=65536)
    sectors: int = spec_field(4, doc="Column strips a frame is sent as (the 4D Camera sends 4 of 576x144); "
                                     "must divide cols.", minimum=1, maximum=64)
    dtype: str = spec_field("uint16", doc="Pixel type.", enum=DTYPES)

    @property
    def frame_bytes(self) -> int:
        import numpy as np
        return self.rows * self.cols * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Scan:
    """The scan grid: one frame per scan position."""
    rows: int = spec_field(doc="Scan positions along the slow axis.", minimum=1, maximum=65536)
    cols: int = spec_field(doc="Scan positions along the fast axis.", minimum=1, maximum=65536)
    count: int = spec_field(1, doc="Scans in the session, streamed back to back.", minimum=1, maximum=100000)

    @property
    def frames(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class Simulator:
    """The 4D Camera simulator: sparse electron events on noise, with a known ground truth."""
    seed: int = spec_field(0, doc="Random seed; the same seed gives the same frames and dark reference.",
                           minimum=0)
    electrons_per_frame: float = spec_field(40.0, doc="Mean electron events per frame.", minimum=0)
    noise_sigma: float = spec_field(3.0, doc="Gaussian read-noise sigma (counts).", minimum=0)
    electron_signal: float = spec_field(21.0, doc="Mean counts an electron event deposits (stempy's defaults "
                                                    "count events between 4 and 10 noise sigma).", minimum=1)
    xray_probability: float = spec_field(0.05, doc="Chance per frame of an X-ray hit (a very bright pixel).",
                                         minimum=0, maximum=1)
    dark_level: float = spec_field(100.0, doc="Mean dark-reference level (counts).", minimum=0)
    pedestal: float = spec_field(20.0, doc="Counts every pixel sits above its dark reference, as on a real "
                                           "detector (stempy's threshold fit needs frames above the dark).",
                                 minimum=0)


@dataclass(frozen=True)
class Source:
    """Where frames come from."""
    kind: str = spec_field("simulator", doc="simulator: the built-in 4D Camera simulator; replay: frames "
                                            "from a .npy file or an HDF5 dataset; external: detector-side "
                                            "senders connect in (`detstream stage source --connect`).",
                           enum=("simulator", "replay", "external"))
    replicas: int = spec_field(1, doc="Source processes; sectors are split among them as the 4D Camera "
                                      "splits them among its receivers.", minimum=1, maximum=64)
    rate: float = spec_field(0.0, doc="Frames per second per scan; 0 sends as fast as the pipeline takes them.",
                             minimum=0)
    path: str = spec_field("", doc="replay: a .npy file or an HDF5 file of shape (frames, rows, cols).")
    dataset: str = spec_field("", doc="replay from HDF5: the dataset's path inside the file.")
    simulator: Simulator = spec_field(default_factory=Simulator, doc="Simulator settings.")


@dataclass(frozen=True)
class Plugin:
    """The processing each worker applies to every frame."""
    name: str = spec_field("electron-counting", doc="A plugin registered under the `detstream.plugins` "
                                                    "entry point (shipped: electron-counting, noop).")
    params: dict = spec_field(default_factory=dict, doc="The plugin's parameters; changed live on "
                                                        "running workers.", free_form=True)


@dataclass(frozen=True)
class Workers:
    """The shared pool of workers."""
    replicas: int = spec_field(2, doc="Worker processes (pods); `kubectl scale` changes it.", minimum=0,
                               maximum=4096)
    credits: int = spec_field(4, doc="Frames a worker may hold from each distributor at once.", minimum=1,
                              maximum=1024)


@dataclass(frozen=True)
class Output:
    """Where reduced results go."""
    path: str = spec_field("", doc="Folder for results; locally relative to `--output`, on Kubernetes "
                                   "inside the writer's volume.")
    volume_claim: str = spec_field("", doc="Kubernetes: a PersistentVolumeClaim mounted at the output "
                                           "folder (empty: an emptyDir).")


@dataclass(frozen=True)
class Transport:
    """Data-plane limits: every queue is bounded, every wait is timed."""
    high_water_mark: int = spec_field(16, doc="Messages a ZeroMQ socket queues per peer before the sender "
                                              "blocks (backpressure).", minimum=1, maximum=100000)
    frame_timeout_s: float = spec_field(5.0, doc="Seconds the aggregator waits for a frame's missing "
                                                 "sectors before passing it on zero-filled and partial.",
                                        minimum=0.01)
    heartbeat_s: float = spec_field(0.5, doc="Seconds between heartbeats of an idle worker.", minimum=0.01)
    worker_timeout_s: float = spec_field(5.0, doc="Seconds of silence after which a worker is declared dead "
                                                  "and its frames are sent to others.", minimum=0.05)
    end_of_scan_timeout_s: float = spec_field(30.0, doc="Seconds without input after which an unfinished "
                                                        "scan is closed and its missing frames reported "
                                                        "lost.", minimum=0.1)
    startup_timeout_s: float = spec_field(60.0, doc="Seconds for every stage to become healthy: past them "
                                                    "`detstream run` fails, the operator reports it (StagesReady "
                                                    "reason StartupTimeout).", minimum=1)
    on_full: str = spec_field("block", doc="What a source does when the pipeline cannot take a frame now: block "
                                           "(wait; backpressure, nothing is dropped) or drop (drop the frame, "
                                           "as a detector that cannot wait must; every drop is counted and "
                                           "the frame reported lost or partial).", enum=("block", "drop"))
    on_loss: str = spec_field("continue", doc="When a scan closes with lost or partial frames: continue (report "
                                               "them and go on with the next scan) or fail (fail the session, "
                                               "`detstream run` exits 1).", enum=("continue", "fail"))


@dataclass(frozen=True)
class Security:
    """Encryption and authentication between stages; keys and certificates are made per session."""
    data_plane: str = spec_field("plain", doc="plain, or curve: ZeroMQ CURVE encryption and authentication "
                                              "between every pair of stages (a client without the session's "
                                              "key is refused, and counted).", enum=("plain", "curve"))
    control_plane: str = spec_field("insecure", doc="insecure, or mtls: gRPC over TLS with client certificates "
                                                    "from the session's own CA (an unauthenticated caller is "
                                                    "refused).", enum=("insecure", "mtls"))


@dataclass(frozen=True)
class Kubernetes:
    """Settings used only on Kubernetes; accepted and ignored by the local runner."""
    image: str = spec_field("", doc="Container image of the stages (default: the operator's own image).")
    image_pull_policy: str = spec_field("IfNotPresent", doc="Image pull policy of the stage pods.",
                                        enum=("Always", "IfNotPresent", "Never"))
    resources: dict = spec_field(default_factory=dict, doc="Resource requests/limits per stage role "
                                                           "(source, aggregator, distributor, worker, "
                                                           "writer).", free_form=True)
    node_selector: dict = spec_field(default_factory=dict, doc="Node selector of the stage pods.",
                                     free_form=True)
    drain_grace_s: float = spec_field(60.0, doc="Seconds a deleted session may take to drain (sources stop, "
                                                "frames in flight finish, files close) before its pods go.",
                                      minimum=0)
    network_policy: bool = spec_field(True, doc="A NetworkPolicy lets only this session's own stages reach its "
                                                "data ports, the operator (pods labelled detstream.io/operator: "
                                                "\"true\", as the chart's are) its control ports, and "
                                                "monitoring their metrics ports.")
    external_source_ranges: list[str] = spec_field(default_factory=list, doc="external sources: CIDR ranges "
                                                   "of the acquisition machines allowed to reach the ingest port "
                                                   "(required with a NetworkPolicy; 0.0.0.0/0 allows any).")
    ingest_service_type: str = spec_field("ClusterIP", doc="Service type exposing the aggregators' ingest "
                                                           "port to external sources.",
                                          enum=("ClusterIP", "NodePort", "LoadBalancer"))


@dataclass(frozen=True)
class SessionSpec:
    """A streaming session: detector, scan, source, pipeline and output."""
    scan: Scan = spec_field(doc="The scan grid and number of scans.")
    detector: Detector = spec_field(default_factory=Detector, doc="Detector geometry.")
    source: Source = spec_field(default_factory=Source, doc="Where frames come from.")
    lanes: int = spec_field(1, doc="Aggregator/distributor pairs; frames are split among them by frame "
                                   "number so no single process caps the throughput.", minimum=1, maximum=64)
    workers: Workers = spec_field(default_factory=Workers, doc="The worker pool.")
    plugin: Plugin = spec_field(default_factory=Plugin, doc="Processing applied to each frame.")
    output: Output = spec_field(default_factory=Output, doc="Where results go.")
    transport: Transport = spec_field(default_factory=Transport, doc="Data-plane limits and timeouts.")
    security: Security = spec_field(default_factory=Security, doc="Encryption and authentication between stages.")
    kubernetes: Kubernetes = spec_field(default_factory=Kubernetes, doc="Kubernetes-only settings.")


@dataclass(frozen=True)
class Session:
    name: str
    namespace: str
    spec: SessionSpec
    manifest: dict = field(compare=False, repr=False)


def check_spec(spec: SessionSpec, errors: list[FieldError]) -> None:
    """Rules that span fields (the schema checks each field alone)."""
    if spec.detector.cols % spec.detector.sectors:
        errors.append(FieldError("spec.detector.sectors", f"must divide detector.cols "
                                 f"({spec.detector.cols}); got {spec.detector.sectors}"))
    if spec.source.replicas > spec.detector.sectors:
        errors.append(FieldError("spec.source.replicas", f"must be <= detector.sectors "
                                 f"({spec.detector.sectors}): each source sends whole sectors"))
    if spec.source.kind == "replay" and not spec.source.path:
        errors.append(FieldError("spec.source.path", "is required when source.kind is replay"))


def check_plugin(section: Any, errors: list[FieldError]) -> None:
    """The plugin exists and takes these parameters (checked even when other fields are wrong)."""
    from detstream.services.plugins import plugin_class

    plugin = parse(Plugin, section, "spec.plugin", [])
    if plugin is None:
        return  # the field errors are reported by the whole-spec parse
    try:
        cls = plugin_class(plugin.name)
    except LookupError as exc:
        errors.append(FieldError("spec.plugin.name", str(exc)))
        return
    errors.extend(FieldError(f"spec.plugin.params.{key}", message) for key, message in cls.check_params(plugin.params))


def load_session(manifest: Any) -> Session:
    """Validate a StreamingSession manifest; raise SpecError listing every problem."""
    errors: list[FieldError] = []
    if not isinstance(manifest, dict):
        raise SpecError([FieldError("(document)", "must be a StreamingSession mapping")])
    expected_api = f"{API_GROUP}/{API_VERSION}"
    if manifest.get("apiVersion") != expected_api:
        errors.append(FieldError("apiVersion", f"must be {expected_api}; got {manifest.get('apiVersion')!r}"))
    if manifest.get("kind") != KIND:
        errors.append(FieldError("kind", f"must be {KIND}; got {manifest.get('kind')!r}"))
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name", "") if isinstance(metadata, dict) else ""
    check_dns_label(name, "metadata.name", errors)
    if "spec" not in manifest:
        errors.append(FieldError("spec", "is required"))
    spec = parse(SessionSpec, manifest.get("spec"), "spec", errors)
    if spec is not None:
        check_spec(spec, errors)
    raw_spec = manifest.get("spec")
    check_plugin(raw_spec.get("plugin") if isinstance(raw_spec, dict) else None, errors)
    if errors:
        raise SpecError(errors)
    return Session(name=name, namespace=metadata.get("namespace", "default"), spec=spec, manifest=manifest)


def read_manifest(path: Path) -> Session:
    """Load the one StreamingSession document in a YAML file."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        raise SpecError([FieldError(str(path), f"cannot be read: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([FieldError(str(path), f"is not valid YAML: {exc}")]) from None
    sessions = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(sessions) != 1:
        raise SpecError([FieldError(str(path), f"must hold exactly one {KIND} document; "
                                               f"found {len(sessions)}")])
    return load_session(sessions[0])
