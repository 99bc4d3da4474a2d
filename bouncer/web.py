"""The web process: `GET /health` for the platform and people, and the URL Bouncer calls when a
batch is done. A plain WSGI application served by waitress; no framework for two routes.

Every answer is JSON and never cached. The callback secret is part of a URL, so it is compared
in constant time, never logged, and a wrong one looks exactly like a route that does not exist.
"""
import datetime
import hmac
import json
import logging
import signal
import threading
import time
from collections import namedtuple

from redis.exceptions import RedisError
from waitress.server import create_server

from .config import CHECK_TYPES
from .cycles import STATUS, run_now
from .db import connection, utcnow
from .jobs import job_definitions, last_successes
from .masking import MASK, mask_secrets, redact_url
from .reports import queue_overview

log = logging.getLogger(__name__)

THREADS = 4
OVERDUE_INTERVALS = 5      # a job this many intervals late (plus the grace) is overdue
# Room for a slow cycle or a scheduler restart, and for the lock of a killed cycle to expire
# (LOCK_TIMEOUT, 60 s): until then every run of that job is skipped, which is not a fault.
GRACE_SECONDS = 90
CHECK_TIMEOUT = 5          # seconds /health waits for the database and Redis, together
MAX_CALLBACK_BODY = 64 * 1024

Reply = namedtuple("Reply", "status body headers", defaults=((),))
NOT_FOUND = Reply(404, {"error": "not found"})
REASONS = {200: "OK", 202: "Accepted", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error", 503: "Service Unavailable"}


# -- serving --

def serve(app, port):
    """Serve on 0.0.0.0:`port` until SIGTERM (what Heroku and Render send) or Ctrl-C, then
    return, so the process exits 0."""
    server = create_server(make_app(app), host="0.0.0.0", port=port, threads=THREADS)
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


def make_app(app, started_at=None):
    """The WSGI application over `app`. `started_at` (naive UTC, default now) is when this web
    process came up; /health uses it for jobs that have never succeeded."""
    started_at = started_at or utcnow()

    def application(environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        try:
            reply = route(app, started_at, environ)
        except Exception:
            log.exception("%s %s failed", method, masked_path(path, app.settings))
            reply = Reply(500, {"error": "internal error"})
        log.info("%s %s %d", method, masked_path(path, app.settings), reply.status)
        return respond(start_response, reply, send_body=method != "HEAD")

    return application


def respond(start_response, reply, send_body=True):
    body = json.dumps(reply.body).encode()
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
               ("Content-Length", str(len(body)))] + list(reply.headers)
    start_response("%d %s" % (reply.status, REASONS[reply.status]), headers)
    return [body] if send_body else []


def route(app, started_at, environ):
    method, parts = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").split("/")[1:]
    if parts == ["health"]:
        if method not in ("GET", "HEAD"):
            return method_not_allowed("GET, HEAD")
        return health(app, started_at)
    if is_callback_path(parts):
        return callback(app, environ, parts[2], parts[3:])
    return NOT_FOUND


def method_not_allowed(allowed):
    return Reply(405, {"error": "method not allowed"}, (("Allow", allowed),))


def is_callback_path(parts):
    return parts[:2] == ["bouncer", "callback"] and len(parts) in (3, 4)


def masked_path(path, settings):
    """The path fit for a log line: the callback's secret segment (right or wrong: a wrong one
    may be an old secret) and any secret of the settings elsewhere are replaced."""
    parts = path.split("/")
    if parts[1:3] == ["bouncer", "callback"] and len(parts) > 3:
        parts[3] = MASK
    return scrub("/".join(parts), settings)


# -- GET /health --

def health(app, started_at, now=None):
    """200 when the database and Redis answer and no job is overdue; 503 (status `degraded`)
    otherwise. A section whose source did not answer is null."""
    database, redis, overview, successes = run_checks(app)
    jobs = None
    if successes is not None:
        jobs = job_health(job_definitions(app.settings), successes, now or utcnow(), started_at)
    healthy = database["ok"] and redis["ok"] and not any_overdue(jobs)
    return Reply(200 if healthy else 503, {
        "status": "ok" if healthy else "degraded",
        "database": database,
        "redis": redis,
        "jobs": jobs,
        "check_types": overview["check_types"] if overview else None,
        "rate_limit": overview["rate_limit"] if overview else None,
    })


def any_overdue(jobs):
    return any(job["overdue"] for job in (jobs or {}).values())


def run_checks(app):
    """Ask the database and Redis at once, each in its own thread, so a server that hangs
    delays the answer by at most CHECK_TIMEOUT whatever the drivers' own timeouts."""
    deadline = time.monotonic() + CHECK_TIMEOUT
    database = Probe(read_overview, app.settings)
    redis = Probe(last_successes, app.redis)
    database_status, overview = database.outcome(deadline, app.settings)
    redis_status, successes = redis.outcome(deadline, app.settings)
    return database_status, redis_status, overview, successes


def read_overview(settings):
    # Its own connection, closed after: a restarted database costs one failed check, no more.
    with connection():
        return queue_overview(settings)


class Probe:
    """One check running in a daemon thread. A check still stuck at the deadline is abandoned:
    it ends on its own once the driver gives up, and never holds the process open."""

    def __init__(self, check, *args):
        self.value = self.error = None
        self.thread = threading.Thread(target=self.run, args=(check,) + args, daemon=True,
                                       name="health-%s" % check.__name__)
        self.thread.start()

    def run(self, check, *args):
        try:
            self.value = check(*args)
        except Exception as exc:
            self.error = exc

    def outcome(self, deadline, settings):
        """({"ok": bool, "error"?: str}, value or None)."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            return {"ok": False, "error": "no answer within %ss" % CHECK_TIMEOUT}, None
        if self.error is not None:
            return {"ok": False, "error": describe_error(self.error, settings)}, None
        return {"ok": True}, self.value


def describe_error(exc, settings):
    """One line about `exc`, with every secret the settings hold replaced."""
    lines = str(exc).strip().splitlines()
    text = "%s: %s" % (type(exc).__name__, lines[0]) if lines else type(exc).__name__
    return scrub(text, settings)


def scrub(text, settings):
    for url in (settings.database_url, settings.redis_url):
        text = text.replace(url, redact_url(url))
    return mask_secrets(text, settings.secrets())


def job_health(definitions, successes, now, started_at):
    """{job id: its health} for the jobs of `definitions` (see jobs.job_definitions).

    A job is overdue when its last success is older than OVERDUE_INTERVALS intervals plus
    GRACE_SECONDS. A job that has never succeeded (a new Redis, a first deploy) is overdue only
    once this web process has been up longer than that same window, so a fresh deploy is not
    reported broken before the jobs had a chance to run."""
    return {job_id: one_job_health(interval, parse_time(successes.get(job_id)), now, started_at)
            for job_id, (_, _, interval) in definitions.items()}


def one_job_health(interval, last_success, now, started_at):
    window = OVERDUE_INTERVALS * interval + GRACE_SECONDS
    if last_success is None:
        return {"interval": interval, "last_success": None, "age_seconds": None,
                "overdue": (now - started_at).total_seconds() > window}
    age = (now - last_success).total_seconds()
    return {"interval": interval, "last_success": last_success.isoformat() + "Z",
            "age_seconds": round(age, 1), "overdue": age > window}


def parse_time(value):
    """A recorded ISO time as naive UTC; None when absent or unreadable (never succeeded)."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return parsed


# -- /bouncer/callback/<secret>[/<check_type>] --

def callback(app, environ, secret, rest):
    """Bouncer says a batch is done: run a status cycle now instead of at the next poll. The
    payload is undocumented, so it is only a hint: the cycle asks Bouncer about every
    outstanding batch anyway, and polling still covers a callback that never comes."""
    check_types = callback_check_types(rest)
    if not (check_types and secret_matches(app.settings.callback_secret, secret)):
        return NOT_FOUND
    if environ["REQUEST_METHOD"] not in ("POST", "GET"):
        return method_not_allowed("POST, GET")
    discard_body(environ)
    try:
        for check_type in check_types:
            run_now(app.redis, STATUS, check_type)
    except RedisError as exc:
        log.warning("Callback: cannot queue a status check (%s); polling will pick the batch up",
                    describe_error(exc, app.settings))
        return Reply(503, {"error": "queue unavailable"})
    return Reply(202, {"queued": list(check_types)})


def callback_check_types(rest):
    """The check types a callback path names: all without a segment, none for an unknown one."""
    if not rest:
        return CHECK_TYPES
    return (rest[0],) if rest[0] in CHECK_TYPES else ()


def secret_matches(expected, given):
    if not expected:
        return False
    # PATH_INFO is WSGI's latin-1 view of the raw bytes; the secret's bytes are its UTF-8.
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("latin-1"))


def discard_body(environ):
    # Read (a bounded part of) what Bouncer sent, so the connection stays usable; it is ignored.
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > 0:
        environ["wsgi.input"].read(min(length, MAX_CALLBACK_BODY))


