"""`/api/v1`: the HTTP door, for host applications in any language (design.md, "The HTTP door").

Every call carries `Authorization: Bearer <token>` (API_TOKENS); no or a wrong token is the same
401 on every route, so an answer never says whether a batch exists. Submitting streams the
body (JSON, text/plain or text/csv) into a loading batch through the very Loader `submit` uses,
counting rows and hashing the request on the way; whatever refuses the request at the end (too
many rows, no valid address, a reused Idempotency-Key) removes what was written, so a refused
request leaves nothing visible.
"""
import hashlib
import json
import logging
from urllib.parse import urlsplit

from apiflask import APIBlueprint, Schema, abort
from apiflask.fields import Dict, Integer, List, Nested, String
from flask import Response, request, stream_with_context, url_for

from bouncer.doors.admission import SLICE
from bouncer.doors.loading import MAX_REPORTED_INVALID, Loader, chunks
from bouncer.doors.reader import JsonBatch, read_stream
from bouncer.errors import Conflict, InputError, MalformedInput, NotFound
from bouncer.names import CHECK_TYPES
from bouncer.reading.batches import batch_status, get_user_batch, iter_results, page_of_batches, results_csv
from bouncer.services import batches, idempotency
from bouncer.states import BatchState
from bouncer.store.database import utcnow
from bouncer.web.auth import bearer_token, token_matches
from bouncer.web.context import batch_status_or_404, bouncer_app

log = logging.getLogger(__name__)

DESCRIPTION = ("Submit lists of addresses to verify, follow them, fetch their results. Batches are "
               "verified by the queue in large, cheap batches at Bouncer; when one ends, a Standard "
               "Webhooks signed POST goes to its callback_url (or WEBHOOK_URL).")
MAX_KEY = 200
blueprint = APIBlueprint("api", __name__, url_prefix="/api/v1", tag="Batches")


def register(web):
    web.register_blueprint(blueprint)
    web.spec_processor(describe_submit_body)


# -- schemas (the OpenAPI description is made from them) --

class Counts(Schema):
    deliverable = Integer()
    risky = Integer()
    undeliverable = Integer()
    unknown = Integer()
    invalid = Integer()
    failed = Integer()
    cancelled = Integer()
    pending = Integer()


class StatusObject(Schema):
    batch_id = Integer()
    user_id = String()
    check_type = String(metadata={"enum": list(CHECK_TYPES)})
    status = String(metadata={"enum": list(BatchState)})
    total = Integer()
    done = Integer()
    counts = Nested(Counts)
    created_at = String(metadata={"format": "date-time"})
    completed_at = String(allow_none=True, metadata={"format": "date-time"})
    failure_reason = String(allow_none=True)
    webhook = Dict(allow_none=True, metadata={"description": "the latest webhook delivery, if any"})


class InvalidLine(Schema):
    line = Integer()
    email = String()
    error = String()


class Submitted(Schema):
    batch_id = Integer()
    accepted = Integer()
    invalid = Integer()
    duplicates = Integer()
    invalid_lines = List(Nested(InvalidLine), metadata={"description": "the first 10"})


class SubmitBody(Schema):
    user_id = String(required=True)
    check_type = String(required=True, metadata={"enum": list(CHECK_TYPES)})
    emails = List(String(), required=True)
    callback_url = String(metadata={"format": "uri"})


class SubmitQuery(Schema):
    user_id = String(metadata={"description": "required with a text/plain or text/csv body"})
    check_type = String(metadata={"enum": list(CHECK_TYPES)})
    callback_url = String(metadata={"format": "uri"})


class ListQuery(Schema):
    user_id = String()
    limit = Integer(load_default=50, metadata={"minimum": 1, "maximum": 500})
    before = Integer()


class ListedBatch(StatusObject):
    """A status object in a listing (a schema of its own: apispec would otherwise meet
    StatusObject twice, once nested, once as an answer)."""


class BatchList(Schema):
    batches = List(Nested(ListedBatch))
    next_before = Integer(allow_none=True)


class ResultsQuery(Schema):
    format = String(metadata={"enum": ["json", "csv"]})


class Error(Schema):
    error = String()


ERRORS = {401: "no or wrong bearer token", 503: "the API is off (API_TOKENS unset)"}


def errors(*codes):
    described = {400: "malformed", 404: "no such batch", 409: "conflict", 413: "too many rows",
                 422: "refused"}
    return {**{code: {"description": ERRORS.get(code) or described[code],
                      "content": {"application/json": {"schema": Error}}} for code in (401, 503, *codes)}}


def describe_submit_body(spec):
    """The submit route reads its body as a stream, so its three forms are described here."""
    operation = spec["paths"]["/api/v1/batches"]["post"]
    operation["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/SubmitBody"}},
        "text/plain": {"schema": {"type": "string", "description": "one address a line"}},
        "text/csv": {"schema": {"type": "string", "description": "a CSV with an `email` column"}},
    }}
    spec.setdefault("components", {}).setdefault("schemas", {})["SubmitBody"] = {
        "type": "object", "required": ["user_id", "check_type", "emails"], "properties": {
            "user_id": {"type": "string"}, "check_type": {"type": "string", "enum": list(CHECK_TYPES)},
            "emails": {"type": "array", "items": {"type": "string"}},
            "callback_url": {"type": "string", "format": "uri"}}}
    return spec


# -- authentication --

@blueprint.before_request
def authenticate():
    settings = bouncer_app().settings
    if not settings.api_tokens:
        abort(503, "the HTTP API is off: set API_TOKENS to turn it on")
    token = bearer_token(request.headers.get("Authorization"))
    if not token_matches(token, settings.api_tokens):
        abort(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
    request.token_digest = hashlib.sha256(token.encode()).hexdigest()


# -- routes --

@blueprint.get("/batches/<int:batch_id>")
@blueprint.output(StatusObject)
@blueprint.doc(summary="One user batch's status", security="BearerAuth", responses=errors(404))
def status(batch_id):
    return batch_status_or_404(batch_id)


@blueprint.post("/batches")
@blueprint.input(SubmitQuery, location="query", arg_name="query", validation=False)
@blueprint.output(Submitted, status_code=201, description="created (200: a retry with the same Idempotency-Key)")
@blueprint.doc(summary="Submit a user batch", security="BearerAuth", responses=errors(400, 409, 413, 422))
def submit(query):
    """JSON `{"user_id", "check_type", "emails": [...], "callback_url"?}`, or a text/plain or
    text/csv body with the fields as query parameters. Read as a stream."""
    return Submission(bouncer_app().settings).run()


@blueprint.get("/batches/<int:batch_id>/results")
@blueprint.input(ResultsQuery, location="query", arg_name="query")
@blueprint.doc(summary="One row per submitted row, in position order", security="BearerAuth",
               responses={200: {"description": "JSON list, or CSV with ?format=csv or Accept: text/csv",
                                "headers": {"X-Batch-Status": {"schema": {"type": "string"}}}},
                          **errors(404)})
def results(batch_id, query):
    try:
        batch = get_user_batch(batch_id)
    except NotFound:
        abort(404)
    csv_wanted = query.get("format") == "csv" or (
        query.get("format") is None and request.accept_mimetypes.best == "text/csv")
    rows = iter_results(batch_id)
    body = results_csv(rows) if csv_wanted else json_lines(rows)
    response = Response(stream_with_context(body), content_type="text/csv; charset=utf-8" if csv_wanted
                        else "application/json")
    response.headers["X-Batch-Status"] = batch.status
    return response


@blueprint.get("/batches")
@blueprint.input(ListQuery, location="query", arg_name="query")
@blueprint.output(BatchList)
@blueprint.doc(summary="User batches, newest first", security="BearerAuth")
def list_batches(query):
    limit = max(1, min(query.get("limit", 50), 500))
    page, next_before = page_of_batches(limit, user_id=query.get("user_id"), before=query.get("before"),
                                        with_webhooks=True)
    return {"batches": page, "next_before": next_before}


@blueprint.post("/batches/<int:batch_id>/cancel")
@blueprint.output(StatusObject)
@blueprint.doc(summary="Cancel a user batch", security="BearerAuth", responses=errors(404, 409),
               description="Emails not yet sent end cancelled; those in flight finish with their "
                           "verdicts; the batch becomes cancelled when its last email ends.")
def cancel(batch_id):
    try:
        batches.cancel_user_batch(bouncer_app(), batch_id)
    except NotFound:
        abort(404)
    except Conflict as exc:
        abort(409, str(exc))
    return batch_status(batch_id)


def json_lines(rows):
    yield "["
    for i, row in enumerate(rows):
        yield ("," if i else "") + "\n" + json.dumps(row, ensure_ascii=False)
    yield "\n]\n"


# -- submitting --

class Refused(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Submission:
    """One POST /api/v1/batches: stream the body into a loading batch, then decide."""

    def __init__(self, settings):
        self.settings = settings
        self.rows = 0
        self.loader = None
        self.problems = []             # (status, message), the first of each kind kept
        self.digest = hashlib.sha256()
        self.key = request.headers.get("Idempotency-Key")

    def run(self):
        if self.key is not None and not 0 < len(self.key) <= MAX_KEY:
            abort(422, "Idempotency-Key must be 1 to %d characters" % MAX_KEY)
        self.digest.update(("%s\n%s\n%s\n" % (request.path, canonical_query(), request.mimetype)).encode())
        try:
            fields, rows = self.read_body()
            self.load(fields, rows)
            return self.decide(fields)
        except Refused as refused:
            self.remove()
            abort(refused.status, str(refused))
        except BaseException:
            self.remove()
            raise

    def read_body(self):
        stream = HashingStream(request.stream, self.digest)
        kind = request.mimetype
        if kind == "application/json":
            body = JsonBatch(stream)
            try:
                body.read_fields()
            except MalformedInput as exc:
                raise Refused(400, str(exc)) from None
            return body.fields, self.json_rows(body)
        if kind in ("text/plain", "text/csv"):
            form = "csv" if kind == "text/csv" else "text"
            return dict(request.args), read_stream("body", stream, form=form)
        raise Refused(415 if kind else 400, "send application/json, text/plain or text/csv")

    def json_rows(self, body):
        try:
            yield from body.emails()
            body.finish()
        except MalformedInput as exc:
            raise Refused(400, str(exc)) from None

    def load(self, fields, rows):
        """Every row is counted; rows are written only while the request can still succeed."""
        self.loader = self.start_loader(fields)
        try:
            for chunk in chunks(rows, SLICE):
                self.rows += len(chunk)
                if self.rows > self.settings.api_max_emails:
                    self.note(413, "more than API_MAX_EMAILS (%d) rows" % self.settings.api_max_emails)
                if self.loader is not None and not self.problems:
                    self.loader.write(chunk)
        except MalformedInput as exc:
            raise Refused(400, str(exc)) from None
        except InputError as exc:
            self.note(422 if self.rows <= self.settings.api_max_emails else 413, str(exc))

    def start_loader(self, fields):
        user_id, check_type = fields.get("user_id"), fields.get("check_type")
        if user_id is None or (isinstance(user_id, str) and not user_id.strip()):
            return self.note(422, "user_id is required")
        if not isinstance(user_id, str) or not isinstance(check_type, (str, type(None))):
            return self.note(422, "user_id and check_type must be strings")
        if check_type is None:
            return self.note(422, "check_type is required: one of %s" % ", ".join(CHECK_TYPES))
        try:
            return Loader(user_id, check_type, source="api")
        except InputError as exc:
            return self.note(422, str(exc))

    def note(self, status, message):
        self.problems.append((status, message))

    def decide(self, fields):
        # In JSON, callback_url may come after the emails: it is known only now.
        callback_url = fields.get("callback_url")
        if callback_url is not None:
            problem = callback_url_problem(callback_url, self.settings)
            if problem:
                self.note(422, problem)
        if self.problems:
            # When several apply, 413 wins; otherwise the first found.
            status, message = max(self.problems, key=lambda p: p[0] == 413)
            raise Refused(status, message)
        try:
            self.loader.check_has_valid_row()
        except InputError as exc:
            raise Refused(422, str(exc)) from None
        digest = self.digest.hexdigest()
        if self.key is not None:
            replay = self.replay(digest)
            if replay is not None:
                return replay
        summary = self.loader.finish(before_visible=lambda: self.remember_key(digest), callback_url=callback_url)
        body = submitted(summary.batch_id, summary.invalid_examples)
        return body, 201, {"Location": url_for("api.status", batch_id=summary.batch_id)}

    def replay(self, digest):
        """A request already answered under this key: the same batch (200), or 409 for another
        request. Removes what this one wrote."""
        earlier = idempotency.answered_before(request.token_digest, self.key, utcnow())
        if earlier is None:
            return None
        self.remove()
        request_digest, batch_id, lines = earlier
        if request_digest != digest:
            raise Refused(409, "Idempotency-Key was used for another request in the last 24 h")
        return submitted(batch_id, lines, stored=True), 200, {"Location": url_for("api.status", batch_id=batch_id)}

    def remember_key(self, digest):
        if self.key is not None:
            idempotency.remember(request.token_digest, self.key, digest, self.loader.batch_id,
                                 invalid_lines(self.loader.invalid_examples), utcnow())

    def remove(self):
        if self.loader is not None and self.loader.summary is None:
            self.loader.remove()
            self.loader.summary = False


def submitted(batch_id, examples, stored=False):
    batch = get_user_batch(batch_id)
    return {"batch_id": batch_id, "accepted": batch.total - batch.invalid, "invalid": batch.invalid,
            "duplicates": batch.duplicates,
            "invalid_lines": examples if stored else invalid_lines(examples)}


def invalid_lines(examples):
    return [{"line": line, "email": text, "error": problem}
            for line, text, problem in examples[:MAX_REPORTED_INVALID]]


def callback_url_problem(url, settings):
    if not isinstance(url, str):
        return "callback_url must be a string"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "callback_url must be an http or https URL with a host"
    if not settings.webhook_secret:
        return "callback_url needs WEBHOOK_SECRET to be set on the service (webhooks are signed)"
    return None


def canonical_query():
    return "&".join("%s=%s" % (k, v) for k, v in sorted(request.args.items(multi=True)))


class HashingStream:
    """A binary stream that feeds what is read through a digest (the Idempotency-Key's request
    hash is taken while the body streams in)."""

    def __init__(self, stream, digest):
        self.stream, self.digest = stream, digest

    def read(self, size=-1):
        if size == 0:   # ijson probes with read(0), which werkzeug takes for a hang-up
            return b""
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def readline(self, size=-1):
        data = self.stream.readline(size)
        self.digest.update(data)
        return data

    def __iter__(self):
        return iter(self.readline, b"")

