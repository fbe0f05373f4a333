"""The StreamingSession model: the spec a user writes, its defaults and its validation.

The same document is `kubectl apply`-ed on Kubernetes and given to `detstream run` locally;
fields that only matter on Kubernetes (image, resources, node selectors) are accepted and
ignored by the local runner.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detstream.services.model.schema import (
    DNS_1035_LABEL,
    DNS_1123_SUBDOMAIN,
    LABEL_VALUE,
    FieldError,
    SpecError,
    did_you_mean,
    is_label_key,
    parse,
    spec_field,
)

API_GROUP = "detstream.io"
API_VERSION = "v1alpha1"
KIND = "StreamingSession"
DTYPES = ("uint8", "uint16", "uint32", "float32")
TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")


def _sources():
    """The registry of source kinds (imported when needed: the model sits below the sources)."""
    from detstream.services import sources
    return sources


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
    distinct_frames: int = spec_field(64, doc="Distinct frames the simulator renders when it starts, events included; "
                                              "frames then repeat with this period, so that making one costs no "
                                              "CPU while streaming. Each source replica holds its sectors of them "
                                              "(576x576 uint16: 0.66 MB a frame; at most 512 MiB).",
                                      minimum=1, maximum=65536)


@dataclass(frozen=True)
class TomoSimulator:
    """The tomography simulator: parallel-beam projections of a 3D phantom with flat and dark fields."""
    seed: int = spec_field(0, doc="Random seed of the phantom's small features and of the noise; the same seed "
                                  "gives the same frames and ground truth.", minimum=0)
    photons: float = spec_field(10000.0, doc="Mean counts of an open-beam (flat) pixel above the dark; Poisson "
                                             "noise follows from it.", minimum=1)
    dark_level: float = spec_field(100.0, doc="Mean dark-field level (counts).", minimum=0)
    max_absorption: float = spec_field(2.0, doc="Largest line integral through the phantom (-log of the "
                                                "lowest transmission).", minimum=0.001, maximum=20)
    centre_offset: float = spec_field(0.0, doc="Rotation axis minus the detector's centre column, (cols-1)/2 "
                                               "(pixels).", minimum=-1000, maximum=1000)


@dataclass(frozen=True)
class Dectris:
    """A DECTRIS detector control unit (DCU) serving SIMPLON stream v2: every source replica connects to it."""
    address: str = spec_field("", doc="dectris: the DCU's stream v2 address, tcp://HOST:PORT (a DCU serves it on "
                                      "port 31001); every source replica connects to it and gets some of the images.")
    channel: str = spec_field("", doc="dectris: the image channel (threshold) the plugin sees, e.g. threshold_1 "
                                      "(empty: each image's first).")
    scans: str = spec_field("arrival", enum=("arrival", "seriesId"),
                            doc="dectris: how series map to scans: arrival (the first series a source hears of is "
                                "scan 0, each new one the next; with several replicas each must hear of every "
                                "series) or seriesId (scan = series_id - firstSeriesId).")
    first_series_id: int = spec_field(1, doc="dectris, scans seriesId: the series_id that is scan 0.", minimum=0)


@dataclass(frozen=True)
class Source:
    """Where frames come from."""
    kind: str = spec_field("simulator", doc=lambda: _sources().kinds_doc(), enum=lambda: _sources().source_kinds())
    replicas: int = spec_field(1, doc="Source processes; sectors are split among them as the 4D Camera "
                                      "splits them among its receivers (dectris: each connects to the DCU and "
                                      "gets some of the images, whole).", minimum=1, maximum=64)
    rate: float = spec_field(0.0, doc="Frames per second per scan; 0 sends as fast as the pipeline takes them.",
                             minimum=0)
    path: str = spec_field("", doc="replay: a .npy file or an HDF5 file of shape (frames, rows, cols).")
    dataset: str = spec_field("", doc="replay from HDF5: the dataset's path inside the file.")
    simulator: Simulator = spec_field(default_factory=Simulator, doc="Simulator settings.")
    tomo_simulator: TomoSimulator | None = spec_field(None, doc="tomo-simulator settings (defaults when absent).")
    dectris: Dectris = spec_field(default_factory=Dectris, doc="DECTRIS detector settings (kind dectris).")


@dataclass(frozen=True)
class Plugin:
    """The processing each worker applies to every frame."""
    name: str = spec_field("electron-counting", doc="A plugin registered under the `detstream.plugins` "
                                                    "entry point (shipped: electron-counting and noop for 4D-STEM, "
                                                    "tomo-fbp and noop for tomography).")
    params: dict = spec_field(default_factory=dict, doc="The plugin's parameters; changed live on "
                                                        "running workers.", free_form=True)


@dataclass(frozen=True)
class Tomography:
    """A tomography scan: its positions are its frames in the order they are taken, darks first, then flats,
    then the projections at angle i * arc / angles (i = 0 .. angles-1), then the flats after."""
    angles: int = spec_field(doc="Projections per scan, equally spaced over arcDegrees.", minimum=1,
                             maximum=1000000)
    arc_degrees: float = spec_field(180.0, doc="The rotation the projections cover (180 or 360).", minimum=1,
                                    maximum=360)
    darks: int = spec_field(10, doc="Dark fields (no beam) before the flats.", minimum=0, maximum=10000)
    flats: int = spec_field(10, doc="Flat fields (beam, no sample) before the projections.", minimum=0,
                            maximum=10000)
    flats_after: int = spec_field(0, doc="Flat fields after the projections (to see the beam drift).", minimum=0,
                                  maximum=10000)

    @property
    def frames(self) -> int:
        """Frames (scan positions) of one scan: darks, flats, projections, flats after."""
        return self.darks + self.flats + self.angles + self.flats_after

    def role(self, frame: int) -> tuple[str, int]:
        """What frame number `frame` of a scan is: ("dark" | "flat" | "projection" | "flat-after", index
        among those); ValueError past the scan's frames."""
        for name, count in (("dark", self.darks), ("flat", self.flats), ("projection", self.angles),
                            ("flat-after", self.flats_after)):
            if 0 <= frame < count:
                return name, frame
            frame -= count
        raise ValueError(f"frame beyond the tomography scan's {self.frames} frames")

    @property
    def first_projection(self) -> int:
        """The frame number of projection 0."""
        return self.darks + self.flats

    def angles_deg(self):
        """The projections' rotation angles in degrees, float64 (angles,)."""
        import numpy as np
        return np.arange(self.angles) * (self.arc_degrees / self.angles)


@dataclass(frozen=True)
class Workers:
    """The shared pool of workers."""
    replicas: int = spec_field(2, doc="Worker processes (pods); `kubectl scale` changes it.", minimum=0,
                               maximum=4096)
    credits: int = spec_field(64, doc="Frames a worker may hold from each lane at once (at least "
                                      "transport.blockFrames: a lane routes whole blocks).", minimum=1,
                              maximum=65536)


@dataclass(frozen=True)
class Output:
    """Where reduced results go."""
    path: str = spec_field("", doc="Folder for results; locally relative to `--output`, on Kubernetes "
                                   "inside the writer's volume.")
    volume_claim: str = spec_field("", doc="Kubernetes: a PersistentVolumeClaim mounted at the output "
                                           "folder (empty: an emptyDir).")
    keep_frames: bool = spec_field(False, doc="With a plugin whose results are the frames (noop): write them, one "
                                              "HDF5 file per scan compressed with bitshuffle-LZ4, with the same "
                                              "accounting as every scan file (false: counted, not kept).")


@dataclass(frozen=True)
class Transport:
    """Data-plane limits: every queue is bounded, every wait is timed."""
    high_water_mark: int = spec_field(16, doc="Messages a ZeroMQ socket queues per peer before the sender "
                                              "blocks (backpressure).", minimum=1, maximum=100000)
    frame_timeout_s: float = spec_field(5.0, doc="Seconds a worker waits for a frame's missing sectors "
                                                 "before processing it zero-filled and partial (and for a "
                                                 "silent source to end a block).", minimum=0.01)
    block_frames: int = spec_field(16, doc="Frames per block: a lane routes a block to one worker, and each source "
                                           "sends its sectors of a block in one message (docs/full-rate.md).",
                                   minimum=1, maximum=4096)
    block_timeout_s: float = spec_field(0.05, doc="Seconds after which a source sends what it has of a block "
                                                  "that is still filling (low rates: bounded latency).",
                                        minimum=0.001)
    source_window_frames: int = spec_field(256, doc="Frames a source replica keeps until the writer has their "
                                                    "results (so a dead worker's frames can be sent again); "
                                                    "past it the source waits (backpressure). Memory: this "
                                                    "times the replica's share of a frame.",
                                           minimum=1, maximum=1 << 20)
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


MAX_LIVE_SLICES = 16  # slices a tomography session's live view shows (each is sent every PREVIEW_S)


@dataclass(frozen=True)
class LiveView:
    """Live results, served on a read-only web page: for 4D-STEM virtual images, centre of mass, iDPC and
    diffraction patterns made by the writer as results arrive (and written into each scan's file); for
    tomography chosen slices forming as the projections arrive."""
    enabled: bool = spec_field(True, doc="Serve the live view (the writer's `live` port; `detstream run` prints "
                                         "its URL) and, for 4D-STEM, write each scan's STEM images into its file "
                                         "(`stem/`).")
    geometry: dict = spec_field(default_factory=dict, free_form=True,
                                doc="Virtual detectors, in pixels: {bright_field: r, annuli: [[inner, outer], ...], "
                                    "centre: [x, y]} (empty: a bright field of 1/8 of the frame, an annulus from "
                                    "1/8 to 1/4, at the frame centre); the page changes it for the view.")
    keep_mib: int = spec_field(256, doc="MiB of events per scan kept so that a new geometry recomputes the "
                                        "whole scan (1024x1024 positions at 40 events each need 168); past it "
                                        "the images go on, recomputing is refused. Open scans and the last "
                                        "closed one keep theirs.", minimum=0, maximum=1 << 20)
    slices: list[int] = spec_field(default_factory=list, doc="Tomography: the slices (detector rows, 0 at the top) "
                                   "the page shows forming as the projections arrive, at most 16 (empty: the "
                                   "middle one). Each costs its worker a slice's copy (cols x cols float32) to the "
                                   "writer every 0.5 s while projections come.")


@dataclass(frozen=True)
class Security:
    """Encryption and authentication between stages; keys and certificates are made per session."""
    data_plane: str = spec_field("plain", doc="plain, or curve: ZeroMQ CURVE encryption and authentication "
                                              "between every pair of stages (a client without the session's "
                                              "key is refused, and counted).", enum=("plain", "curve"))
    control_plane: str = spec_field("insecure", doc="insecure, or mtls: gRPC over TLS with client certificates "
                                                    "from the session's own CA (an unauthenticated caller is "
                                                    "refused).", enum=("insecure", "mtls"))


def requests(cpu: str, memory: str, memory_limit: str) -> Any:
    """A role's default resources: CPU and memory requests (what the scheduler and a namespace's
    ResourceQuota count) and a memory limit; no CPU limit, which would throttle a streaming stage."""
    return lambda: {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory_limit}}


@dataclass(frozen=True)
class Resources:
    """Resource requests and limits of the stage pods, per role; a role given here replaces that
    role's default whole."""
    source: dict = spec_field(default_factory=requests("500m", "512Mi", "2Gi"), free_form=True,
                              doc="Of each source pod (a detector client, simulator or replay; keeps its window "
                                  "of frames, transport.sourceWindowFrames).")
    distributor: dict = spec_field(default_factory=requests("250m", "256Mi", "1Gi"), free_form=True,
                                   doc="Of each distributor pod (routes its lane's blocks; no pixel data).")
    worker: dict = spec_field(default_factory=requests("1", "512Mi", "2Gi"), free_form=True,
                              doc="Of each worker pod (runs the plugin on its frames).")
    writer: dict = spec_field(default_factory=requests("250m", "512Mi", "2Gi"), free_form=True,
                              doc="Of the writer pod (holds each open scan until its file closes).")


@dataclass(frozen=True)
class Kubernetes:
    """Settings used only on Kubernetes; accepted and ignored by the local runner."""
    image: str = spec_field("", doc="Container image of the stages (default: the operator's own image).")
    image_pull_policy: str = spec_field("IfNotPresent", doc="Image pull policy of the stage pods.",
                                        enum=("Always", "IfNotPresent", "Never"))
    resources: Resources = spec_field(default_factory=Resources, doc="Resource requests/limits of the stage "
                                                                     "pods, per role.")
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
                                                   "of the acquisition machines allowed to reach the distributors' "
                                                   "route ports and the workers' data ports (required with a "
                                                   "NetworkPolicy; 0.0.0.0/0 allows any).")
    ingest_service_type: str = spec_field("ClusterIP", doc="Service type exposing the distributors' route "
                                                           "ports to external sources (which also send to the "
                                                           "workers' pod addresses: see README).",
                                          enum=("ClusterIP", "NodePort", "LoadBalancer"))


@dataclass(frozen=True)
class SessionSpec:
    """A streaming session: detector, scan, source, pipeline and output."""
    scan: Scan = spec_field(doc="The scan grid and number of scans.")
    detector: Detector = spec_field(default_factory=Detector, doc="Detector geometry.")
    source: Source = spec_field(default_factory=Source, doc="Where frames come from.")
    lanes: int = spec_field(1, doc="Distributors routing the session's blocks of frames (block b to lane "
                                   "b % lanes), so no single process caps the throughput.", minimum=1, maximum=64)
    workers: Workers = spec_field(default_factory=Workers, doc="The worker pool.")
    plugin: Plugin = spec_field(default_factory=Plugin, doc="Processing applied to each frame.")
    tomography: Tomography | None = spec_field(None, doc="A tomography scan (absent for 4D-STEM): what its "
                                                         "frames are.")
    output: Output = spec_field(default_factory=Output, doc="Where results go.")
    transport: Transport = spec_field(default_factory=Transport, doc="Data-plane limits and timeouts.")
    security: Security = spec_field(default_factory=Security, doc="Encryption and authentication between stages.")
    live_view: LiveView = spec_field(default_factory=LiveView, doc="Live results and their web page.")
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
    if spec.source.replicas > spec.detector.sectors and not _sources().source_class(spec.source.kind).series:
        errors.append(FieldError("spec.source.replicas", f"must be <= detector.sectors "
                                 f"({spec.detector.sectors}): each source sends whole sectors"))
    if spec.workers.credits < spec.transport.block_frames:
        errors.append(FieldError("spec.workers.credits", f"must be >= transport.blockFrames "
                                 f"({spec.transport.block_frames}): a lane routes whole blocks; got "
                                 f"{spec.workers.credits} (raise it, or lower blockFrames)"))
    tomo = spec.tomography
    if tomo is not None and spec.scan.frames != tomo.frames:
        errors.append(FieldError("spec.scan", f"a tomography scan's positions are its {tomo.frames} frames "
                                 f"(darks + flats + angles + flatsAfter): write scan: {{rows: 1, cols: "
                                 f"{tomo.frames}}}; got {spec.scan.rows}x{spec.scan.cols}"))
    errors.extend(_sources().source_class(spec.source.kind).check(spec))  # the kind's own settings
    errors.extend(check_live_geometry(spec))
    errors.extend(check_live_slices(spec))


def check_live_slices(spec: SessionSpec) -> list[FieldError]:
    """spec.liveView.slices are distinct slices of the tomography scan's volume, at most MAX_LIVE_SLICES."""
    slices, rows = spec.live_view.slices, spec.detector.rows
    problem = None
    if slices and spec.tomography is None:
        problem = "only a tomography session (spec.tomography) shows slices; remove it"
    elif len(slices) > MAX_LIVE_SLICES or len(set(slices)) != len(slices):
        problem = f"at most {MAX_LIVE_SLICES} distinct slice numbers; got {slices}"
    elif any(not 0 <= s < rows for s in slices):
        problem = (f"slice numbers are detector rows, from 0 to {rows - 1} (detector.rows - 1); got "
                   f"{[s for s in slices if not 0 <= s < rows]}")
    return [FieldError("spec.liveView.slices", problem)] if problem else []


def check_live_geometry(spec: SessionSpec) -> list[FieldError]:
    """spec.liveView.geometry is a detector geometry that fits the frames."""
    from detstream.services.results.geometry import GeometryError, live_geometry
    try:
        live_geometry(spec.live_view.geometry, (spec.detector.rows, spec.detector.cols))
    except GeometryError as exc:
        return [FieldError("spec.liveView.geometry", str(exc))]
    return []


# The longest object name made from a session's name is its StatefulSet `NAME-distributor`, whose pods carry the
# label controller-revision-hash=NAME-distributor-HASH (HASH up to 10 characters), at most 63 characters.
NAME_MAX = 63 - len("-distributor-") - 10


def check_name(name: Any, errors: list[FieldError]) -> None:
    """metadata.name names Services (`NAME-ROLE-INDEX`, DNS-1035 labels) and the pods' labels."""
    if not isinstance(name, str) or not DNS_1035_LABEL.fullmatch(name) or len(name) > NAME_MAX:
        errors.append(FieldError("metadata.name", f"must start with a letter, hold only lower-case letters, digits "
                                 f"and '-', end with a letter or digit and have at most {NAME_MAX} characters (it "
                                 f"names the session's Kubernetes Services, e.g. NAME-distributor-0); got {name!r}"))


def check_kubernetes(spec: SessionSpec, errors: list[FieldError]) -> None:
    """The strings the operator puts into Kubernetes objects are ones the API server takes."""
    k8s = spec.kubernetes
    for key, value in k8s.node_selector.items():
        if not isinstance(key, str) or not is_label_key(key):
            errors.append(FieldError(f"spec.kubernetes.nodeSelector.{key}", "must be a label key: [prefix/]name, "
                                     "the name of 1 to 63 letters, digits, '-', '_', '.'"))
        elif not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            errors.append(FieldError(f"spec.kubernetes.nodeSelector.{key}", f"must be a label value: a string of "
                                     f"at most 63 letters, digits, '-', '_', '.' (quote numbers); got {value!r}"))
    claim = spec.output.volume_claim
    if claim and (len(claim) > 253 or not DNS_1123_SUBDOMAIN.fullmatch(claim)):
        errors.append(FieldError("spec.output.volumeClaim", f"must be a PersistentVolumeClaim's name (lower-case "
                                 f"letters, digits, '-', '.', at most 253 characters); got {claim!r}"))
    for cidr in k8s.external_source_ranges:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            errors.append(FieldError("spec.kubernetes.externalSourceRanges", f"must be CIDR ranges such as "
                                     f"192.0.2.0/24; got {cidr!r}"))


def check_plugin(section: Any, spec: SessionSpec | None, errors: list[FieldError]) -> None:
    """The plugin exists and takes these parameters (checked even when other fields are wrong: `spec` None), and,
    given the spec, handles its pixel type, returns frames if they are to be kept, and has the tomography scan it
    reconstructs slice by slice."""
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
    if spec is None:
        return
    if spec.output.keep_frames and cls.result != "frames":
        errors.append(FieldError("spec.output.keepFrames", f"{plugin.name}'s results are {cls.result}, not frames: "
                                 f"keepFrames keeps the frames a plugin passes on as they came (noop)"))
    if spec.detector.dtype not in cls.dtypes:
        errors.append(FieldError("spec.detector.dtype", f"{plugin.name} handles {', '.join(cls.dtypes)} frames; got "
                                 f"{spec.detector.dtype}: convert the frames, or use another plugin"))
    if cls.by_slice and spec.tomography is None and not any(e.path == "spec.tomography" for e in errors):
        # (a tomography source said so already: one line for the field is enough)
        errors.append(FieldError("spec.tomography", f"{plugin.name} reconstructs a tomography scan slice by slice: "
                                 f"add spec.tomography (angles, arcDegrees, darks, flats)"))
    if spec.tomography is not None and cls.result == "events":
        errors.append(FieldError("spec.plugin.name", f"{plugin.name}'s results are electron events (it counts "
                                 f"4D-STEM frames), not of a tomography scan (spec.tomography): name tomo-fbp to "
                                 f"reconstruct the volume, or noop to pass the frames through"))


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
    for key in manifest:
        if key not in TOP_LEVEL:
            errors.append(FieldError(str(key), f"unknown field{did_you_mean(key, TOP_LEVEL)}; allowed: "
                                               f"{', '.join(TOP_LEVEL)}"))
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name", "") if isinstance(metadata, dict) else ""
    check_name(name, errors)
    if "spec" not in manifest:
        errors.append(FieldError("spec", "is required"))
    spec = parse(SessionSpec, manifest["spec"], "spec", errors) if "spec" in manifest else None
    if spec is not None:
        check_spec(spec, errors)
        check_kubernetes(spec, errors)
    raw_spec = manifest.get("spec")
    check_plugin(raw_spec.get("plugin") if isinstance(raw_spec, dict) else None, spec, errors)
    if errors:
        raise SpecError(errors)
    assert spec is not None  # a missing or unparsable spec is in `errors`
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
