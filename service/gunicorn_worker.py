"""gunicorn's gthread worker with limits on slow clients, and its own errors in the app's JSON shape.

gthread (gunicorn 27) gives a connection a thread once its first byte arrives
(`ThreadWorker.handle`: `wait_for_data`, then a blocking `next(conn.parser)` reads the request
line and headers, and the app reads the body from the same blocking socket). Nothing bounds
those reads, so a client that sends a header line every 5 s holds a thread for as long as it
likes, and 64 of them stop a 2-worker server. gunicorn has no header timeout setting, so:

- every client socket is wrapped in a `GuardedSocket` when it is queued for a thread;
- its reads must deliver the request line and headers within `header_timeout` of the first
  read, and then the whole body within `body_timeout` (deadlines, not idle timeouts: a byte
  every few seconds does not extend them); a miss answers 408 and closes the connection;
- once the response starts, reads are unbounded again (gunicorn's own keep-alive drain sets its
  own timeout), and each write must complete within `send_timeout`: a client that stops
  reading a stream loses the connection instead of holding the thread.

gunicorn answers malformed requests itself (400, 414, 431, ... in `Worker.handle_error`) with
an HTML page; here the page is swapped for `{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.exceptions import RequestTimeout

log = logging.getLogger("gunicorn.error")


@dataclass(frozen=True)
class ClientLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 60.0
    replica: str = ""  # the X-Replica header on gunicorn's own error answers


class RequestReadTimeout(RequestTimeout):
    """The request did not arrive in time. A werkzeug 408, so that a body read inside the app
    becomes the app's JSON 408; during the headers gunicorn hands it to `handle_error`."""


# the phases of one request on a GuardedSocket
_HEADERS, _BODY, _RESPONSE, _EXPIRED = "headers", "body", "response", "expired"


class GuardedSocket:
    """A client socket whose reads are held to deadlines while a request is being received.

    Everything but recv and sendall goes to the socket itself. A read deadline is set around
    each bounded recv only, and the caller's own timeout (blocking, or gunicorn's drain timeout)
    restored after it, so the rest of gunicorn sees the socket it expects.
    """

    def __init__(self, sock: socket.socket, limits: ClientLimits):
        self._sock = sock
        self._limits = limits
        self._phase = _HEADERS
        self._deadline: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def begin_request(self) -> None:
        """A new request may start: the header deadline runs from its first read."""
        if self._phase != _EXPIRED:
            self._phase, self._deadline = _HEADERS, None

    def begin_body(self) -> None:
        """The headers are in: the body has body_timeout from now."""
        if self._phase == _HEADERS:
            self._phase, self._deadline = _BODY, time.monotonic() + self._limits.body_timeout

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._phase == _RESPONSE:
            return self._sock.recv(bufsize, flags)
        if self._phase == _EXPIRED:
            raise TimeoutError("the request did not arrive in time")  # gunicorn's drains stop on this
        if self._deadline is None:
            self._deadline = time.monotonic() + self._limits.header_timeout
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._expire()
        prior = self._sock.gettimeout()
        bounded = prior is None or prior > remaining
        try:
            if bounded:
                self._sock.settimeout(remaining)
            return self._sock.recv(bufsize, flags)
        except TimeoutError:
            if not bounded:
                raise  # the caller's own, shorter timeout
            raise self._expire() from None
        finally:
            if bounded:
                self._sock.settimeout(prior)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        if self._phase in (_HEADERS, _BODY):
            self._phase = _RESPONSE
        limit = self._limits.send_timeout
        # The send timeout stays on for the rest of the response: a stream writes many small
        # chunks, and two mode switches per chunk would cost more than the write. gunicorn sets
        # the mode it needs itself wherever it cares (its drains, the keep-alive poller, a new
        # request); 0.0 is its non-blocking error write, left alone.
        if self._sock.gettimeout() is None:
            self._sock.settimeout(limit)
        try:
            self._sock.sendall(data, flags)
        except TimeoutError:
            log.info("closed a connection whose client took no response bytes for %g s", limit)
            # EPIPE: gthread closes the connection quietly and the app's generator is closed
            raise BrokenPipeError(errno.EPIPE, f"client took no response bytes for {limit:g} s") from None

    def _expire(self) -> RequestReadTimeout:
        phase, self._phase = self._phase, _EXPIRED
        if phase == _HEADERS:
            what, limit = "request line and headers", self._limits.header_timeout
        else:
            what, limit = "request body", self._limits.body_timeout
        return RequestReadTimeout(f"the {what} did not arrive within {limit:g} s")


_ERROR_CODES = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    413: "body_too_large",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    501: "not_implemented",
}


def json_error(status: int, reason: str, message: str, replica: str) -> bytes:
    """A whole HTTP/1.1 error answer (that closes the connection) in the app's error shape."""
    code = _ERROR_CODES.get(status, "internal_error" if status >= 500 else "http_error")
    body = json.dumps({"error": {"code": code, "message": message, "details": None}}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    if replica:
        head += f"X-Replica: {replica}\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body


class _JsonErrorPage:
    """Stands in for the client socket in `Worker.handle_error`, which decides the status and
    logs; the HTML page it writes is replaced by the JSON answer for the same status."""

    def __init__(self, client: Any, exc: BaseException, replica: str):
        self._client, self._exc, self._replica = client, exc, replica

    def gettimeout(self) -> float:
        return 0.0  # util.write_nonblock then writes straight to sendall

    def sendall(self, page: bytes) -> None:
        status_line = page.split(b"\r\n", 1)[0].decode("latin-1")  # "HTTP/1.1 400 Bad Request"
        _, status, reason = status_line.split(" ", 2)
        code = int(status)
        message = str(self._exc) if code < 500 else "the server failed to handle this request; it has been logged"
        util.write_nonblock(self._client, json_error(code, reason, message or reason, self._replica))


class GuardedThreadWorker(ThreadWorker):
    """gthread with ClientLimits; `with_limits(limits)` binds them (gunicorn.conf.py)."""

    limits: ClassVar[ClientLimits] = ClientLimits()

    def enqueue_req(self, conn: Any) -> None:
        # every connection passes here before a thread takes it: new, kept-alive, or deferred
        if not isinstance(conn.sock, GuardedSocket) and not self.cfg.is_ssl:  # TLS wraps the raw socket
            conn.sock = GuardedSocket(conn.sock, self.limits)
        if isinstance(conn.sock, GuardedSocket):
            conn.sock.begin_request()
        super().enqueue_req(conn)

    def handle_request(self, req: Any, conn: Any) -> bool:
        if isinstance(conn.sock, GuardedSocket):
            conn.sock.begin_body()
        return bool(super().handle_request(req, conn))

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, RequestReadTimeout):
            peer = addr[0] if addr else "-"
            self.log.info("request from %s timed out: %s; closing the connection", peer, exc.description)
            answer = json_error(408, "Request Timeout", str(exc.description), self.limits.replica)
            with contextlib.suppress(OSError):  # the client is gone: nothing to tell it
                util.write_nonblock(client, answer)
            return
        super().handle_error(req, _JsonErrorPage(client, exc, self.limits.replica), addr, exc)


def with_limits(limits: ClientLimits) -> type[GuardedThreadWorker]:
    """The worker class for gunicorn's `worker_class` setting, with these limits."""
    return type("GuardedThreadWorker", (GuardedThreadWorker,), {"limits": limits})
