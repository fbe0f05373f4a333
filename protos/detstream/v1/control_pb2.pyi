from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[StageState]
    CONFIGURED: _ClassVar[StageState]
    RUNNING: _ClassVar[StageState]
    DRAINING: _ClassVar[StageState]
    FINISHED: _ClassVar[StageState]
    FAILED: _ClassVar[StageState]
STATE_UNSPECIFIED: StageState
CONFIGURED: StageState
RUNNING: StageState
DRAINING: StageState
FINISHED: StageState
FAILED: StageState

class ConfigureRequest(_message.Message):
    __slots__ = ("plugin_params_json",)
    PLUGIN_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    plugin_params_json: str
    def __init__(self, plugin_params_json: _Optional[str] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScanAccount(_message.Message):
    __slots__ = ("scan", "expected", "written", "partial", "lost", "duplicates", "complete", "file", "volume")
    SCAN_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    scan: int
    expected: int
    written: int
    partial: int
    lost: int
    duplicates: int
    complete: bool
    file: str
    volume: ScanVolume
    def __init__(self, scan: _Optional[int] = ..., expected: _Optional[int] = ..., written: _Optional[int] = ..., partial: _Optional[int] = ..., lost: _Optional[int] = ..., duplicates: _Optional[int] = ..., complete: _Optional[bool] = ..., file: _Optional[str] = ..., volume: _Optional[_Union[ScanVolume, _Mapping]] = ...) -> None: ...

class ScanVolume(_message.Message):
    __slots__ = ("projections_expected", "projections_used", "projections_lost", "slices_missing", "complete")
    PROJECTIONS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_USED_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_LOST_FIELD_NUMBER: _ClassVar[int]
    SLICES_MISSING_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    projections_expected: int
    projections_used: int
    projections_lost: int
    slices_missing: int
    complete: bool
    def __init__(self, projections_expected: _Optional[int] = ..., projections_used: _Optional[int] = ..., projections_lost: _Optional[int] = ..., slices_missing: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("stage", "replica", "state", "message", "frames_in", "frames_out", "bytes_in", "bytes_out", "in_flight", "rejected", "scans", "scans_total", "elapsed_s", "dropped", "plugin_params_json", "scans_closed", "closed_total", "scans_unaccounted")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    SCANS_FIELD_NUMBER: _ClassVar[int]
    SCANS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    SCANS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SCANS_UNACCOUNTED_FIELD_NUMBER: _ClassVar[int]
    stage: str
    replica: int
    state: StageState
    message: str
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    in_flight: int
    rejected: int
    scans: _containers.RepeatedCompositeFieldContainer[ScanAccount]
    scans_total: int
    elapsed_s: float
    dropped: int
    plugin_params_json: str
    scans_closed: int
    closed_total: ScanAccount
    scans_unaccounted: int
    def __init__(self, stage: _Optional[str] = ..., replica: _Optional[int] = ..., state: _Optional[_Union[StageState, str]] = ..., message: _Optional[str] = ..., frames_in: _Optional[int] = ..., frames_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., in_flight: _Optional[int] = ..., rejected: _Optional[int] = ..., scans: _Optional[_Iterable[_Union[ScanAccount, _Mapping]]] = ..., scans_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., dropped: _Optional[int] = ..., plugin_params_json: _Optional[str] = ..., scans_closed: _Optional[int] = ..., closed_total: _Optional[_Union[ScanAccount, _Mapping]] = ..., scans_unaccounted: _Optional[int] = ...) -> None: ...
