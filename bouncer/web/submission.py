"""One POST /api/v1/batches: the body streams into a loading batch through the very Loader
`submit` uses, counting rows and hashing the request on the way; whatever refuses the request at
the end (too many rows, no valid address, a reused Idempotency-Key) removes what was written, so a
refused request leaves nothing visible."""

import hashlib
import logging
import time

from apiflask import abort
from flask import request, url_for
from peewee import IntegrityError

from bouncer.doors.admission import SLICE, is_admitted
from bouncer.doors.loading import MAX_REPORTED_INVALID, Loader, chunks
from bouncer.doors.reader import JsonBatch, read_stream
from bouncer.errors import InputError, MalformedInput
from bouncer.names import CHECK_TYPES
from bouncer.news import targets
from bouncer.reading.batches import get_user_batch
from bouncer.services import idempotency
from bouncer.store.database import utcnow
from bouncer.web.tenants import caller

log = logging.getLogger(__name__)

MAX_KEY = 200
REPLAY_WAIT = 60           # seconds a retry waits for the first request's batch to be admitted
ADMISSION_POLL = 0.1
MAX_LINE = 1024 * 1024     # bytes of one line of a text or CSV body


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
            except InputError as exc:
                raise Refused(422, str(exc)) from None
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
            return Loader(user_id, check_type, source="api", api_token_digest=caller().token_digest)
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
        try:
            summary = self.loader.finish(before_visible=lambda: self.remember_key(digest), callback_url=callback_url)
        except IntegrityError:
            # Another request with this key made its batch visible first (the key's unique
            # index refused this one's): answer as it did.
            answer = self.replay(digest) if self.key is not None else None
            if answer is None:
                raise
            return answer
        body = submitted(summary.batch_id, summary.invalid_examples)
        return body, 201, {"Location": url_for("api.status", batch_id=summary.batch_id)}

    def replay(self, digest):
        """A request already answered under this key: the same batch (200), or 409 for another
        request. Removes what this one wrote. The answer waits until the batch is admitted,
        when its counts are those the first request answered with."""
        earlier = idempotency.answered_before(caller().token_digest, self.key, utcnow())
        if earlier is None:
            return None
        self.remove()
        request_digest, batch_id, lines = earlier
        if request_digest != digest:
            raise Refused(409, "Idempotency-Key was used for another request in the last 24 h")
        wait_for_admission(batch_id)
        return submitted(batch_id, lines, stored=True), 200, {"Location": url_for("api.status", batch_id=batch_id)}

    def remember_key(self, digest):
        if self.key is not None:
            idempotency.remember(caller().token_digest, self.key, digest, self.loader.batch_id,
                                 invalid_lines(self.loader.invalid_examples), utcnow())

    def remove(self):
        if self.loader is not None and self.loader.summary is None:
            self.loader.remove()
            self.loader.summary = False


def wait_for_admission(batch_id):
    """Until the batch is admitted (its first request's loader admits it as it answers); a 503
    to retry after REPLAY_WAIT, should that loader have died and left it to a cycle."""
    deadline = time.monotonic() + REPLAY_WAIT
    while not is_admitted(batch_id):
        if time.monotonic() > deadline:
            abort(503, "the batch of this Idempotency-Key is still being admitted; retry in a minute",
                  headers={"Retry-After": str(REPLAY_WAIT)})
        time.sleep(ADMISSION_POLL)


def submitted(batch_id, examples, stored=False):
    batch = get_user_batch(batch_id)
    return {"batch_id": batch_id, "accepted": batch.total - batch.invalid, "invalid": batch.invalid,
            "duplicates": batch.duplicates,
            "invalid_lines": examples if stored else invalid_lines(examples)}


def invalid_lines(examples):
    return [{"line": line, "email": text, "error": problem}
            for line, text, problem in examples[:MAX_REPORTED_INVALID]]


def callback_url_problem(url, settings):
    problem = targets.url_problem(url)
    if problem is None and not settings.webhook_secret:
        return "callback_url needs WEBHOOK_SECRET to be set on the service (webhooks are signed)"
    return problem or targets.submit_problem(url, settings.webhook_allow_private)


def canonical_query():
    return "&".join("%s=%s" % (k, v) for k, v in sorted(request.args.items(multi=True)))


class HashingStream:
    """A binary stream that feeds what is read through a digest (the Idempotency-Key's request
    hash is taken while the body streams in). A line is read whole, so a text or CSV line longer
    than MAX_LINE is refused rather than held: a body with no newline would be one line."""

    def __init__(self, stream, digest):
        self.stream, self.digest = stream, digest
        self.lines = 0

    def read(self, size=-1):
        if size == 0:   # ijson probes with read(0), which werkzeug takes for a hang-up
            return b""
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def readline(self, size=-1):
        data = self.stream.readline(MAX_LINE + 1 if size < 0 else min(size, MAX_LINE + 1))
        self.lines += 1
        if len(data) > MAX_LINE:
            raise InputError("body: line %d is longer than %d bytes; no address is" % (self.lines, MAX_LINE))
        self.digest.update(data)
        return data

    def __iter__(self):
        return iter(self.readline, b"")

