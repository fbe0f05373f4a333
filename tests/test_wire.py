"""The data-plane header: round trip, and every kind of malformed message is a WireError."""

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from detstream.services.dataplane.wire import (
    BLOCK,
    END_OF_SCAN,
    GONE,
    RESULT,
    VOLUME,
    WANT,
    WIRE_VERSION,
    Gaps,
    Geometry,
    Header,
    WireError,
    decode,
    frame_key,
    pack_frames,
    results,
    unpack_frames,
)

G = Geometry(rows=8, cols=8, sectors=2, dtype="<u2", scan_frames=16, block_frames=4)


def block(block=1, frames=(4, 5), sectors=(1,), shape=(8, 4), **over):
    fields = dict(version=WIRE_VERSION, kind=BLOCK, scan=0, dtype="<u2") | over
    return Header(block=block, frames=frames, sectors=sectors, shape=shape, **fields)


def volume(shape=(2, 4, 4), **over):
    """A VOLUME header: band 1's slices of `shape`."""
    fields = dict(version=WIRE_VERSION, kind=VOLUME, scan=0, band=1, dtype="<f4") | over
    return Header(shape=shape, **fields)


def result(frames=(4, 5), masks=(3, 1), counts=(1, 2), **over):
    """A RESULT header: the results of `frames`, `counts` parts each."""
    fields = dict(version=WIRE_VERSION, kind=RESULT, scan=0, result="events") | over
    return Header(frames=frames, sector_masks=masks, part_counts=counts, **fields)


def frames(header, *payloads):
    return [zmq.Frame(header.SerializeToString()), *(zmq.Frame(p) for p in payloads)]


def test_a_block_message_gives_views_of_its_frames_sectors():
    pixels = [np.full((8, 4), i, "<u2") for i in range(4)]
    msg = decode(frames(block(frames=(4, 5), sectors=(0, 1)), *(p.tobytes() for p in pixels)), G)
    assert [int(s[0, 0]) for s in msg.sectors] == [0, 1, 2, 3]   # frame 4 sectors 0, 1; frame 5 sectors 0, 1
    assert not msg.sectors[0].flags.owndata  # a view over the ZeroMQ buffer, not a copy
    assert decode(frames(block(block=3, frames=(15,)), bytes(64)), G).header.frames == [15]


@pytest.mark.parametrize("raw, reason", [
    ([], "empty"),
    ([zmq.Frame(b"\xff\xff\xff")], "header"),
    ([zmq.Frame(b"x" * 5000)], "header"),
    (frames(block(version=1), bytes(64), bytes(64)), "version"),
    (frames(block(kind=99), bytes(64)), "kind"),
    (frames(block(kind=0), bytes(64)), "kind"),
    (frames(block(), bytes(64)), "parts"),                              # 2 frames x 1 sector: 2 parts
    (frames(block(), bytes(64), bytes(64), bytes(64)), "parts"),
    (frames(block(), bytes(64), bytes(62)), "size"),
    (frames(block(), bytes(64), bytes(6400)), "size"),
    (frames(block(shape=[4, 8]), bytes(64), bytes(64)), "geometry"),
    (frames(block(dtype="<f4"), bytes(128), bytes(128)), "geometry"),
    (frames(block(frames=(3, 4)), bytes(64), bytes(64)), "range"),       # frame 3 is block 0's
    (frames(block(block=4, frames=(16,)), bytes(64)), "range"),          # past the scan
    (frames(block(sectors=(2,)), bytes(64), bytes(64)), "range"),
    (frames(block(frames=(4,), sectors=(1, 1)), bytes(64), bytes(64)), "range"),
    (frames(Header(version=WIRE_VERSION, kind=WANT, scan=0), b"extra"), "parts"),
    (frames(Header(version=WIRE_VERSION, kind=END_OF_SCAN), b"extra"), "parts"),
    (frames(Header(version=WIRE_VERSION, kind=END_OF_SCAN, lost=1), bytes(2), bytes(2)), "parts"),
    (frames(Header(version=WIRE_VERSION, kind=END_OF_SCAN, lost=1), bytes(3)), "size"),
    (frames(volume(), bytes(4 * 2 * 4 * 4)), "parts"),                   # slices without the angles' bitmap
    (frames(volume(shape=[4, 4]), bytes(64), bytes(2)), "geometry"),
    (frames(volume(dtype="<f8"), bytes(256), bytes(2)), "geometry"),
    (frames(volume(), bytes(4 * 2 * 4 * 4 - 4), bytes(2)), "size"),
    (frames(Header(version=WIRE_VERSION, kind=GONE), b"extra"), "parts"),
    (frames(result(), b"a", b"b"), "parts"),                             # frame 5 counts 2 parts: 3 in all
    (frames(result(counts=(1, 0)), b"a"), "parts"),                      # a frame without a result
    (frames(result(masks=(3,)), b"a", b"b", b"c"), "parts"),            # a mask short
    (frames(result(frames=(), masks=(), counts=())), "parts"),
    (frames(result(frames=(4, 16)), b"a", b"b", b"c"), "range"),         # past the scan
])
def test_malformed_messages_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(WireError) as err:
        decode(raw, G)
    assert err.value.reason == reason


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=5))
def test_garbage_never_escapes_as_anything_but_wire_error(parts):
    try:
        decode([zmq.Frame(p) for p in parts], G)
    except WireError:
        pass


@settings(max_examples=1000, deadline=None)
@given(number=st.integers(0, 2**40), listed=st.lists(st.integers(0, 2**40), max_size=3),
       sectors=st.lists(st.integers(0, 2**32 - 1), max_size=3), size=st.integers(0, 200),
       shape=st.lists(st.integers(0, 2**32 - 1), max_size=3))
def test_fuzzed_block_headers_are_accepted_only_when_consistent(number, listed, sectors, size, shape):
    raw = frames(block(block=number, frames=listed, sectors=sectors, shape=shape),
                 *[bytes(size)] * (len(listed) * len(sectors)))
    try:
        msg = decode(raw, G)
    except WireError:
        return
    h = msg.header
    assert all(h.block * 4 <= f < min(h.block * 4 + 4, 16) for f in h.frames)
    assert all(s < 2 for s in h.sectors) and all(len(p) == 64 for p in msg.parts)


def test_a_result_message_carries_several_frames_results():
    msg = decode(frames(result(), b"a", b"b", b"c"), G)
    assert [(f, m, [bytes(p) for p in parts]) for f, m, parts in results(msg.header, msg.parts)] == [
        (4, 3, [b"a"]), (5, 1, [b"b", b"c"])]


def test_an_end_of_scan_names_its_lost_frames_as_a_bitmap():
    lost = np.zeros(16, bool)
    lost[[0, 7, 15]] = True
    msg = decode(frames(Header(version=WIRE_VERSION, kind=END_OF_SCAN, lost=3), pack_frames(lost)), G)
    np.testing.assert_array_equal(unpack_frames(msg.parts[0], 16), lost)
    assert not decode(frames(Header(version=WIRE_VERSION, kind=END_OF_SCAN, lost=3)), G).parts  # a count alone is fine


def test_a_volume_carries_a_bands_float32_slices_and_the_angles_it_used():
    """Routing by slice: a worker's band of slices (VOLUME), 2 slices of 4x4 here, and its angles' bitmap."""
    slices = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    msg = decode(frames(volume(), slices.tobytes(), pack_frames(np.ones(12, bool))), G)
    assert msg.header.band == 1 and list(msg.header.shape) == [2, 4, 4]
    np.testing.assert_array_equal(np.frombuffer(msg.parts[0].buffer, np.float32).reshape(2, 4, 4), slices)


def test_frame_key_and_gaps():
    assert frame_key(3, 5) == (3 << 40) | 5
    gaps = Gaps()
    for seq in (1, 2, 5, 6):
        gaps.see(Header(sender="a", seq=seq))
    gaps.see(Header(sender="b", seq=1))
    assert gaps.total == 2
