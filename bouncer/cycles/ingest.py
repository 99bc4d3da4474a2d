"""Ingest: a completed Bouncer batch's download read, matched to the addresses the batch sent,
and stored, in one transaction that also ends its rows, the batch and the user batches it
finishes (`ingest_download`).

A record `unknown` with a `retryAfter` (greylisting: the receiving server asked to be tried again
later) is stored, never to serve as a fresh verdict; while UNKNOWN_RECHECKS allows another try
and the `retryAfter` lies within UNKNOWN_RECHECK_MAX_DELAY, the rows of its address go back in
line where they were, not to be sent before then, instead of ending. A batch that was finished at
Bouncer (finishing.py) holds only what Bouncer verified before the finish: its other addresses
end with a reason saying so, and the credits refunded are kept in the ledger.

Reading is lenient by design: extra or missing fields are fine and the raw record is kept
whole; a record without a usable email or verdict, or for an address the batch never sent, is
counted and left out. Reading needs no database, so a large download is read by the process
that fetched it (downloads.py), and the cycle only matches and writes.
"""

import datetime
import json
import logging
from dataclasses import dataclass, field

from bouncer.addresses import strip_email_modifiers
from bouncer.logs import ids
from bouncer.queue import ledger, line, progress, spellings
from bouncer.states import VERDICTS
from bouncer.store.bulk import among, insert_encoded
from bouncer.store.database import database, dialect, utcnow, write_transaction
from bouncer.store.models import BouncerBatchEmail, EmailGlobal, result_model

log = logging.getLogger(__name__)


RESULT_COLUMNS = ("email_global", "status", "reason", "score", "accept_all", "disposable", "free",
                  "role", "disabled", "full_mailbox", "provider", "raw", "retry_after", "checked_at",
                  "bouncer_batch_id")


FLAGS = {"yes": "yes", "no": "no", "unknown": "unknown", True: "yes", False: "no"}
# One encoder for every raw record (json.dumps builds a new one per call when given options).
RAW_ENCODER = json.JSONEncoder(ensure_ascii=False, check_circular=False)


@dataclass
class IngestReport:
    ledger_id: int
    verified: int = 0     # emails completed with a verdict
    missing: int = 0      # emails failed: their address was not in the download
    extra: int = 0        # records for addresses this batch never sent (ignored)
    malformed: int = 0    # records without a usable email or verdict (ignored)
    rechecking: int = 0   # emails back in line: their address was greylisted
    refunded: int | None = None   # credits a finish gave back


@dataclass(frozen=True)
class Rechecks:
    """How greylisted verdicts are tried again: UNKNOWN_RECHECKS times at most per row, when the
    `retryAfter` lies at most UNKNOWN_RECHECK_MAX_DELAY seconds ahead."""
    times: int = 0
    max_delay: int = 0


@dataclass
class Download:
    """A download read into what it stores, before any address is matched: the email of each
    usable record, each record's columns as the dialect writes them (`encoded`: on PostgreSQL,
    lines of COPY text), and how many records were not usable. Only the encoded form is kept: a
    download sent back from its process is pickled, and on PostgreSQL the lines alone unpickle
    ten times faster than lines and columns together (measured on 10k records: 1.6 ms against
    15.9 ms)."""
    emails: list
    encoded: list
    malformed: int = 0
    retry_after: dict = field(default_factory=dict)   # {index: naive UTC} of greylisted records


def read_download(records):
    """A Download of Bouncer's records (parsed JSON objects)."""
    emails, rows, retry_after = [], [], {}
    for record in records:
        columns = parse_record(record)
        if columns is not None:
            if columns[-1] is not None:
                retry_after[len(rows)] = greylisted_until(record)
            emails.append(record["email"])
            rows.append(columns)
    return Download(emails, dialect().encode_rows(rows), malformed=len(records) - len(rows),
                    retry_after=retry_after)


def match_records(ledger_id, download, report):
    """{email_global id: index of its record in the download} for each record of an address
    this batch sent, the ids of every address it sent, and {email_global id: spelling sent} of
    the records matched by their stripped form. Bouncer answers with the spelling sent; an
    address it normalised, or whose spelling an erasure replaced while it flew, is matched by
    its stripped form, looked up only when some record needs it."""
    by_sent = sent_spellings(ledger_id)
    verdicts, unmatched, respelled = {}, [], {}
    for index, email in enumerate(download.emails):
        global_id = by_sent.get(email)
        if global_id is None:
            unmatched.append(index)
        else:
            verdicts[global_id] = index
    if unmatched:
        by_stripped = stripped_addresses(ledger_id)
        spelling_of = {global_id: spelling for spelling, global_id in by_sent.items()}
        for index in unmatched:
            global_id = by_stripped.get(strip_email_modifiers(download.emails[index]))
            if global_id is None:
                report.extra += 1
            else:
                verdicts[global_id] = index
                respelled[global_id] = spelling_of[global_id]
    report.malformed = download.malformed
    if report.malformed or report.extra:
        log.warning("Bouncer batch %s: %s malformed and %s unexpected records in the download",
                    report.ledger_id, report.malformed, report.extra)
    return verdicts, set(by_sent.values()), respelled


def sent_spellings(ledger_id):
    """{spelling sent: email_global id} of the batch's addresses."""
    query = (BouncerBatchEmail.select(BouncerBatchEmail.email_sent, BouncerBatchEmail.email_global)
             .where(BouncerBatchEmail.bouncer_batch == ledger_id))
    return dict(database.execute_sql(*query.sql()).fetchall())


def stripped_addresses(ledger_id):
    """{stripped address: email_global id} of the batch's addresses."""
    query = (BouncerBatchEmail.select(EmailGlobal.email, BouncerBatchEmail.email_global)
             .join(EmailGlobal)
             .where(BouncerBatchEmail.bouncer_batch == ledger_id))
    return dict(database.execute_sql(*query.sql()).fetchall())


def parse_record(record):
    """The stored columns of one download record (RESULT_COLUMNS between the address and the
    time), or None when it has no email or verdict. Lenient: extra or missing fields are fine,
    the raw record is kept whole. `retry_after` (as stored text) only for a greylisted
    `unknown`."""
    if not isinstance(record, dict):
        return None
    email, status = record.get("email"), record.get("status")
    if not isinstance(email, str) or not email or status not in VERDICTS:
        return None
    domain, account = as_dict(record.get("domain")), as_dict(record.get("account"))
    return (
        status,
        as_text(record.get("reason")),
        as_score(record.get("score")),
        as_flag(domain.get("acceptAll")),
        as_flag(domain.get("disposable")),
        as_flag(domain.get("free")),
        as_flag(account.get("role")),
        as_flag(account.get("disabled")),
        as_flag(account.get("fullMailbox")),
        as_text(record.get("provider")),
        getattr(record, "raw", None) or RAW_ENCODER.encode(record),
        stored_time(greylisted_until(record)) if status == "unknown" else None,
    )


def parse_time(value):
    """Bouncer's ISO 8601 time ("2023-03-26T18:08:15.033Z") as naive UTC; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return moment


def greylisted_until(record):
    """Bouncer's `retryAfter` of a record (naive UTC), None when it has none or none we can read."""
    return parse_time(record.get("retryAfter"))


def stored_time(moment):
    """A time as both databases read it from text (COPY, or SQLite's own form)."""
    return moment.isoformat(" ") if moment is not None else None


def as_dict(value):
    return value if isinstance(value, dict) else {}


def as_text(value):
    # Postgres text cannot hold NUL, which a JSON string may carry as \u0000.
    return value[:255].replace("\x00", "") if isinstance(value, str) else None


def as_score(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def as_flag(value):
    """Bouncer's flags are the strings yes/no/unknown; a YAML-minded encoder may send booleans."""
    if value.__class__ is str:
        return FLAGS.get(value) or value.lower()[:16]
    return FLAGS.get(value) if value.__class__ is bool else None


def upsert_results(check_type, download, verdicts, now, ledger_id):
    """Insert or update the verdicts ({email_global id: record index}, from match_records), a
    few thousand per statement."""
    Result = result_model(check_type)
    if not verdicts:
        return
    # Addresses verified for the first time (most of them) are written straight into the table;
    # on PostgreSQL an upsert goes through a scratch table, costing a second write of every row.
    # No other transaction can write these addresses' verdicts meanwhile: only an ingest writes
    # them, and an address is in flight on one batch of a check type at a time.
    replace = any_verdict_of(Result, verdicts)
    insert_encoded(Result, RESULT_COLUMNS, verdicts.items(), download.encoded, (now, ledger_id),
                   replace_on=Result.email_global if replace else None)


def any_verdict_of(Result, global_ids):
    """Whether one of these addresses has a verdict stored already."""
    return Result.select().where(among(Result.email_global, global_ids)).exists()


def ingest_download(ledger_id, download, now=None, rechecks=Rechecks()):
    """Ingest the download of a completed Bouncer batch (a Download), in one transaction:
    verdicts upserted, the rows of every address completed (or back in line for a re-check,
    `rechecks`), addresses Bouncer left out ended with that reason, the batch out of flight, and
    each user batch with nothing pending completed. Returns an IngestReport, or None when the
    batch is no longer outstanding (already ingested or failed). A death anywhere in it rolls it
    all back: the next cycle downloads again."""
    now = now or utcnow()
    with write_transaction():
        batch = ledger.claim_outstanding(ledger_id)
        if batch is None:
            return None
        report = IngestReport(ledger_id)
        verdicts, sent, respelled = match_records(ledger_id, download, report)
        upsert_results(batch.check_type, download, verdicts, now, ledger_id)
        # A stored record names the spelling sent, which a row holds; never one an erasure took.
        spellings.respell_verdicts(respelled, only_unheld=False, check_types=(batch.check_type,))
        missing = sent - verdicts.keys()
        report.missing = progress.fail_sent_rows(ledger_id, missing_reason(batch), now, missing)
        back = line.requeue_for_recheck(ledger_id, due_rechecks(download, verdicts, rechecks, now), rechecks.times)
        report.rechecking = len(back)
        report.verified = progress.complete_sent_rows(ledger_id, now, except_rows=back)
        report.refunded = refunded_by_finish(batch, len(missing))
        user_batches = line.batches_riding_on(ledger_id)
        ledger.mark_completed(ledger_id, now, refunded=report.refunded)
        progress.complete_finished_batches(user_batches, now)
    log.info("Bouncer batch %s (%s) ingested: %s emails verified, %s back in line for a re-check, %s missing, "
             "%s extra and %s malformed records ignored", batch.bouncer_id, ledger_id, report.verified,
             report.rechecking, report.missing, report.extra, report.malformed,
             extra=ids(ledger_id=ledger_id, bouncer_id=batch.bouncer_id))
    return report


def due_rechecks(download, verdicts, rechecks, now):
    """{email_global id: not before} of the greylisted addresses worth trying again: their
    `retryAfter` lies at most `rechecks.max_delay` seconds ahead."""
    if not rechecks.times or not download.retry_after:
        return {}
    latest = now + datetime.timedelta(seconds=rechecks.max_delay)
    return {global_id: download.retry_after[index] for global_id, index in verdicts.items()
            if index in download.retry_after and download.retry_after[index] <= latest}


def missing_reason(batch):
    """Why an address Bouncer left out of this batch's download ends without a verdict."""
    if batch.finish_reason is not None:
        return "Bouncer batch %s was finished before verifying it (%s)" % (batch.bouncer_id, batch.finish_reason)
    return "not in Bouncer's results for batch %s" % batch.bouncer_id


def refunded_by_finish(batch, missing):
    """The credits a finish gave back: what Bouncer says it did not charge, or (when it does
    not say) the addresses it left out. None for a batch that was not finished."""
    if batch.finish_reason is None:
        return None
    if batch.credits is not None:
        return max(0, batch.quantity - batch.credits)
    return missing
