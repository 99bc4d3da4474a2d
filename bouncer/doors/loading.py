"""Loading: how `submit`, `create_user_batch` and the HTTP API write a user batch.

A `Loader` writes the rows in committed slices while the batch is `loading` (invisible to the
queue, so a million rows never hold the database for long), then makes it visible in one step
and admits it at once, to report what it holds. A loader that dies is told from a slow one by
its heartbeat; admission removes what a dead one wrote.
"""

import logging
from dataclasses import dataclass, field

from bouncer.doors import admission
from bouncer.doors.admission import MAX_STORED_EMAIL, SLICE, admit_batch, remove_loading_batch
from bouncer.errors import InputError
from bouncer.logs import ids
from bouncer.names import CHECK_TYPES
from bouncer.queue.line import take_places
from bouncer.states import BatchState
from bouncer.store.bulk import insert_tuples
from bouncer.store.database import utcnow, write_transaction
from bouncer.store.models import UserBatch, UserBatchEmail

log = logging.getLogger(__name__)

Row = UserBatchEmail
MAX_REPORTED_INVALID = 10     # invalid rows named back to the submitter


MAX_USER_ID = 200
MAX_ECHO = 80                 # characters of a submitted value echoed in a message


@dataclass
class SubmitSummary:
    batch_id: int
    accepted: int = 0
    invalid: int = 0
    duplicates: int = 0
    invalid_examples: list = field(default_factory=list)   # (line, address, why), the first few

    def as_json(self):
        return {"batch_id": self.batch_id, "accepted": self.accepted,
                "invalid": self.invalid, "duplicates": self.duplicates}


def create_user_batch(user_id, check_type, emails, now=None, on_progress=None, source="library",
                      callback_url=None, api_token_digest=None):
    """Create one user batch from `emails` and return its SubmitSummary, once it is admitted.

    `emails` is any iterable of address strings, or of `(line_number, address)` pairs (line
    numbers then name the invalid rows); `api_token_digest`, the API token it belongs to (none:
    only an operator-level token sees it). Raises InputError, leaving nothing visible, for an
    unknown check type, a bad user id, or input without a single valid address."""
    loader = Loader(user_id, check_type, source=source, callback_url=callback_url, now=now,
                    api_token_digest=api_token_digest)
    with loader:
        for chunk in chunks(numbered(emails), SLICE):
            loader.write(chunk)
            if on_progress:
                on_progress(len(chunk))
        loader.check_has_valid_row()
        return loader.finish()


class Loader:
    """Writes one user batch in committed slices while it is `loading`. `finish()` makes it
    visible and admits it; leaving the `with` block any other way removes what was written.
    A loader that died (kill -9) is told from a slow one by its heartbeat (`loader_seen_at`,
    renewed with every slice): after DEAD_LOADER_AFTER of silence a cycle removes its rows."""

    def __init__(self, user_id, check_type, source, callback_url=None, now=None, api_token_digest=None):
        check_submission(user_id, check_type)
        self.check_type = check_type
        self.rows = 0
        self.summary = None
        self.valid = 0
        self.checked = bytearray()   # by position - 1: 1 where the row is a valid address
        self.invalid_examples = []
        self.invalid = 0
        now = now or utcnow()
        with write_transaction():
            self.batch = UserBatch.create(user_id=str(user_id).strip(), check_type=check_type,
                                          status=BatchState.LOADING, source=source, callback_url=callback_url,
                                          created_at=now, loader_seen_at=now, api_token_digest=api_token_digest)
        self.batch_id = self.batch.id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.summary is None:
            try:
                self.remove()
            except Exception as failure:
                # The database that failed the load may fail its removal too (a full disk): the
                # batch stays invisible, and a cycle removes it once its heartbeat is old.
                log.debug("User batch %s: what the failed load wrote stays invisible until a cycle "
                            "removes it (%s)", self.batch_id, failure, extra=ids(user_batch_id=self.batch_id))
        return False

    def write(self, numbered_rows):
        """Write one slice of `(line, text)` rows, committed."""
        values = []
        for line, text in numbered_rows:
            self.rows += 1
            text = clean_text(text)
            self.classify(line, text)
            values.append((self.batch_id, self.rows, text))
        with write_transaction():
            bulk_insert_rows(values)
            UserBatch.update(loader_seen_at=utcnow()).where(UserBatch.id == self.batch_id).execute()

    def classify(self, line, text):
        problem = admission.row_problem(text)
        self.checked.append(problem is None)
        if problem is None:
            self.valid += 1
            return
        self.invalid += 1
        if len(self.invalid_examples) < MAX_REPORTED_INVALID:
            self.invalid_examples.append((line, echo(text), problem))

    def check_has_valid_row(self):
        if self.valid == 0:
            raise InputError(no_valid_address_message(self.invalid, self.invalid_examples))

    def finish(self, now=None, before_visible=None, callback_url=None):
        """Make the batch visible (it takes its place in line now), admit it, and return what
        it holds. `before_visible()` runs inside the transaction that makes it visible."""
        now = now or utcnow()
        with write_transaction():
            if before_visible is not None:
                before_visible()
            place = take_places(1)[0]
            # The heartbeat goes on while the loader admits its batch: cycles leave it to the
            # loader meanwhile (two admitters of one batch would only take turns at the lock).
            changes = {UserBatch.status: BatchState.QUEUED, UserBatch.fifo_order: place,
                       UserBatch.loader_seen_at: utcnow()}
            if callback_url is not None:
                changes[UserBatch.callback_url] = callback_url
            (UserBatch.update(changes)
             .where((UserBatch.id == self.batch_id) & (UserBatch.status == BatchState.LOADING)).execute())
        admit_batch(self.batch_id, now, heartbeat=UserBatch.loader_seen_at, checked=self.checked)
        UserBatch.update(loader_seen_at=None).where(UserBatch.id == self.batch_id).execute()
        batch = UserBatch.get_by_id(self.batch_id)
        self.summary = SubmitSummary(self.batch_id, accepted=batch.total - batch.invalid,
                                     invalid=batch.invalid, duplicates=batch.duplicates,
                                     invalid_examples=self.invalid_examples[:MAX_REPORTED_INVALID])
        log.info("User batch %s created for %r (%s): %s accepted, %s invalid, %s duplicates",
                 self.batch_id, str(self.batch.user_id)[:MAX_ECHO], self.check_type,
                 self.summary.accepted, self.summary.invalid, self.summary.duplicates,
                 extra=ids(user_batch_id=self.batch_id))
        return self.summary

    def remove(self):
        """Take away everything this loader wrote (it was never visible)."""
        remove_loading_batch(self.batch_id)


def check_submission(user_id, check_type):
    if check_type not in CHECK_TYPES:
        raise InputError("unknown check type %r: use one of %s" % (echo(str(check_type)), ", ".join(CHECK_TYPES)))
    user_id = "" if user_id is None else str(user_id)
    if not user_id.strip():
        raise InputError("a user id is required (--user)")
    if len(user_id) > MAX_USER_ID:
        raise InputError("the user id is %d characters long; at most %d" % (len(user_id), MAX_USER_ID))
    if any(ord(c) < 32 or ord(c) == 127 for c in user_id):
        raise InputError("the user id %r holds a control character (a newline, a tab...); "
                         "use printable characters only" % echo(user_id))


def numbered(emails):
    """(line, address) pairs from either plain addresses or pairs."""
    for index, item in enumerate(emails, start=1):
        if isinstance(item, tuple):
            yield item
        else:
            yield index, item


def chunks(iterable, size):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def clean_text(text):
    """The row as stored: surrounding space dropped, a NUL (which a Postgres text column cannot
    hold) written out, and a line longer than any address cut (it is invalid anyway)."""
    text = (text or "").strip().replace("\x00", "\\x00")
    return text if len(text) <= MAX_STORED_EMAIL else text[:MAX_STORED_EMAIL] + "..."


def echo(text):
    """A submitted value fit for a message: never a whole 5 MB line."""
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."


def no_valid_address_message(invalid, examples):
    if not examples:
        return "no addresses found: the input is empty"
    line, text, problem = examples[0]
    return "no valid address in %s row(s); first: line %s: %r: %s" % (invalid, line, text, problem)


def bulk_insert_rows(values):
    """Rows as a host writes them: (batch id, position, email); the rest takes its defaults."""
    insert_tuples(Row, ("batch", "position", "email"), values)

