"""Reading what the queue did: the one reporting layer behind `status`, the HTTP API, the
console and /metrics, so that they never disagree.

- `batch_status(id)`: the status object of one user batch (design.md, "Status object");
- `iter_results(id)`: its rows in position order, read from the view `user_batch_results`,
  which is also what a host reads with plain SQL (Gone once they were pruned);
- `queue_overview(settings)`: per check type, emails and Bouncer batches in their states, the
  request budget, credits spent, possible orphans; user batches and webhook deliveries by state;
- the console's lists: a page of user batches, one batch's rows, Bouncer batches and webhook
  deliveries, the ledger, recent failures.

The totals (credits spent, emails verified, Bouncer batches ended, possible orphans) are read
from the ledger, whose rows are never removed once sent: they never go down, whatever the
service prunes, so /metrics may call them counters.
"""

import io

from peewee import fn

from bouncer.errors import Gone, NotFound
from bouncer.queue.outcomes import count_outcomes_of, iso, status_object
from bouncer.queue.waiting import waiting_of
from bouncer.reading.activity import deliveries_of_batches, delivery_of
from bouncer.states import SENT, RowState
from bouncer.store.database import database
from bouncer.store.models import QueuedEmail, RidingRows, UserBatch, UserBatchEmail

Row = UserBatchEmail
# A row's states as the console shows them, a queued row riding on a Bouncer batch as `sent`.
SHOWN_ROW_STATES = (RowState.NEW, RowState.QUEUED, SENT, RowState.DONE, RowState.INVALID, RowState.FAILED,
                    RowState.CANCELLED)
RESULT_COLUMNS = ("email", "status", "reason", "score", "accept_all", "disposable", "free", "role",
                  "disabled", "full_mailbox", "provider")


EXPORT_PAGE = 10000


def get_user_batch(batch_id):
    batch = UserBatch.get_or_none(UserBatch.id == batch_id)
    if batch is None:
        raise NotFound("no user batch with id %s" % batch_id)
    return batch


def batch_with_rows(batch_id):
    """The user batch, whose rows are still there: NotFound, or Gone once they were pruned."""
    batch = get_user_batch(batch_id)
    if batch.pruned_at is not None:
        raise Gone("the rows of user batch %s were removed after the retention period (on %s); its "
                   "status and counts remain" % (batch_id, batch.pruned_at.date().isoformat()))
    return batch


def batch_status(batch_id):
    """The contract's status object for one user batch, with its latest webhook delivery."""
    answer = status_object(get_user_batch(batch_id))
    answer["webhook"] = delivery_of(batch_id)
    return answer


def recent_batches(limit=20, user_id=None, status=None, before=None):
    """The latest user batches with their progress, newest first (`before`: ids below it)."""
    batches = list(select_batches(limit, user_id, status, before))
    pending = pending_counts(batches)
    return [{"batch_id": b.id, "user_id": b.user_id, "check_type": b.check_type, "status": b.status,
             "total": b.total, "done": b.total - pending.get(b.id, 0),
             "created_at": iso(b.created_at)} for b in batches]


def select_batches(limit, user_id=None, status=None, before=None, api_token_digest=None):
    """The latest user batches (of one API token's, when given), newest first."""
    query = UserBatch.select().order_by(UserBatch.id.desc()).limit(limit)
    if api_token_digest is not None:
        query = query.where(UserBatch.api_token_digest == api_token_digest)
    if user_id is not None:
        query = query.where(UserBatch.user_id == user_id)
    if status is not None:
        query = query.where(UserBatch.status == status)
    if before is not None:
        query = query.where(UserBatch.id < before)
    return query


def page_of_batches(limit=20, user_id=None, status=None, before=None, with_webhooks=False, api_token_digest=None):
    """(status objects of the latest user batches (of one API token's, when given), newest
    first, each with its latest webhook delivery when asked; the `before` of the next page, or
    None when there is none). A few queries for the whole page, whatever its size."""
    batches = list(select_batches(limit + 1, user_id, status, before, api_token_digest))
    shown = batches[:limit]
    counts, waiting = count_outcomes_of(shown), waiting_of(shown)
    page = [status_object(b, counts[b.id], waiting[b.id]) for b in shown]
    if with_webhooks:
        latest = deliveries_of_batches([b.id for b in shown])
        for answer in page:
            answer["webhook"] = latest.get(answer["batch_id"])
    return page, shown[-1].id if len(batches) > limit else None


def pending_counts(batches):
    """{batch id: rows admitted and not yet final}: those in line and those riding, each counted
    through its own index (no index of the rows holds their status)."""
    found = {}
    if not batches:
        return found
    riding = (RidingRows.select(RidingRows.batch_id, fn.SUM(RidingRows.rows))
              .where(RidingRows.batch_id.in_([b.id for b in batches])).group_by(RidingRows.batch_id))
    for check_type in {b.check_type for b in batches}:
        placed = [b for b in batches if b.check_type == check_type and b.fifo_order is not None]
        if placed:
            waiting = (QueuedEmail.select(QueuedEmail.batch_id, fn.COUNT(QueuedEmail.row))
                       .where((QueuedEmail.check_type == check_type)
                              & QueuedEmail.user_id.in_(sorted({b.user_id for b in placed}))
                              & QueuedEmail.fifo_order.in_([b.fifo_order for b in placed])
                              & QueuedEmail.batch_id.in_([b.id for b in placed]))
                       .group_by(QueuedEmail.batch_id))
            found.update(waiting.tuples())
    for batch_id, rows in riding.tuples():
        found[batch_id] = found.get(batch_id, 0) + int(rows)
    return found


def row_states(batch_id):
    """{row state: rows} of one user batch, every state named: `queued` in line, `sent` riding
    on a Bouncer batch."""
    found = dict(Row.select(Row.status, fn.COUNT(Row.id)).where(Row.batch == batch_id)
                 .group_by(Row.status).tuples())
    found[SENT] = (RidingRows.select(fn.COALESCE(fn.SUM(RidingRows.rows), 0))
                   .where(RidingRows.batch_id == batch_id).scalar())
    found[RowState.QUEUED] = found.get(RowState.QUEUED, 0) - found[SENT]
    return {state: found.get(state, 0) for state in SHOWN_ROW_STATES}


RESULTS_PAGE_SQL = (
    "SELECT position, email, status, reason, score, accept_all, disposable, free, role, disabled,"
    " full_mailbox, provider FROM user_batch_results WHERE batch_id = {p} AND position > {p}"
    " ORDER BY position LIMIT {p}")


def iter_results(batch_id):
    """One dict per submitted row, in position order, read a page at a time from the view."""
    batch_with_rows(batch_id)
    sql = RESULTS_PAGE_SQL.format(p=database.param)
    after = 0
    while True:
        page = database.execute_sql(sql, (batch_id, after, EXPORT_PAGE)).fetchall()
        for row in page:
            yield dict(zip(RESULT_COLUMNS, row[1:]))
        if len(page) < EXPORT_PAGE:
            return
        after = page[-1][0]


def results_csv(rows, flush_at=64 * 1024):
    """The CSV of `results`, spreadsheet-safe, in pieces of about `flush_at` characters (the
    CLI writes them to a file, the API and the console stream them)."""
    import csv  # here: only an export writes CSV
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: spreadsheet_safe(v) for k, v in row.items()})
        if buffer.tell() > flush_at:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def spreadsheet_safe(value):
    """A cell a spreadsheet will not run as a formula (addresses may legally start with = + - @)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value

