"""The results side of the ledger: following outstanding Bouncer batches to their end.

A completed batch is ingested in one transaction: verdicts upserted into the check type's results
table, the emails of every address completed, addresses Bouncer left out failed with that reason,
and each user batch with nothing pending marked completed. A batch Bouncer lost (404) or that
never completes (BATCH_TIMEOUT) fails with its emails and user batches, the reason stored.
"""
import json
import logging
from dataclasses import dataclass

from peewee import fn

from .addresses import strip_email_modifiers
from .db import among, database, insert_tuples, lock_rows_for_update, utcnow, write_transaction
from .models import (
    COMPLETED, DONE, FAILED, OUTSTANDING, SENT, VERDICTS,
    BouncerBatch, BouncerBatchEmail, EmailGlobal, UserBatchEmail, result_model,
)
from .progress import batches_of_bouncer_batch, complete_finished_batches, fail_batches
from .queue import end_flight

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("email_global", "status", "reason", "score", "accept_all", "disposable", "free",
                  "role", "disabled", "full_mailbox", "provider", "raw", "checked_at",
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


def batches_to_check(check_type):
    """Outstanding Bouncer batches, least recently checked first."""
    return list(BouncerBatch.select()
                .where((BouncerBatch.check_type == check_type)
                       & (BouncerBatch.status == OUTSTANDING))
                .order_by(BouncerBatch.last_checked_at.asc(nulls="first"), BouncerBatch.id))


def note_checked(ledger_id, bouncer_status, now=None):
    (BouncerBatch.update(last_checked_at=now or utcnow(), bouncer_status=str(bouncer_status)[:64])
     .where(BouncerBatch.id == ledger_id).execute())


def ingest_results(ledger_id, records, now=None):
    """Process the download of a completed Bouncer batch. Returns an IngestReport, or None when
    the batch is no longer outstanding (already ingested or failed)."""
    now = now or utcnow()
    with write_transaction():
        ledger = claim_outstanding(ledger_id)
        if ledger is None:
            return None
        report = IngestReport(ledger_id)
        sent = sent_addresses(ledger_id)
        verdicts = match_records(sent, records, report, now)
        upsert_results(ledger.check_type, list(verdicts.values()))
        missing = set(sent[0].values()) - verdicts.keys()
        report.missing = fail_pending_emails(
            ledger_id, "not in Bouncer's results for batch %s" % ledger.bouncer_id, now, missing)
        report.verified = complete_pending_emails(ledger_id, now)
        end_flight(ledger_id)
        (BouncerBatch.update(status=COMPLETED, finished_at=now, bouncer_status="completed")
         .where(BouncerBatch.id == ledger_id).execute())
        complete_finished_batches(batches_of_bouncer_batch(ledger_id), now)
    log.info("Bouncer batch %s (%s) ingested: %s emails verified, %s missing, %s extra and %s "
             "malformed records ignored", ledger.bouncer_id, ledger_id, report.verified,
             report.missing, report.extra, report.malformed)
    return report


def claim_outstanding(ledger_id):
    """The ledger row, locked, if it is still outstanding: who finishes a batch is decided here."""
    query = BouncerBatch.select().where(
        (BouncerBatch.id == ledger_id) & (BouncerBatch.status == OUTSTANDING))
    return lock_rows_for_update(query).first()


def match_records(sent, records, report, now):
    """{email_global id: result row} for each record of an address this batch sent; a row is a
    tuple in RESULT_COLUMNS order."""
    by_sent, by_stripped = sent
    verdicts = {}
    for record in records:
        parsed = parse_record(record)
        if parsed is None:
            report.malformed += 1
            continue
        email = record["email"]
        global_id = by_sent.get(email) or by_stripped.get(strip_email_modifiers(email))
        if global_id is None:
            report.extra += 1
            continue
        verdicts[global_id] = (global_id,) + parsed + (now, report.ledger_id)
    if report.malformed or report.extra:
        log.warning("Bouncer batch %s: %s malformed and %s unexpected records in the download",
                    report.ledger_id, report.malformed, report.extra)
    return verdicts


def sent_addresses(ledger_id):
    """Two maps to each sent address's global id: by the spelling sent (Bouncer answers with
    it), and by stripped address (in case Bouncer normalised the spelling)."""
    by_sent, by_stripped = {}, {}
    query = (BouncerBatchEmail
             .select(BouncerBatchEmail.email_sent, EmailGlobal.email, BouncerBatchEmail.email_global)
             .join(EmailGlobal)
             .where(BouncerBatchEmail.bouncer_batch == ledger_id))
    for sent, stripped, global_id in database.execute_sql(*query.sql()):
        by_sent[sent] = global_id
        by_stripped[stripped] = global_id
    return by_sent, by_stripped


def parse_record(record):
    """The stored columns of one download record (RESULT_COLUMNS between the address and the
    time), or None when it has no email or verdict. Lenient: extra or missing fields are fine,
    the raw record is kept whole."""
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
    )


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


def upsert_results(check_type, rows):
    """Insert or update the verdicts, a few thousand per statement."""
    Result = result_model(check_type)
    insert_tuples(Result, RESULT_COLUMNS, rows, replace_on=Result.email_global)


def complete_pending_emails(ledger_id, now):
    """Every email still pending in this batch has its verdict now (the missing ones failed)."""
    return (UserBatchEmail.update(status=DONE, completed_at=now)
            .where((UserBatchEmail.bouncer_batch == ledger_id) & (UserBatchEmail.status == SENT))
            .execute())


def fail_pending_emails(ledger_id, reason, now, only_addresses=None):
    """Fail the batch's pending emails (of `only_addresses`, when given) with `reason`."""
    pending = (UserBatchEmail.bouncer_batch == ledger_id) & (UserBatchEmail.status == SENT)
    if only_addresses is None:
        return (UserBatchEmail.update(status=FAILED, failure_reason=reason, completed_at=now)
                .where(pending).execute())
    if not only_addresses:
        return 0
    return (UserBatchEmail.update(status=FAILED, failure_reason=reason, completed_at=now)
            .where(pending & among(UserBatchEmail.email_global, only_addresses)).execute())


def fail_bouncer_batch(ledger_id, reason, now=None):
    """Bouncer lost the batch or it never finished: its emails and every user batch with an
    email in it fail, with `reason`. Returns the number of emails failed (None if the batch was
    no longer outstanding)."""
    now = now or utcnow()
    with write_transaction():
        ledger = claim_outstanding(ledger_id)
        if ledger is None:
            return None
        user_batches = [b for (b,) in batches_of_bouncer_batch(ledger_id).tuples()]
        failed = fail_pending_emails(ledger_id, reason, now)
        end_flight(ledger_id)
        (BouncerBatch.update(status=FAILED, failure_reason=reason, finished_at=now)
         .where(BouncerBatch.id == ledger_id).execute())
        fail_batches(user_batches, reason, now)
    log.error("Bouncer batch %s (%s) failed: %s; %s emails and %s user batches marked failed",
              ledger.bouncer_id, ledger_id, reason, failed, len(user_batches))
    return failed


def overdue_batches(check_type, sent_before):
    return [ledger_id for (ledger_id,) in BouncerBatch.select(BouncerBatch.id).where(
        (BouncerBatch.check_type == check_type) & (BouncerBatch.status == OUTSTANDING)
        & (BouncerBatch.sent_at < sent_before)).tuples()]


def count_outstanding(check_type):
    return (BouncerBatch.select(fn.COUNT(BouncerBatch.id))
            .where((BouncerBatch.check_type == check_type) & (BouncerBatch.status == OUTSTANDING))
            .scalar())
