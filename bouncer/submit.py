"""Creating user batches: the one way addresses enter the queue, for the CLI and for other apps.

A batch is written in one transaction, in chunks of bulk statements: either all its rows are
there, or none are (a bad file, a crash, or a batch with no valid address writes nothing).
"""
import logging
from dataclasses import dataclass, field

from peewee import fn

from .addresses import strip_email_modifiers, syntax_error
from .config import CHECK_TYPES
from .db import bulk_insert, chunked, database, utcnow
from .errors import InputError
from .models import INVALID, QUEUED, EmailGlobal, UserBatch, UserBatchEmail

log = logging.getLogger(__name__)

SUBMIT_CHUNK = 5000
MAX_REPORTED_INVALID = 5


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


def create_user_batch(user_id, check_type, emails, now=None, on_progress=None):
    """Create one user batch from `emails` and return its SubmitSummary.

    `emails` is any iterable of address strings, or of `(line_number, address)` pairs (line
    numbers then name the invalid rows). Raises InputError, writing nothing, for an unknown check
    type, an empty user, or input without a single valid address.
    """
    check_submission(user_id, check_type)
    now = now or utcnow()
    with database.atomic():
        batch = UserBatch.create(user=str(user_id), check_type=check_type, created_at=now)
        summary = SubmitSummary(batch_id=batch.id)
        position = 0
        for chunk in chunked(numbered(emails), SUBMIT_CHUNK):
            position = store_chunk(batch, chunk, position, summary, now)
            if on_progress:
                on_progress(len(chunk))
        if summary.accepted == 0:
            # Raising inside the transaction rolls the batch row back with everything else.
            raise InputError(no_valid_address_message(summary))
        summary.duplicates = count_repeated_addresses(batch.id)
        UserBatch.update(total=position, invalid=summary.invalid, duplicates=summary.duplicates) \
            .where(UserBatch.id == batch.id).execute()
    log.info("User batch %s created for %s (%s): %s accepted, %s invalid, %s duplicates",
             batch.id, user_id, check_type, summary.accepted, summary.invalid, summary.duplicates)
    return summary


def check_submission(user_id, check_type):
    if check_type not in CHECK_TYPES:
        raise InputError("unknown check type %r: use one of %s" % (check_type, ", ".join(CHECK_TYPES)))
    if not str(user_id).strip():
        raise InputError("a user is required (--user)")


def numbered(emails):
    """(line, address) pairs from either plain addresses or pairs."""
    for index, item in enumerate(emails, start=1):
        if isinstance(item, tuple):
            yield item
        else:
            yield index, item


def store_chunk(batch, chunk, position, summary, now):
    """Classify, register the stripped addresses, and insert the rows of one chunk."""
    rows, stripped = [], []
    for line, text in chunk:
        # A NUL cannot be stored in a Postgres text column; it makes the row invalid anyway.
        text = (text or "").strip().replace("\x00", "\\x00")
        problem = syntax_error(text) if text else "the address is empty"
        if problem:
            summary.invalid += 1
            if len(summary.invalid_examples) < MAX_REPORTED_INVALID:
                summary.invalid_examples.append((line, text, problem))
            rows.append((text, None, INVALID, problem))
        else:
            summary.accepted += 1
            address = strip_email_modifiers(text)
            stripped.append(address)
            rows.append((text, address, QUEUED, None))
    global_ids = register_global_emails(stripped, now)
    records = []
    for text, address, status, problem in rows:
        records.append({
            "batch": batch.id, "position": position, "email": text,
            "email_global": global_ids.get(address), "check_type": batch.check_type,
            "status": status, "failure_reason": problem,
            "completed_at": now if status == INVALID else None,
        })
        position += 1
    bulk_insert(UserBatchEmail, records)
    return position


def register_global_emails(addresses, now):
    """{stripped address: emails_global id}, creating the rows that do not exist yet."""
    unique = sorted(set(addresses))  # sorted: concurrent submits take row locks in one order
    ids = {}
    for part in chunked(unique):
        bulk_insert(EmailGlobal, [{"email": a, "created_at": now} for a in part], ignore_existing=True)
        query = EmailGlobal.select(EmailGlobal.id, EmailGlobal.email).where(EmailGlobal.email.in_(part))
        ids.update((email, gid) for gid, email in query.tuples())
    return ids


def count_repeated_addresses(batch_id):
    """Valid rows whose stripped address came earlier in the same batch."""
    valid = (UserBatchEmail.select(fn.COUNT(UserBatchEmail.id),
                                   fn.COUNT(UserBatchEmail.email_global.distinct()))
             .where((UserBatchEmail.batch == batch_id) & UserBatchEmail.email_global.is_null(False)))
    rows, distinct = valid.scalar(as_tuple=True)
    return rows - distinct


def no_valid_address_message(summary):
    if not summary.invalid_examples:
        return "no addresses found: the input is empty"
    line, text, problem = summary.invalid_examples[0]
    return "no valid address in %s row(s); first: line %s: %r: %s" % (
        summary.invalid, line, text, problem)
