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
import ipaddress
import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from waitress import wasyncore
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
PUBLIC_URL_CHECK_DELAY = 1     # seconds after start before this process asks its own PUBLIC_URL
PUBLIC_URL_TIMEOUT = 10
MAX_HEALTH_BODY = 64 * 1024


class JsonTooLarge(RequestEntityTooLarge):
    """waitress's 413, worded as every other error of this service: a JSON object."""

    def to_response(self, ident=None):
        body = json.dumps({"error": "request body too large: %s" % self.body}).encode()
        return "413 Request Entity Too Large", [("Content-Type", "application/json")], body


def body_limit(settings, method, path, authorization):
    """The largest body a request may send, from its request line and headers."""
    if method == "POST" and path.rstrip("/") == "/api/v1/batches" \
            and token_matches(bearer_token(authorization), settings.every_api_token):
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
    largest = app.settings.api_max_emails * BYTES_PER_ROW + SMALL_BODY if app.settings.every_api_token \
        else SMALL_BODY
    server = create_server(create_web_app(app), host=host, port=port, threads=THREADS,
                           connection_limit=CONNECTION_LIMIT, channel_timeout=idle_timeout,
                           cleanup_interval=max(1, min(30, idle_timeout)), max_request_body_size=largest,
                           ident="bouncer")
    server.channel_class = bounded_channel(app.settings)
    return server


def serve(app, port, host):
    """Serve until SIGTERM (what Heroku and Render send) or Ctrl-C, then return, so the process
    exits 0."""
    server = make_server(app, port, host)
    signal.signal(signal.SIGTERM, stop_serving)
    log.info("Web process listening on %s:%s", server.effective_host, server.effective_port)
    if names_this_machine(app.settings.public_url):
        threading.Thread(target=check_public_url, args=(app.settings.public_url,), daemon=True,
                         name="public-url-check").start()
    try:
        server.run()
    finally:
        server.close()
    log.info("Web process stopped")


def names_this_machine(url):
    """Whether `url` is a loopback URL: a local run's PUBLIC_URL. A public one is not asked from
    inside (a platform's router or a firewall may well not loop back, and say nothing of Bouncer)."""
    host = urlsplit(url).hostname if url else None
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_public_url(public_url, delay=PUBLIC_URL_CHECK_DELAY):
    """Once, as the web process comes up: does this service answer at PUBLIC_URL? If not,
    Bouncer's completion callbacks go nowhere and every batch waits for the next poll, which
    nothing else would say (a local run whose web process is on another port, say)."""
    time.sleep(delay)     # the server's loop is running by then
    try:
        with urllib.request.urlopen(public_url + "/health", timeout=PUBLIC_URL_TIMEOUT) as answer:
            body = answer.read(MAX_HEALTH_BODY)
    except urllib.error.HTTPError as answer:   # 503: degraded, but it is this service answering
        body = answer.read(MAX_HEALTH_BODY)
    except (OSError, ValueError) as exc:
        log.error("PUBLIC_URL=%s does not answer (%s): Bouncer's completion callbacks will go nowhere "
                  "and batches wait for the next status poll. Is the web process on that port? "
                  "(`honcho start` gives it $PORT, 5000 unless .env sets PORT)", public_url, exc)
        return
    if not is_health_answer(body):
        log.error("PUBLIC_URL=%s is answered by something other than this service: Bouncer's completion "
                  "callbacks will go there. Point it at this web process", public_url)


def is_health_answer(body):
    try:
        return json.loads(body).get("status") in ("ok", "degraded")
    except (ValueError, AttributeError):
        return False


def stop_serving(signum, frame):
    # waitress's loop ends on SystemExit and then shuts its worker threads down.
    raise SystemExit(0)


def stop_server(server, thread, timeout=10):
    """Stop a server whose loop runs in `thread`, from another thread. The worker threads stop
    first, each once its request is answered (an answer wakes the loop through the trigger:
    with the trigger closed, `OSError: Bad file descriptor` in that worker). Then the loop
    closes its sockets itself, between two polls (closing them from here would pull them from
    under the poll it is in), and ends, having nothing left to watch."""
    server.task_dispatcher.shutdown(timeout=timeout)
    server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
    thread.join(timeout)
