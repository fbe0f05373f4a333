"""DECTRIS SIMPLON stream v2 messages: one ZeroMQ message (one CBOR item) <-> Start, Image or End.

The format is DECTRIS' public documentation (github.com/dectris/documentation): stream_v2/README.md
(message fields and the data model) and cbor/dectris-compression-tag.md (tag 56500). Arrays are
RFC 8746 typed arrays (tags 64-86) inside multi-dimensional arrays (tag 40, row-major; 1040,
column-major); any byte string may be replaced by tag 56500 ["bslz4" | "lz4", modifier, bytes], the
HDF5-filter framing of bitshuffle+LZ4 (bitshuffle's filter) or LZ4 (H5Z-LZ4): each block is decompressed
by python-lz4's bounds-checked LZ4 (bitshuffle's own decompressor trusts the stream, LZ4_decompress_fast,
which a hostile message could make read past its end) and the bslz4 blocks unshuffled by bitshuffle.

decode() never trusts a size from the wire: an array's pixel count is capped (`max_pixels`, or the
start message's image size when given) and a compressed stream's declared size must equal the
array's before anything is decompressed. Every refusal is one Stream2Error whose `reason` (one of
REJECT_REASONS) labels the counters.

The encoding half (start_message, image_message, end_message, pixels, compress, encode) serves
`detstream dcu` and the tests; it writes what a DCU writes (little-endian typed arrays, tag 55799).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import bitshuffle
import cbor2
import lz4.block
import numpy as np

REJECT_REASONS = (
    "cbor",         # not one well-formed CBOR item (or bytes after it)
    "not-map",      # the item is not a map of text keys
    "type",         # `type` is missing or not start / image / end
    "field",        # a field is missing or of the wrong type, or a channel the start did not name
    "size",         # sizes disagree (array dimensions, payload, compressed header, start) or exceed the cap
    "compression",  # an unknown algorithm or a compressed stream that does not decompress
)

PIXEL_DTYPES = ("uint8", "uint16", "uint32")       # the start message's `image_dtype`
ALGORITHMS = ("bslz4", "lz4")                      # tag 56500's documented algorithms
MAX_PIXELS = 1 << 25    # per array without a start to compare with: 32 Mpixel (an EIGER2 16M has 18)
MAX_TABLE = 1 << 24     # elements of a 1-D typed array (the count-rate lookup table)
MAX_BLOCK = 1 << 20     # a compressed stream's block size beyond its data size (a DCU uses 8 KiB)
BLOCK = 8192            # the block size a DCU compresses with (bytes)
BSHUF_MULT = 8          # bitshuffle transposes groups of 8 elements; fewer at the end are stored as they are

SELF_DESCRIBED = b"\xd9\xd9\xf7"   # tag 55799 (RFC 8949 section 3.4.6), which a DCU puts first

# RFC 8746 section 2.1: typed array tag -> element type (76, 83 and 87 have no numpy dtype here).
TYPED_ARRAYS = {64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
                72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
                80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8"}
# The tag a DCU writes for each element type: little-endian, and 64 (not 68, clamped) for bytes.
TAG_OF = {np.dtype(dtype): tag for tag, dtype in TYPED_ARRAYS.items() if tag != 68}


class Stream2Error(ValueError):
    """A message that is not stream v2; `reason` (one of REJECT_REASONS) labels the counter."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Start:
    """A series begins (the DCU's arm). `channels` name the image channels in message order; every
    image channel is an array of shape `shape` = (image_size_y, image_size_x) and dtype `image_dtype`.
    `detail` holds the other documented fields that were sent (arm_date, count_time, flatfield ...),
    checked against their documented types; arrays among them (flatfield, pixel_mask per channel,
    countrate_correction_lookup_table) are numpy arrays."""
    series_id: int
    series_unique_id: str
    channels: tuple[str, ...]
    image_size_x: int
    image_size_y: int
    image_dtype: np.dtype
    number_of_images: int
    user_data: Any = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image_size_y, self.image_size_x


@dataclass(frozen=True)
class Image:
    """One exposure. `data` maps each channel (in message order) to its pixels: a read-only numpy
    array of shape (rows, cols), dtype uint8/16/32 in native byte order. Times are rationals
    (numerator, denominator) in seconds, the denominator being the DCU's time base (Hz);
    start/stop_time count from `series_date`."""
    series_id: int
    series_unique_id: str
    image_id: int
    data: dict[str, np.ndarray]
    real_time: tuple[int, int] | None = None
    start_time: tuple[int, int] | None = None
    stop_time: tuple[int, int] | None = None
    series_date: datetime | None = None
    user_data: Any = None


@dataclass(frozen=True)
class End:
    """A series ends (the DCU's disarm)."""
    series_id: int
    series_unique_id: str


# ---- CBOR tags, kept as they come: sizes are checked before anything is decompressed or copied ----

@dataclass(frozen=True)
class _Compressed:      # tag 56500: [algorithm, modifier, compressed bytes], unchecked
    content: Any


@dataclass(frozen=True)
class _Typed:           # RFC 8746 typed array: element type and its byte string (or _Compressed)
    dtype: np.dtype
    payload: Any


@dataclass(frozen=True)
class _MultiDim:        # RFC 8746 multi-dimensional array: [dimensions, elements]
    content: Any
    order: str          # "C" (tag 40) or "F" (1040)


def _typed(dtype: str) -> Callable[[Any, bool], _Typed]:
    return lambda value, immutable: _Typed(np.dtype(dtype), value)


SEMANTIC = {**{tag: _typed(dtype) for tag, dtype in TYPED_ARRAYS.items()},
            40: lambda value, immutable: _MultiDim(value, "C"),
            1040: lambda value, immutable: _MultiDim(value, "F"),
            56500: lambda value, immutable: _Compressed(value)}


def decode(message: bytes, start: Start | None = None, max_pixels: int = MAX_PIXELS,
           channel: str | None = None) -> Start | Image | End:
    """One stream v2 message (the bytes of one ZeroMQ message) as a Start, Image or End.

    With `start` (the series' start message), an image's channels must be the start's and each
    channel's shape and dtype the start's (checked before decompressing); without it, an image
    array may hold at most `max_pixels` pixels. `channel`: decode that channel of an image only ("":
    its first; a client that uses one channel need not decompress the others), None: every channel;
    an image without it is refused (`field`). Raises Stream2Error, and nothing else, for anything
    that is not a stream v2 message (fields other than the documented ones are ignored)."""
    try:
        decoder = cbor2.CBORDecoder(io.BytesIO(message), semantic_decoders=SEMANTIC,
                                    allow_duplicate_keys=False, strict_hashable_types=True)
        if message[:3] == SELF_DESCRIBED:   # skipped: cbor2 would make all inside it immutable (tuples)
            decoder.fp.seek(3)
        item = decoder.decode()
        trailing = len(message) - decoder.fp.tell()
    except (cbor2.CBORDecodeError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise Stream2Error("cbor", f"not a CBOR message ({exc})") from None
    if trailing:
        raise Stream2Error("cbor", f"{trailing} bytes follow the CBOR item; a message is one item")
    if not isinstance(item, Mapping):
        raise Stream2Error("not-map", f"a message is a CBOR map, got {type(item).__name__}")
    kind = item.get("type")
    if kind == "image":
        return _image(item, start, max_pixels, channel)
    if kind == "start":
        return _start(item)
    if kind == "end":
        return End(_uint(item, "series_id", "end"), _text(item, "series_unique_id", "end"))
    raise Stream2Error("type", f"field 'type' is {kind!r}; stream v2 messages are start, image or end")


def _image(item: Mapping, start: Start | None, max_pixels: int, channel: str | None) -> Image:
    fields = dict(series_id=_uint(item, "series_id", "image"),
                  series_unique_id=_text(item, "series_unique_id", "image"),
                  image_id=_uint(item, "image_id", "image"),
                  real_time=_optional(item, "real_time", "image", _rational),
                  start_time=_optional(item, "start_time", "image", _rational),
                  stop_time=_optional(item, "stop_time", "image", _rational),
                  series_date=_optional(item, "series_date", "image", _datetime),
                  user_data=item.get("user_data"))
    data = item.get("data")
    if not isinstance(data, Mapping) or not data:
        raise Stream2Error("field", "image field 'data': expected a map of channel name -> array, got "
                                    f"{_kind(data)}")
    if start is not None and tuple(data) != start.channels:
        raise Stream2Error("field", f"image channels {list(data)} are not the start message's "
                                    f"{list(start.channels)}")
    shape = start.shape if start is not None else None
    dtypes = (start.image_dtype.name,) if start is not None else PIXEL_DTYPES
    wanted = data if channel is None else (channel or next(iter(data)),)
    if channel and channel not in data:
        raise Stream2Error("field", f"image channels {list(data)}, without {channel!r}")
    pixels = {name: _multidim(data[name], f"image field 'data'/{name!r}", shape, max_pixels, dtypes)
              for name in wanted}
    return Image(data=pixels, **fields)


def _start(item: Mapping) -> Start:
    dtype_name = _text(item, "image_dtype", "start")
    if dtype_name not in PIXEL_DTYPES:
        raise Stream2Error("field", f"start field 'image_dtype' is {dtype_name!r}; stream v2 pixels are "
                                    f"{', '.join(PIXEL_DTYPES)}")
    channels = _texts(_field(item, "channels", "start"), "start field 'channels'")
    if not channels:
        raise Stream2Error("field", "start field 'channels': expected a non-empty array of channel names")
    shape = (_uint(item, "image_size_y", "start"), _uint(item, "image_size_x", "start"))
    if not 0 < shape[0] * shape[1] <= MAX_PIXELS:
        raise Stream2Error("size", f"start image size {shape[1]} x {shape[0]} pixels: expected 1 to "
                                   f"{MAX_PIXELS} pixels")
    detail = {name: check(item[name], f"start field {name!r}", shape)
              for name, check in START_DETAIL.items() if name in item}
    return Start(series_id=_uint(item, "series_id", "start"),
                 series_unique_id=_text(item, "series_unique_id", "start"),
                 channels=tuple(channels), image_size_x=shape[1], image_size_y=shape[0],
                 image_dtype=np.dtype(dtype_name), number_of_images=_uint(item, "number_of_images", "start"),
                 user_data=item.get("user_data"), detail=detail)


# ---- arrays ----

def _multidim(value: Any, name: str, shape: tuple[int, ...] | None, max_elements: int,
              dtypes: tuple[str, ...] | None = None) -> np.ndarray:
    """An RFC 8746 multi-dimensional array of a typed array (of one of `dtypes`, any when None), as a
    read-only numpy array; its dimensions must be `shape` when given."""
    if not isinstance(value, _MultiDim):
        raise Stream2Error("field", f"{name}: expected a multi-dimensional array (tag 40), got {_kind(value)}")
    content = value.content
    if not (_sequence(content) and len(content) == 2 and _sequence(content[0])
            and all(_is_uint(d) for d in content[0])):
        raise Stream2Error("field", f"{name}: tag 40 holds [dimensions, typed array]")
    dims = tuple(content[0])
    if shape is not None and dims != tuple(shape):
        raise Stream2Error("size", f"{name}: dimensions {list(dims)}, the start message says {list(shape)}")
    count = int(np.prod(dims, dtype=object)) if dims else 0
    if not 0 < count <= max_elements:
        raise Stream2Error("size", f"{name}: dimensions {list(dims)} make {count} elements; expected 1 to "
                                   f"{max_elements}")
    if value.order == "F":
        return np.ascontiguousarray(_typed_array(content[1], name, count, dtypes).reshape(dims, order="F"))
    return _typed_array(content[1], name, count, dtypes).reshape(dims)


def _typed_array(value: Any, name: str, count: int | None, dtypes: tuple[str, ...] | None = None) -> np.ndarray:
    """An RFC 8746 typed array of `count` elements (when None, of up to MAX_TABLE), of one of `dtypes`
    (any when None), read-only unless converted to native byte order."""
    if not isinstance(value, _Typed) or (dtypes is not None and value.dtype.newbyteorder("=").name not in dtypes):
        raise Stream2Error("field", f"{name}: expected a typed array of {', '.join(dtypes or ('numbers',))}, "
                                    f"got {_kind(value)}")
    itemsize = value.dtype.itemsize
    limit = count * itemsize if count is not None else MAX_TABLE * itemsize
    payload = value.payload
    if isinstance(payload, _Compressed):
        payload = _decompress(payload.content, name, itemsize, limit, exact=count is not None)
    elif not isinstance(payload, bytes):
        raise Stream2Error("field", f"{name}: a typed array holds a byte string, got {_kind(payload)}")
    if len(payload) % itemsize or len(payload) > limit or (count is not None and len(payload) != limit):
        raise Stream2Error("size", f"{name}: {len(payload)} bytes for "
                                   f"{count if count is not None else f'at most {MAX_TABLE}'} elements of "
                                   f"{itemsize} bytes")
    array = np.frombuffer(payload, dtype=value.dtype)
    if not value.dtype.isnative:
        return array.astype(value.dtype.newbyteorder("="))
    array.flags.writeable = False   # (frombuffer of a decompressed array is writable)
    return array


def _decompress(content: Any, name: str, elem_size: int, limit: int, exact: bool) -> bytes | np.ndarray:
    """Tag 56500's content, decompressed. The stream's declared size must be `limit` bytes (at most
    `limit` unless `exact`) before any memory is taken for it."""
    if not (_sequence(content) and len(content) == 3 and isinstance(content[0], str)
            and _is_uint(content[1]) and isinstance(content[2], bytes)):
        raise Stream2Error("field", f"{name}: tag 56500 holds [algorithm, modifier, byte string]")
    algorithm, modifier, data = content
    if algorithm not in ALGORITHMS:
        raise Stream2Error("compression", f"{name}: compression {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if algorithm == "bslz4" and modifier != elem_size:
        raise Stream2Error("compression", f"{name}: bslz4 element size {modifier} for {elem_size}-byte elements")
    if len(data) < 12:
        raise Stream2Error("compression", f"{name}: {len(data)} bytes, shorter than the 12-byte HDF5 header")
    size, block = struct.unpack_from(">QI", data)   # the HDF5 filters' header: total and block size
    if size > limit or (exact and size != limit):
        raise Stream2Error("size", f"{name}: the compressed stream declares {size} bytes, the array has "
                                   f"{'' if exact else 'at most '}{limit}")
    if not 0 < block <= max(size, MAX_BLOCK) or (algorithm == "bslz4" and block % (BSHUF_MULT * elem_size)):
        raise Stream2Error("compression", f"{name}: block size {block} bytes for {size} bytes of "
                                          f"{elem_size}-byte elements")
    try:
        raw = _unblock(memoryview(data), size, block, algorithm, elem_size)
    except (lz4.block.LZ4BlockError, ValueError) as exc:
        raise Stream2Error("compression", f"{name}: the {algorithm} stream does not decompress ({exc})") from None
    if algorithm == "lz4":
        return raw
    elements = np.frombuffer(raw, dtype=f"u{elem_size}")
    return bitshuffle.bitunshuffle(elements, block // elem_size).view(np.uint8)


def _unblock(data: memoryview, size: int, block: int, algorithm: str, elem_size: int) -> bytes:
    """The blocks of an HDF5-filter stream (after its 12-byte header: per block a 4-byte big-endian
    length and the LZ4 block) decompressed and joined: `size` bytes. Blocks hold `block` bytes, the last
    one less; an lz4 block as long as its data is stored as it is (H5Z-LZ4); bslz4 ends with the bytes of
    the last size % 8 elements as they are (bitshuffle's filter). ValueError if the stream is not that."""
    tail = size % (BSHUF_MULT * elem_size) if algorithm == "bslz4" else 0
    pieces, at, left = [], 12, size - tail
    while left:
        n = min(block, left)
        if at + 4 > len(data):
            raise ValueError(f"the stream ends after {at} bytes, within its blocks")
        (length,) = struct.unpack_from(">I", data, at)
        piece = data[at + 4:at + 4 + length]
        if len(piece) != length:
            raise ValueError(f"a block of {length} bytes at byte {at}, past the stream's end")
        piece = piece if algorithm == "lz4" and length == n else lz4.block.decompress(piece, uncompressed_size=n)
        if len(piece) != n:
            raise ValueError(f"a block of {len(piece)} bytes, expected {n}")
        pieces.append(piece)
        at, left = at + 4 + length, left - n
    if len(data) - at != tail:
        raise ValueError(f"{len(data) - at} bytes after the blocks, expected {tail}")
    pieces.append(data[at:])
    return b"".join(pieces)


# ---- scalar fields, as the stream v2 data model defines them ----

def _kind(value: Any) -> str:
    if isinstance(value, _Typed):
        return f"a typed array of {value.dtype}"
    if isinstance(value, _MultiDim):
        return "a multi-dimensional array"
    if isinstance(value, _Compressed):
        return "a compressed byte string (tag 56500)"
    return "nothing" if value is None else type(value).__name__


def _sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 64


def _field(item: Mapping, key: str, message: str) -> Any:
    if key not in item:
        raise Stream2Error("field", f"{message} message without field {key!r}")
    return item[key]


def _uint(item: Mapping, key: str, message: str) -> int:
    value = _field(item, key, message)
    if not _is_uint(value):
        raise Stream2Error("field", f"{message} field {key!r}: expected an unsigned integer, got {_kind(value)}")
    return value


def _text(item: Mapping, key: str, message: str) -> str:
    value = _field(item, key, message)
    if not isinstance(value, str):
        raise Stream2Error("field", f"{message} field {key!r}: expected a text string, got {_kind(value)}")
    return value


def _optional(item: Mapping, key: str, message: str, check: Callable[[Any, str], Any]) -> Any:
    return check(item[key], f"{message} field {key!r}") if key in item else None


def _wrong(name: str, expected: str, value: Any) -> Stream2Error:
    return Stream2Error("field", f"{name}: expected {expected}, got {_kind(value)}")


def _rational(value: Any, name: str, shape: Any = None) -> tuple[int, int]:
    if not (_sequence(value) and len(value) == 2 and all(_is_uint(v) for v in value) and value[1] > 0):
        raise _wrong(name, "a rational [numerator, denominator > 0]", value)
    return int(value[0]), int(value[1])


def _datetime(value: Any, name: str, shape: Any = None) -> datetime:
    if not isinstance(value, datetime):
        raise _wrong(name, "a date/time (tag 0)", value)
    return value


def _float(value: Any, name: str, shape: Any = None) -> float:
    if type(value) not in (float, int):
        raise _wrong(name, "a float", value)
    return float(value)


def _bool(value: Any, name: str, shape: Any = None) -> bool:
    if type(value) is not bool:
        raise _wrong(name, "true or false", value)
    return value


def _string(value: Any, name: str, shape: Any = None) -> str:
    if not isinstance(value, str):
        raise _wrong(name, "a text string", value)
    return value


def _unsigned(value: Any, name: str, shape: Any = None) -> int:
    if not _is_uint(value):
        raise _wrong(name, "an unsigned integer", value)
    return value


def _texts(value: Any, name: str, shape: Any = None) -> list[str]:
    if not (_sequence(value) and all(isinstance(v, str) for v in value)):
        raise _wrong(name, "an array of text strings", value)
    return list(value)


def _floats(value: Any, name: str, shape: Any = None) -> list[float]:
    if not _sequence(value):
        raise _wrong(name, "an array of floats", value)
    return [_float(v, name) for v in value]


def _map(check: Callable[[Any, str, Any], Any]) -> Callable[[Any, str, Any], dict]:
    def checked(value: Any, name: str, shape: Any = None) -> dict:
        if not isinstance(value, Mapping):
            raise _wrong(name, "a map", value)
        return {key: check(v, f"{name}/{key!r}", shape) for key, v in value.items()}
    return checked


def _image_array(value: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A per-channel array of image size (flatfield, pixel_mask)."""
    return _multidim(value, name, shape, shape[0] * shape[1])


def _table(value: Any, name: str, shape: Any = None) -> np.ndarray:
    return _typed_array(value, name, None)


# The start message's documented fields other than those Start names, with their types.
START_DETAIL: dict[str, Callable[[Any, str, Any], Any]] = {
    "arm_date": _datetime, "beam_center_x": _float, "beam_center_y": _float, "count_time": _float,
    "countrate_correction_enabled": _bool, "countrate_correction_lookup_table": _table,
    "detector_description": _string, "detector_serial_number": _string, "detector_translation": _floats,
    "flatfield": _map(_image_array), "flatfield_enabled": _bool, "frame_time": _float,
    "goniometer": _map(_map(_float)), "incident_energy": _float, "incident_wavelength": _float,
    "pixel_mask": _map(_image_array), "pixel_mask_enabled": _bool, "pixel_size_x": _float,
    "pixel_size_y": _float, "saturation_value": _unsigned, "sensor_material": _string,
    "sensor_thickness": _float, "threshold_energy": _map(_float),
    "virtual_pixel_interpolation_enabled": _bool,
}


# ---- encoding, as a DCU writes (for `detstream dcu` and the tests) ----

def encode(message: Mapping[str, Any]) -> bytes:
    """One message's bytes: the map behind the self-described CBOR tag (55799), as a DCU sends it.
    Arrays in it are given as array_tag() made them."""
    return cbor2.dumps(cbor2.CBORTag(55799, dict(message)))


def array_tag(array: np.ndarray, compression: str | None = None) -> cbor2.CBORTag:
    """An array as stream v2 carries it: tag 40 [dimensions, little-endian typed array], its byte
    string compressed ("bslz4" or "lz4": tag 56500) or not (None)."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    payload = array.tobytes() if compression is None else cbor2.CBORTag(
        56500, [compression, array.itemsize if compression == "bslz4" else 0, compress(array, compression)])
    return cbor2.CBORTag(40, [list(array.shape), cbor2.CBORTag(TAG_OF[array.dtype], payload)])


def compress(array: np.ndarray, algorithm: str) -> bytes:
    """The array's bytes as tag 56500 holds them: the HDF5 filters' framing (8-byte total size and
    4-byte block size, big-endian, then per block its 4-byte compressed size and data) of bitshuffle
    + LZ4 ("bslz4", as bitshuffle's HDF5 filter writes) or of LZ4 ("lz4", as the HDF5 LZ4 filter
    H5Z-LZ4 writes: a block that LZ4 cannot shrink is stored as it is), in BLOCK-byte blocks."""
    head = struct.pack(">QI", array.nbytes, BLOCK)
    if algorithm == "bslz4":
        flat = np.ascontiguousarray(array).reshape(-1)
        return head + bitshuffle.compress_lz4(flat, BLOCK // array.itemsize).tobytes()
    if algorithm != "lz4":
        raise ValueError(f"compression {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    raw = np.ascontiguousarray(array).tobytes()
    blocks = [head]
    for at in range(0, len(raw), BLOCK):
        block = raw[at:at + BLOCK]
        packed = lz4.block.compress(block, store_size=False)
        packed = packed if len(packed) < len(block) else block
        blocks += [struct.pack(">I", len(packed)), packed]
    return b"".join(blocks)
