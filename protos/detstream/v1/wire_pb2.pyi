from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    RESULT: _ClassVar[Kind]
    END_OF_SCAN: _ClassVar[Kind]
    CREDIT: _ClassVar[Kind]
    HEARTBEAT: _ClassVar[Kind]
    RECEIPT: _ClassVar[Kind]
    SAMPLE: _ClassVar[Kind]
    CALIBRATION: _ClassVar[Kind]
    WANT: _ClassVar[Kind]
    ASSIGN: _ClassVar[Kind]
    BLOCK: _ClassVar[Kind]
    RELEASE: _ClassVar[Kind]
    TAKEN: _ClassVar[Kind]
    ABSENT: _ClassVar[Kind]
    PATTERN: _ClassVar[Kind]
    GONE: _ClassVar[Kind]
    VOLUME: _ClassVar[Kind]
    PREVIEW: _ClassVar[Kind]
    REFERENCE: _ClassVar[Kind]

class Flag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLAG_NONE: _ClassVar[Flag]
    PARTIAL: _ClassVar[Flag]
    DUPLICATE: _ClassVar[Flag]
    DETECTOR_END: _ClassVar[Flag]
    BLOCK_END: _ClassVar[Flag]
KIND_UNSPECIFIED: Kind
RESULT: Kind
END_OF_SCAN: Kind
CREDIT: Kind
HEARTBEAT: Kind
RECEIPT: Kind
SAMPLE: Kind
CALIBRATION: Kind
WANT: Kind
ASSIGN: Kind
BLOCK: Kind
RELEASE: Kind
TAKEN: Kind
ABSENT: Kind
PATTERN: Kind
GONE: Kind
VOLUME: Kind
PREVIEW: Kind
REFERENCE: Kind
FLAG_NONE: Flag
PARTIAL: Flag
DUPLICATE: Flag
DETECTOR_END: Flag
BLOCK_END: Flag

class Header(_message.Message):
    __slots__ = ("version", "kind", "seq", "sender", "scan", "shape", "dtype", "flags", "scan_rows", "scan_cols", "expected", "sent", "partial", "lost", "credit", "acked", "result", "block", "address", "frames", "sectors", "key", "band", "bands", "sector_masks", "part_counts")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    SCAN_ROWS_FIELD_NUMBER: _ClassVar[int]
    SCAN_COLS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SECTORS_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BAND_FIELD_NUMBER: _ClassVar[int]
    BANDS_FIELD_NUMBER: _ClassVar[int]
    SECTOR_MASKS_FIELD_NUMBER: _ClassVar[int]
    PART_COUNTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: Kind
    seq: int
    sender: str
    scan: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    flags: int
    scan_rows: int
    scan_cols: int
    expected: int
    sent: int
    partial: int
    lost: int
    credit: int
    acked: _containers.RepeatedScalarFieldContainer[int]
    result: str
    block: int
    address: str
    frames: _containers.RepeatedScalarFieldContainer[int]
    sectors: _containers.RepeatedScalarFieldContainer[int]
    key: str
    band: int
    bands: _containers.RepeatedScalarFieldContainer[int]
    sector_masks: _containers.RepeatedScalarFieldContainer[int]
    part_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., seq: _Optional[int] = ..., sender: _Optional[str] = ..., scan: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., flags: _Optional[int] = ..., scan_rows: _Optional[int] = ..., scan_cols: _Optional[int] = ..., expected: _Optional[int] = ..., sent: _Optional[int] = ..., partial: _Optional[int] = ..., lost: _Optional[int] = ..., credit: _Optional[int] = ..., acked: _Optional[_Iterable[int]] = ..., result: _Optional[str] = ..., block: _Optional[int] = ..., address: _Optional[str] = ..., frames: _Optional[_Iterable[int]] = ..., sectors: _Optional[_Iterable[int]] = ..., key: _Optional[str] = ..., band: _Optional[int] = ..., bands: _Optional[_Iterable[int]] = ..., sector_masks: _Optional[_Iterable[int]] = ..., part_counts: _Optional[_Iterable[int]] = ...) -> None: ...
