"""Reading HTTP/1.1 responses from bytes, without I/O (the upstream client's parser).

``ResponseReader`` is fed what a worker sends and gives back, for one response
after another, the head and then the body as it arrives. It follows RFC 9112
as h11 does, with h11's limits and leniencies (bare LF line ends, a missing
reason phrase, 1xx answers skipped), and is stricter where a proxy must be:
a response framed both by Transfer-Encoding and Content-Length is read as
chunked and its connection is not reused. It exists because h11's general
event machinery was a fifth of the client's cost per streamed event; here a
streamed event is one slice of the buffer.
"""

from __future__ import annotations

import re

MAX_HEAD = 65536  # largest response head accepted
MAX_CHUNK_LINE = 1024  # largest chunk-size line (with extensions)

_HEAD_END = re.compile(rb"\n\r?\n")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"  # visible characters and obs-text
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?\r?")
_FIELD = re.compile(rb"(%s):[ \t]*((?:%s(?:[ \t]*%s)*)?)[ \t]*\r?" % (_TOKEN, _VCHAR, _VCHAR))
_METHOD = re.compile(_TOKEN)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")

# what the body of the current response is framed by
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)
# where a chunked body is
_SIZE, _DATA, _DATA_END, _TRAILERS = range(4)


class ProtocolError(Exception):
    """The worker sent something that is not a valid HTTP/1.1 response."""


def is_token(method: bytes) -> bool:
    """Whether ``method`` is a valid request method (an RFC 9110 token)."""
    return _METHOD.fullmatch(method) is not None


class ResponseReader:
    """One connection's responses: ``start`` one, ``feed`` bytes, take ``head`` then ``body``."""

    __slots__ = (
        "_buffer",
        "_chunk_state",
        "_framing",
        "_head_request",
        "_remaining",
        "done",
        "eof",
        "keep_alive",
    )

    def __init__(self) -> None:
        self._buffer = b""
        self.eof = False  # the worker closed its side
        self.done = True  # the current response was read to its end
        self.keep_alive = True  # the connection may carry another exchange
        self._head_request = False
        self._framing = _NONE
        self._remaining = 0
        self._chunk_state = _SIZE

    def start(self, method: bytes) -> None:
        """A request was sent: its response comes next (``HEAD`` has no body)."""
        self.done = False
        self._head_request = method == b"HEAD"

    def feed(self, data: bytes) -> None:
        """Bytes from the worker; ``b""`` means it closed the connection."""
        if not data:
            self.eof = True
        elif self._buffer:
            self._buffer += data
        else:
            self._buffer = data

    @property
    def reusable(self) -> bool:
        """The response was read to its end and the connection may carry the next one."""
        return self.done and self.keep_alive and not self.eof and not self._buffer

    def head(self) -> tuple[int, list[tuple[bytes, bytes]]] | None:
        """The status and headers (lower-case names) of the response, once all arrived;
        ``None`` while more bytes are needed. Interim (1xx) responses are skipped."""
        while True:
            buffer = self._buffer
            end = _HEAD_END.search(buffer)
            if end is None:
                if len(buffer) > MAX_HEAD:
                    raise ProtocolError(f"response head larger than {MAX_HEAD} bytes")
                if self.eof:
                    raise ProtocolError("connection closed before a complete response head")
                return None
            if end.start() > MAX_HEAD:
                raise ProtocolError(f"response head larger than {MAX_HEAD} bytes")
            lines = buffer[: end.start()].split(b"\n")
            self._buffer = buffer[end.end() :]
            status_line = _STATUS_LINE.fullmatch(lines[0])
            if status_line is None:
                raise ProtocolError(f"malformed status line {lines[0][:100]!r}")
            status = int(status_line[2])
            headers = []
            for line in lines[1:]:
                field = _FIELD.fullmatch(line)
                if field is None:
                    raise ProtocolError(f"malformed header line {line[:100]!r}")
                headers.append((field[1].lower(), field[2]))
            if status < 200:
                if status == 101:
                    raise ProtocolError("unexpected protocol switch (101)")
                continue
            if status_line[1] == b"0":
                self.keep_alive = False  # HTTP/1.0: one exchange per connection
            self._frame(status, headers)
            return status, headers

    def _frame(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        lengths: set[bytes] = set()
        codings: list[bytes] = []
        for name, value in headers:
            if name == b"content-length":
                lengths.update(v.strip() for v in value.split(b","))
            elif name == b"transfer-encoding":
                codings += (c.strip().lower() for c in value.split(b","))
            elif name == b"connection" and b"close" in (
                t.strip().lower() for t in value.split(b",")
            ):
                self.keep_alive = False
        if self._head_request or status in (204, 304):
            self._framing = _NONE
        elif codings:
            if codings != [b"chunked"]:
                raise ProtocolError(f"unsupported transfer-encoding {b', '.join(codings)!r}")
            if lengths:
                self.keep_alive = False  # both framings: read as chunked, never reuse
            self._framing = _CHUNKED
            self._chunk_state = _SIZE
        elif lengths:
            if len(lengths) != 1:
                raise ProtocolError("conflicting content-length values")
            [length] = lengths
            if not length.isdigit() or len(length) > 18:
                raise ProtocolError(f"invalid content-length {length[:30]!r}")
            self._remaining = int(length)
            self._framing = _LENGTH
        else:
            self._framing = _UNTIL_CLOSE
            self.keep_alive = False
        if self._framing == _NONE or (self._framing == _LENGTH and not self._remaining):
            self.done = True

    def body(self) -> bytes | None:
        """The body bytes that arrived since the last call (as one piece), ``b""`` once the
        response is complete, ``None`` while more bytes are needed."""
        if self.done:
            return b""
        framing = self._framing
        buffer = self._buffer
        if framing == _LENGTH:
            if not buffer:
                if self.eof:
                    raise ProtocolError("connection closed before the end of the body")
                return None
            remaining = self._remaining
            if len(buffer) <= remaining:
                piece, self._buffer = buffer, b""
            else:
                piece, self._buffer = buffer[:remaining], buffer[remaining:]
            self._remaining = remaining - len(piece)
            self.done = not self._remaining
            return piece
        if framing == _UNTIL_CLOSE:
            if buffer:
                self._buffer = b""
                return buffer
            if self.eof:
                self.done = True
                return b""
            return None
        return self._chunked()

    def _chunked(self) -> bytes | None:
        pieces = []
        buffer = self._buffer
        pos = 0
        state = self._chunk_state
        while True:
            if state == _SIZE:
                size_line = _CHUNK_SIZE.match(buffer, pos)
                if size_line is None:
                    if buffer.find(b"\n", pos, pos + MAX_CHUNK_LINE) != -1 or (
                        len(buffer) - pos > MAX_CHUNK_LINE
                    ):
                        raise ProtocolError("malformed chunk size line")
                    break
                pos = size_line.end()
                self._remaining = int(size_line[1], 16)
                state = _DATA if self._remaining else _TRAILERS
            elif state == _DATA:
                available = len(buffer) - pos
                if not available:
                    break
                take = min(available, self._remaining)
                pieces.append(buffer[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                state = _DATA_END
            elif state == _DATA_END:
                if buffer.startswith(b"\r\n", pos):
                    pos += 2
                    state = _SIZE
                elif buffer[pos:] in (b"", b"\r"):
                    break
                else:
                    raise ProtocolError("malformed chunk end (expected CRLF)")
            else:  # trailer fields: skipped, up to the blank line that ends them
                if buffer.startswith(b"\r\n", pos):
                    pos += 2
                elif buffer.startswith(b"\n", pos):
                    pos += 1
                else:
                    end = _HEAD_END.search(buffer, pos)
                    if end is None:
                        if len(buffer) - pos > MAX_HEAD:
                            raise ProtocolError(f"chunked trailers larger than {MAX_HEAD} bytes")
                        break
                    pos = end.end()
                self.done = True
                break
        self._chunk_state = state
        self._buffer = buffer[pos:] if pos < len(buffer) else b""
        if pieces:
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if self.done:
            return b""
        if self.eof:
            raise ProtocolError("connection closed before the end of the chunked body")
        return None
