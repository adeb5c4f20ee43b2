"""The upstream client's HTTP/1.1 response reader, against h11 on the same bytes.

Valid responses, cut into arbitrary pieces, must read exactly as h11 reads them
(head, body, whether the connection can carry the next exchange); malformed
ones must be refused, never half-read.
"""

from __future__ import annotations

import contextlib

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_router.http1 import MAX_HEAD, ProtocolError, ResponseReader, is_token


def read_all(
    pieces: list[bytes], method: bytes = b"GET"
) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    """Feed ``pieces`` one at a time (then the end of stream if still needed)."""
    reader = ResponseReader()
    reader.start(method)
    head = None
    body = b""
    feed = [*pieces, b""]
    while True:
        if head is None:
            head = reader.head()
            if head is not None:
                continue
        else:
            piece = reader.body()
            if piece == b"":
                return head[0], head[1], body, reader.reusable
            if piece is not None:
                body += piece
                continue
        reader.feed(feed.pop(0))


def h11_read(data: bytes, method: bytes = b"GET") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"w")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    status, headers, body = 0, [], b""
    while True:
        event = conn.next_event()
        if type(event) is h11.Response:
            status, headers = event.status_code, list(event.headers)
        elif type(event) is h11.Data:
            body += event.data
        elif type(event) is h11.EndOfMessage:
            return status, headers, body


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


header_names = st.sampled_from([b"x-a", b"Content-Type", b"X-Trace-Id", b"server", b"vary"])
header_values = st.from_regex(rb"\A[!-~]([ !-~]{0,20}[!-~])?\Z", fullmatch=True)
bodies = st.binary(max_size=3000)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """A valid response: its bytes, its body, and whether it allows reuse."""
    status = draw(st.sampled_from([200, 201, 204, 304, 400, 404, 500, 503]))
    body = b"" if status in (204, 304) else draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    headers = [(draw(header_names), draw(header_values)) for _ in range(draw(st.integers(0, 4)))]
    interim = draw(st.booleans())
    close = draw(st.booleans())
    parts = [b"HTTP/1.1 100 Continue\r\n\r\n"] if interim else []
    parts.append(b"HTTP/1.1 %d %s\r\n" % (status, draw(st.sampled_from([b"OK", b"", b"Bad x"]))))
    parts += [b"%s: %s\r\n" % h for h in headers]
    if close:
        parts.append(b"Connection: close\r\n")
    if status in (204, 304):
        framing = "none"
    elif framing == "length":
        parts.append(b"Content-Length: %d\r\n" % len(body))
    elif framing == "chunked":
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    if framing == "chunked":
        sizes = draw(st.lists(st.integers(1, 700), max_size=8))
        rest = body
        for size in sizes:
            piece, rest = rest[:size], rest[size:]
            if piece:
                parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        if rest:
            parts.append(b"%X;ext=1\r\n%s\r\n" % (len(rest), rest))
        parts.append(b"0\r\n" + (b"x-trailer: 1\r\n" if draw(st.booleans()) else b"") + b"\r\n")
    elif framing in ("length", "close"):
        parts.append(body)
    return b"".join(parts), body, not close and framing != "close"


@settings(max_examples=300, deadline=None)
@given(responses(), st.lists(st.integers(0, 10_000), max_size=12))
def test_valid_responses_read_as_h11_reads_them_however_they_are_cut(response, cuts):
    data, body, reusable = response
    status, headers, got, reuse = read_all(cut(data, cuts))
    assert (status, headers, got) == h11_read(data)
    assert got == body
    assert reuse == reusable


def test_a_head_answer_has_no_body_whatever_its_length_says():
    data = b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"
    assert read_all([data], b"HEAD") == (200, [(b"content-length", b"99")], b"", True)


def test_bare_line_feeds_and_a_missing_reason_are_accepted():
    data = b"HTTP/1.1 200\nContent-Length: 2\nX-A:  v  \n\nok"
    assert read_all([data]) == (200, [(b"content-length", b"2"), (b"x-a", b"v")], b"ok", True)


def test_http_1_0_and_two_framings_are_read_but_the_connection_is_not_reused():
    old = b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert read_all([old])[2:] == (b"ok", False)
    both = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    )
    assert read_all([both])[2:] == (b"ok", False)


def test_bytes_after_a_complete_response_forbid_reuse():
    data = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokSTRAY"
    assert read_all([data])[2:] == (b"ok", False)


def test_pieces_that_arrived_together_come_out_as_one():
    reader = ResponseReader()
    reader.start(b"POST")
    reader.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab")
    assert reader.head() == (200, [(b"transfer-encoding", b"chunked")])
    assert reader.body() == b"ab"  # what there is of a chunk, at once
    assert reader.body() is None
    reader.feed(b"c\r\n2\r\nde\r\n2\r\nfg\r\n")
    assert reader.body() == b"cdefg"
    reader.feed(b"0\r\n\r\n")
    assert reader.body() == b""
    assert reader.reusable


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx a: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-a: 1\x00\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokXX",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc",  # then closed
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nabc",  # then closed
        b"HTTP/1.1 200 OK\r\ncontent",  # closed inside the head
    ],
)
def test_malformed_or_truncated_responses_are_refused(data):
    with pytest.raises(ProtocolError):
        read_all([data])


def test_a_head_beyond_the_limit_is_refused_before_it_ends():
    reader = ResponseReader()
    reader.start(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * MAX_HEAD)
    with pytest.raises(ProtocolError, match="larger than"):
        reader.head()


def test_request_methods_must_be_tokens():
    assert is_token(b"GET")
    assert is_token(b"M-SEARCH")
    assert not is_token(b"G(E)T")
    assert not is_token(b"")
    assert not is_token(b"GET /")


garbage_heads = st.sampled_from(
    [b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
)


@settings(max_examples=300, deadline=None)
@given(garbage_heads, st.binary(max_size=400), st.lists(st.integers(0, 500), max_size=6))
def test_arbitrary_bytes_are_read_or_refused_never_anything_else(head, data, cuts):
    with contextlib.suppress(ProtocolError):
        read_all(cut(head + data, cuts))


@pytest.mark.parametrize("stated", [0, 1, 3, 99])
def test_both_framings_read_as_h11_reads_them_but_never_reused(stated):
    # RFC 9112 §6.3: Transfer-Encoding wins. h11 reads the same body (its reading is the
    # reference here) but would reuse the connection; ours does not: the answer might be
    # a response-splitting attempt, and bytes after it are not trusted.
    data = (
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" % stated
    )
    status, headers, body, reusable = read_all([data])
    assert (status, headers, body) == h11_read(data)
    assert body == b"hello world"
    assert not reusable
