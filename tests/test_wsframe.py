"""The WebSocket frame codec (gw_ext/wsframe.pyx), by properties: client
frames encoded by an independent encoder (tests/ws_client.py) decode back to
the same messages and control frames, whatever the byte stream's cuts; any
bytes decode to what a plain reading of RFC 6455 (tests/ws_ref.py) gives, fed
whole or in any pieces; server frames use the shortest length form."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from gw_ext import wsframe
import ws_ref
from ws_client import frame

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed_in_pieces(data: bytes, cuts: list[int], limit: int = 1 << 20) -> list:
    dec = wsframe.Decoder(limit, True)
    events = []
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        events += dec.feed(data[a:b])
    return ws_ref.merge(events)


payloads = st.binary(max_size=300) | st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 70000), st.integers(0, 255))
masks = st.binary(min_size=4, max_size=4)


@st.composite
def streams(draw):
    """(wire bytes, the events they must decode to): messages cut into frames,
    control frames between any two frames."""
    wire = b""
    want = []
    for _ in range(draw(st.integers(0, 5))):
        message = draw(payloads)
        cuts = sorted(draw(st.lists(st.integers(0, len(message)), max_size=4)))
        pieces = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)])]
        for i, piece in enumerate(pieces):
            wire += frame(2 if i == 0 else 0, piece, fin=i == len(pieces) - 1, mask=draw(masks))
            want.append(("data", piece))
            if i == len(pieces) - 1:
                want.append(("end",))
            if draw(st.booleans()):
                kind, body = draw(st.sampled_from([9, 10])), draw(st.binary(max_size=125))
                wire += frame(kind, body, mask=draw(masks))
                want.append(("ping" if kind == 9 else "pong", body))
    if draw(st.booleans()):
        code = draw(st.sampled_from([1000, 1001, 1011, 3000, 4999]))
        reason = draw(st.text(max_size=20)).encode()[:100]
        wire += frame(8, struct.pack("!H", code) + reason, mask=draw(masks))
        want.append(("close", code, reason))
    return wire, ws_ref.merge(want)


@SETTINGS
@given(streams(), st.lists(st.integers(0, 1 << 20), max_size=30))
def test_round_trip_in_any_pieces(stream, cuts):
    wire, want = stream
    assert feed_in_pieces(wire, cuts) == want
    assert ws_ref.decode(wire, 1 << 20) == want


@SETTINGS
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=20),
       st.sampled_from([0, 1, 125, 300, 1 << 20]))
def test_any_bytes_like_the_reference_whatever_the_cuts(data, cuts, limit):
    want = ws_ref.decode(data, limit)
    assert feed_in_pieces(data, [], limit) == want
    assert feed_in_pieces(data, cuts, limit) == want
    assert feed_in_pieces(data, list(range(len(data))), limit) == want     # a byte at a time


@SETTINGS
@given(streams(), st.integers(0, 2000), st.integers(0, 7))
def test_a_flipped_bit_still_agrees_with_the_reference(stream, at, bit):
    wire = bytearray(stream[0])
    if wire:
        wire[at % len(wire)] ^= 1 << bit
    assert feed_in_pieces(bytes(wire), [at // 2, at]) == ws_ref.decode(bytes(wire), 1 << 20)


def test_errors_and_their_codes():
    cases = [
        (frame(2, b"x", mask=None), 1002),
        (frame(2, b"x", rsv=4), 1002),
        (frame(1, b"hi"), 1003),
        (frame(0, b"x"), 1002),
        (frame(2, b"a", fin=False) + frame(2, b"b"), 1002),
        (frame(9, b"x", fin=False), 1002),
        (frame(9, b"x" * 126), 1002),
        (frame(0xB, b""), 1002),
        (frame(8, b"\x03"), 1002),
        (frame(8, struct.pack("!H", 1005)), 1002),
        (frame(8, struct.pack("!H", 1000) + b"\xc3\x28"), 1007),
        (frame(2, b"", length=1 << 63, long_form=8), 1002),
        (frame(2, b"y" * 101), 1009),
        (frame(2, b"y" * 60, fin=False) + frame(0, b"z" * 41), 1009),
    ]
    for wire, code in cases:
        events = feed_in_pieces(wire, [1, 3], limit=100)
        assert events[-1] == ("error", code), (wire[:16], events)
        assert ws_ref.decode(wire, 100)[-1] == ("error", code)


def test_an_error_leaves_the_state_unchanged():
    """The worker may hold an error back (data before it waits) and decode it
    again later: the same bytes give the same error."""
    dec = wsframe.Decoder(100, True)
    assert dec.feed(frame(2, b"ab", fin=False)) == [("data", b"ab")]
    bad = frame(2, b"cd")
    assert dec.feed(bad) == [("error", 1002)]


def test_declared_length_over_the_bound_takes_nothing():
    dec = wsframe.Decoder(1000, True)
    assert dec.feed(frame(2, b"", length=1 << 40, long_form=8) + b"zzzz") == [("error", 1009)]


@given(st.integers(0, 1 << 20))
def test_server_headers_use_the_shortest_length_form(n):
    wire = wsframe.encode_frame(2, b"\0" * n)
    assert wire[0] == 0x82
    hl = 2 if n < 126 else 4 if n < 65536 else 10
    assert len(wire) == hl + n
    assert (wire[1] & 0x7F) == (n if n < 126 else 126 if n < 65536 else 127)
    assert not wire[1] & 0x80


def test_accept_key_of_rfc_6455():
    assert wsframe.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@given(st.binary(max_size=64))
def test_utf8_as_python_decodes_it(data):
    try:
        data.decode("utf-8")
        ok = True
    except UnicodeDecodeError:
        ok = False
    assert wsframe.utf8_valid(data) == ok


def test_close_codes():
    valid = {c for c in range(0, 6000) if wsframe.close_code_valid(c)}
    assert valid == ws_ref.VALID_CLOSE
