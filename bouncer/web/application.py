"""The APIFlask application: its blueprints, JSON errors everywhere, one log line per request
with secrets masked, a database connection per request."""
import logging
import re

from apiflask import APIFlask
from flask import request
from peewee import PeeweeException

from bouncer import __version__
from bouncer.masking import MASK, mask_secrets
from bouncer.reading.health import describe_error
from bouncer.store.database import database, utcnow
from bouncer.web import api, console, metrics, platform
from bouncer.web.context import bouncer_app

log = logging.getLogger("bouncer.web")

MAX_LOGGED_PATH = 200       # a 250 KB path must not become a 250 KB log line
CALLBACK_PREFIX = "/bouncer/callback/"
NO_SCHEMA = re.compile(r"no such table|relation .* does not exist")


def create_web_app(app, started_at=None):
    """The WSGI application over `app` (settings, Redis, the client). `started_at` (naive UTC,
    default now) is when this process came up; /health uses it for jobs never seen to succeed."""
    web = APIFlask("bouncer", title="Bouncer verification queue", version=__version__,
                   spec_path="/api/v1/openapi.json", docs_path=None, openapi_blueprint_url_prefix=None)
    web.config.update(
        JSON_SORT_KEYS=False, SPEC_FORMAT="json", AUTO_SERVERS=False,
        INFO={"description": api.DESCRIPTION},
        SECURITY_SCHEMES={"BearerAuth": {"type": "http", "scheme": "bearer"}},
        SECRET_KEY=None,
    )
    web.url_map.merge_slashes = False     # /bouncer/callback//x is not found, not redirected
    web.extensions["bouncer"] = app
    web.extensions["bouncer.started_at"] = started_at or utcnow()
    web.error_processor(json_error)
    web.register_error_handler(PeeweeException, database_unavailable)
    web.teardown_request(close_connection)
    web.after_request(log_request)
    web.after_request(never_cache)
    for module in (platform, api, console, metrics):
        module.register(web)
    return web


def json_error(error):
    """Every error is `{"error": "<one line>"}`, whatever raised it."""
    message = error.message if isinstance(error.message, str) else "error"
    if error.detail:       # a query parameter refused by its schema: which, and why
        message = describe_invalid(error.detail)
    if error.status_code == 404:
        message = "not found"
    elif error.status_code == 405:
        message = "method not allowed"
    body = {"error": message}
    body.update(error.extra_data or {})
    return body, error.status_code, error.headers


def describe_invalid(detail):
    """`{"query": {"format": ["Must be one of: json, csv."]}}` -> "format: must be one of: json, csv"."""
    problems = []
    for fields in detail.values():
        for name, messages in fields.items():
            text = " ".join(messages) if isinstance(messages, list) else str(messages)
            problems.append("%s: %s" % (name, text[:1].lower() + text[1:].rstrip(".")))
    return "; ".join(problems) or "invalid request"


def database_unavailable(error):
    """A database that does not answer, or has no schema yet, is a one-line 503 on every route.
    What the driver said (a host, a port, a database's name) goes to the log, not the answer."""
    detail = describe_error(error, bouncer_app().settings)
    if NO_SCHEMA.search(detail):
        message = "the database has no schema yet: run `python -m bouncer init-db`"
    else:
        message = "the database does not answer"
    log.warning("%s %s: %s: %s", request.method, masked_path(request.path, bouncer_app().settings), message, detail)
    return {"error": message}, 503


def close_connection(exc):
    """A request's queries open the connection on first use; it is closed after, errors
    included, so a restarted database costs one failed request, no more."""
    if not database.is_closed() and not database.in_transaction():
        database.close()


def never_cache(response):
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def log_request(response):
    log.info("%s %s %d", request.method, masked_path(request.path, bouncer_app().settings),
             response.status_code)
    return response


def masked_path(path, settings):
    """The path fit for a log line: everything after the callback prefix masked (a wrong secret
    may be an old one), any secret of the settings masked elsewhere, and cut short."""
    if path.startswith(CALLBACK_PREFIX):
        path = CALLBACK_PREFIX + MASK
    path = mask_secrets(path, settings.secrets())
    return path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "..."
