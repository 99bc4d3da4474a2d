"""`GET /health` for the platform and people, and the URL Bouncer calls when a batch is done.

The callback secret is part of a URL, so it is compared in constant time, never logged, and a
wrong one looks exactly like a route that does not exist.
"""

import hmac
import json
import logging
import re

from apiflask import APIBlueprint, abort
from flask import request
from redis.exceptions import RedisError

from bouncer.cycles.triggers import note_called_back, run_now
from bouncer.names import CHECK_TYPES, STATUS
from bouncer.queue.ledger import recognise_from_callback
from bouncer.reading.health import describe_error, service_health
from bouncer.web.context import bouncer_app, started_at

log = logging.getLogger(__name__)


MAX_CALLBACK_BODY = 64 * 1024
MAX_ID_DIGITS = 18          # a ledger id fits a signed 64-bit integer
MAX_CALLBACK_DEPTH = 8      # Bouncer's payload is a flat object; a little room for what it may add
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
BRACKETS = re.compile(rb"[\[\]{}]")


blueprint = APIBlueprint("service", __name__, enable_openapi=False)


def register(web):
    web.register_blueprint(blueprint)


@blueprint.route("/health", methods=["GET", "HEAD"])
def health():
    """200 when the database and Redis answer and no job is overdue; 503 otherwise."""
    healthy, answer = service_health(bouncer_app(), started_at())
    return answer, 200 if healthy else 503


@blueprint.route("/bouncer/callback/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def callback(rest):
    """Bouncer says a batch is done: run a status cycle now instead of at the next poll, checking
    first the batch the URL names (the reservation our create gave it). The payload is
    undocumented, so it is only a hint: the cycle asks Bouncer about every outstanding batch
    anyway, and polling still covers a callback that never comes."""
    app = bouncer_app()
    secret, _, tail = rest.partition("/")
    check_types = callback_check_types(tail)
    if not (check_types and secret_matches(app.settings.callback_secret, secret)):
        abort(404)
    if request.method not in ("POST", "GET"):
        abort(405, headers={"Allow": "POST, GET"})
    reservation = reservation_named()
    body = request.stream.read(MAX_CALLBACK_BODY)
    if nesting_depth(body) > MAX_CALLBACK_DEPTH:
        abort(400, "the body nests deeper than %d levels" % MAX_CALLBACK_DEPTH)
    recognise_reservation(reservation, body)
    try:
        for check_type in check_types:
            if reservation is not None:
                note_called_back(app.redis, check_type, reservation)
            run_now(app.redis, STATUS, check_type)
    except Exception as exc:
        if not is_redis_error(exc):
            raise
        log.warning("Callback: cannot queue a status check (%s); polling will pick the batch up",
                    describe_error(exc, app.settings))
        abort(503, "queue unavailable")
    return {"queued": list(check_types)}, 202


def reservation_named():
    """The ledger id in the callback URL's `reservation` (our create put it there), or None."""
    text = request.args.get("reservation", "")
    if text.isascii() and text.isdigit() and len(text) <= MAX_ID_DIGITS:
        return int(text)
    return None


def recognise_reservation(reservation, body):
    """A callback naming a reservation whose create went unanswered tells its batch id: the
    batch is followed rather than sent again. The payload is undocumented, so it is read
    leniently (a JSON object with a batch id under a likely name) and ignored otherwise."""

    if reservation is None:
        return
    try:
        payload = json.loads(body)
    except ValueError:
        return
    if not isinstance(payload, dict):
        return
    bouncer_id = next((payload[k] for k in ("batchId", "batch_id", "id") if isinstance(payload.get(k), str)), None)
    if bouncer_id and len(bouncer_id) <= 100:
        recognise_from_callback(reservation, bouncer_id.strip())


def nesting_depth(body):
    """How deep a JSON text nests, found without parsing it (a parser takes memory or stack
    for each level): its brackets counted, its strings left out."""
    depth = deepest = 0
    for bracket in BRACKETS.finditer(JSON_STRING.sub(b"", body)):
        depth += 1 if bracket.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def is_redis_error(exc):
    return isinstance(exc, RedisError)


def callback_check_types(tail):
    """The check types a callback path names: all without a segment, none for an unknown one."""
    if not tail:
        return CHECK_TYPES
    return (tail,) if tail in CHECK_TYPES else ()


def secret_matches(expected, given):
    if not expected:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))

