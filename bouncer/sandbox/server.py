"""The simulator's two transports: real HTTP on a loopback port, or `responses` at a base URL.

Over HTTP (`start()`, `serve_forever()`), one ThreadingHTTPServer hands every request to the
simulator's `answer`. Behind `responses` (`behind_responses(url)`), the same `answer` serves
requests made with `requests`, in-process. Either way the batches, faults and controls are the
simulator's, so a test reads and steers Bouncer the same way whichever it talks to.

`responses` is imported only by the adapter: the product does not depend on it at run time.
"""
import logging
import re
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Event, Thread
from urllib.parse import parse_qs, urlsplit

from bouncer.sandbox.simulator import DELAYED_FAULTS, Simulator

logger = logging.getLogger("bouncer.sandbox")

HOST = "127.0.0.1"
# A short poll keeps stop() quick: shutdown waits for the serving loop's next wake-up.
POLL_INTERVAL = 0.05
MOCKED_METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH")


class Sandbox(Simulator):
    """The simulator, served over HTTP on 127.0.0.1 (start() from a daemon thread, serve_forever()
    in the foreground) or behind `responses` (behind_responses(url))."""

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.port = self.options.port
        self._server = None
        self._thread = None
        self._serving = Event()

    @property
    def url(self):
        return "http://%s:%d" % (HOST, self.port)

    def start(self):
        self._bind()
        self._thread = Thread(target=self.serve_forever, name="bouncer-sandbox", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        server = self._bind()
        logger.debug("sandbox serving on %s", self.url)
        self._serving.set()
        try:
            server.serve_forever(poll_interval=POLL_INTERVAL)
        finally:
            self._serving.clear()

    def stop(self):
        self.close()
        server, self._server = self._server, None
        if server is None:
            return
        if self._serving.is_set():
            server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        server.server_close()
        logger.debug("sandbox on %s stopped", self.url)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _bind(self):
        if self._server is None:
            self._server = _Server((HOST, self.port), self)
            self.port = self._server.server_address[1]
        return self._server

    @contextmanager
    def behind_responses(self, base_url):
        """Serve `requests` calls to `base_url` from this simulator for the `with` block."""
        import responses
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            serve_behind_responses(self, base_url, mock)
            # Loopback is left to real HTTP: a test's own receivers (webhooks) answer there.
            mock.add_passthru(re.compile(r"http://(127\.0\.0\.1|localhost)[:/]"))
            try:
                yield self
            finally:
                self.close()


# ---------------------------------------------------------------------------------------------
# Behind `responses`


def serve_behind_responses(simulator, base_url, mock):
    """Answer every request to `base_url` made through the active responses mock `mock`."""
    base = re.compile(re.escape(base_url.rstrip("/")) + r"([/?].*)?$")
    for method in MOCKED_METHODS:
        mock.add_callback(method, base, callback=lambda request: answer_mocked(simulator, request),
                          content_type=None)


def answer_mocked(simulator, request):
    """(status, headers, body) for one request seen by `responses`, or the exception it raises.

    A delayed answer the client would not wait for (a "timeout" fault, or a slow one at least as
    long as the request's read timeout) is requests' ReadTimeout, raised at once: the request was
    acted on all the same, as Bouncer would. A shorter slow answer comes after its delay.
    """
    from requests.exceptions import ReadTimeout
    parts = urlsplit(request.url)
    reply = simulator.answer(request.method, parts.path, parse_qs(parts.query),
                             request.headers.get("x-api-key"), request_body(request),
                             wait=no_wait)
    if reply.error is not None:
        raise reply.error("injected %s" % reply.error.__name__)
    if reply.fault in DELAYED_FAULTS:
        delay, timeout = simulator.options.slow_seconds, read_timeout(request)
        if reply.fault == "timeout" or (timeout is not None and delay >= timeout):
            raise ReadTimeout("injected read timeout: no answer within %ss" % (timeout or delay))
        time.sleep(delay)
    return reply.status, {"Content-Type": reply.content_type}, reply.body


def no_wait(seconds):
    # Behind `responses` a delay is played out after Bouncer acted, see answer_mocked.
    pass


def request_body(request):
    body = request.body
    if body is None:
        return b""
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def read_timeout(request):
    """The read timeout `requests` was given for this call, or None."""
    timeout = getattr(request, "req_kwargs", {}).get("timeout")
    if isinstance(timeout, tuple):
        return timeout[1]
    return timeout


# ---------------------------------------------------------------------------------------------
# Over HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, sandbox):
        self.sandbox = sandbox
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        # A client that hangs up mid-request is normal under fault injection; stay quiet.
        logger.debug("sandbox: error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "BouncerSandbox/1.0"

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def log_message(self, format, *args):
        logger.debug("sandbox %s: " + format, self.address_string(), *args)

    def _serve(self, method):
        arrived = time.time()
        parts = urlsplit(self.path)
        # Read the whole body first, even for a faulted answer: closing on unread data makes the
        # kernel reset the connection and the client would never see the answer.
        body = self._read_body()
        reply = self.server.sandbox.answer(method, parts.path, parse_qs(parts.query),
                                           self.headers.get("x-api-key"), body, arrived=arrived)
        if reply.error is not None:
            # A request that never reached Bouncer: no answer at all.
            self.close_connection = True
            return
        self._write(reply)

    def _read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _write(self, reply):
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("sandbox: client went away before the answer")
