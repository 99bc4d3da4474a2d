"""Serving the web application with waitress.

Why waitress: its main loop reads every request whole, asynchronously, before a worker thread
sees it, so slow or idle clients never hold a thread (gunicorn's threaded worker gives a new
connection a thread for up to 5 s while it waits for data: 105 idle connections would stall
/health for a minute). What that costs, a body buffered before the application sees it, is
bounded per route here: the parser refuses, from the request line and headers alone, a body
longer than its route takes, before reading it. Only an API submit with a valid token may be
large (API_MAX_EMAILS rows); everything else gets SMALL_BODY. Idle connections are closed after
IDLE_TIMEOUT; at most CONNECTION_LIMIT are open at once.
"""
import copy
import json
import logging
import signal

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import create_server
from waitress.utilities import RequestEntityTooLarge

from bouncer.web.application import create_web_app
from bouncer.web.auth import bearer_token, token_matches

log = logging.getLogger(__name__)

THREADS = 8
CONNECTION_LIMIT = 1000
IDLE_TIMEOUT = 30          # seconds an idle connection is kept (waitress's default is 120)
SMALL_BODY = 64 * 1024
BYTES_PER_ROW = 400        # an address of up to 320 characters, quoted, with a comma and slack


class JsonTooLarge(RequestEntityTooLarge):
    """waitress's 413, worded as every other error of this service: a JSON object."""

    def to_response(self, ident=None):
        body = json.dumps({"error": "request body too large: %s" % self.body}).encode()
        return "413 Request Entity Too Large", [("Content-Type", "application/json")], body


def body_limit(settings, method, path, authorization):
    """The largest body a request may send, from its request line and headers."""
    if method == "POST" and path.rstrip("/") == "/api/v1/batches" \
            and token_matches(bearer_token(authorization), settings.api_tokens):
        return settings.api_max_emails * BYTES_PER_ROW + SMALL_BODY
    return SMALL_BODY


def bounded_channel(settings):
    """waitress's channel, with a parser that applies `body_limit` to each request."""

    class BoundedParser(HTTPRequestParser):
        def __init__(self, adj):
            # Each request gets its own copy of the limits, so one request's bound is its own.
            super().__init__(copy.copy(adj))

        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            limit = body_limit(settings, self.command, self.path, self.headers.get("AUTHORIZATION"))
            self.adj.max_request_body_size = limit
            if self.content_length > limit:
                self.error = JsonTooLarge("more than %d bytes" % limit)
                self.completed = True

        def received(self, data):
            consumed = super().received(data)
            if type(self.error) is RequestEntityTooLarge:   # a chunked body ran over its bound
                self.error = JsonTooLarge("more than %d bytes" % self.adj.max_request_body_size)
            return consumed

    class BoundedChannel(HTTPChannel):
        parser_class = BoundedParser

    return BoundedChannel


def make_server(app, port, host="0.0.0.0", idle_timeout=IDLE_TIMEOUT):
    """The waitress server of the web application, bounded, not yet running."""
    largest = app.settings.api_max_emails * BYTES_PER_ROW + SMALL_BODY if app.settings.api_tokens else SMALL_BODY
    server = create_server(create_web_app(app), host=host, port=port, threads=THREADS,
                           connection_limit=CONNECTION_LIMIT, channel_timeout=idle_timeout,
                           cleanup_interval=max(1, min(30, idle_timeout)), max_request_body_size=largest,
                           ident="bouncer")
    server.channel_class = bounded_channel(app.settings)
    return server


def serve(app, port, host="0.0.0.0"):
    """Serve until SIGTERM (what Heroku and Render send) or Ctrl-C, then return, so the process
    exits 0."""
    server = make_server(app, port, host)
    signal.signal(signal.SIGTERM, stop_serving)
    log.info("Web process listening on %s:%s", server.effective_host, server.effective_port)
    try:
        server.run()
    finally:
        server.close()
    log.info("Web process stopped")


def stop_serving(signum, frame):
    # waitress's loop ends on SystemExit and then shuts its worker threads down.
    raise SystemExit(0)
